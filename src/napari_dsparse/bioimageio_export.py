"""A bioimage.io model package (spec 0.5) of a napari-dsparse model file.

The package holds TorchScript weights of one module that does everything between
raw pixels and class probabilities: the model's normalisation, a reflect padding of
one halo and the dense network in ``valid`` mode, then a softmax. A model whose
normalisation policy is ``per_image`` normalises each image by its own percentiles
instead: the package declares that as bioimage.io's ``scale_range`` preprocessing
(``per_sample`` over y and x, per channel, at the model's percentiles), which tools
compute on the whole image before they tile, and the module takes its result. Its
output has the input's size; the output halo is the receptive-field radius, so tools
that tile (bioimage.io.core, deepImageJ, ilastik, ...) crop it and get exact results.
Needs the optional ``bioimageio`` extra (``bioimageio.core``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from torch import nn

from napari_dsparse import __version__
from napari_dsparse.data import InputError
from napari_dsparse.export import (
    check_output_folder,
    load_classifier,
    write_atomically,
)
from napari_dsparse.model import Classifier
from napari_dsparse.sparse import DenseNet

__all__ = [
    "PixelProbabilities",
    "build_model_description",
    "export_bioimageio",
    "preprocess",
]

TEST_SIDE = 96  # test tensor side: several receptive fields, small in the package
CITATION = (
    "Li, Zhao & Wang (2014): Highly efficient forward and backward propagation of "
    "convolutional neural networks for pixelwise classification"
)
CITATION_URL = "https://arxiv.org/abs/1412.4526"
SCALE_RANGE_EPS = 1e-6  # bioimage.io's default; negligible next to intensity ranges


class PixelProbabilities(nn.Module):
    """Raw ``(B, C, Y, X)`` pixels -> class probabilities ``(B, K, Y, X)``, exactly."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.dense: DenseNet = classifier.dense
        low = torch.tensor(classifier.normalization.low, dtype=torch.float32)
        high = torch.tensor(classifier.normalization.high, dtype=torch.float32)
        if _per_image(classifier):  # the package's preprocessing normalises
            low, high = torch.zeros_like(low), torch.ones_like(high)
        self.register_buffer("low", low.view(1, -1, 1, 1))
        self.register_buffer("scale", (1 / (high - low)).view(1, -1, 1, 1))
        self.halo = classifier.halo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.low) * self.scale  # a fixed normalisation (or none: per image)
        x = F.pad(x, (self.halo,) * 4, mode="reflect")  # as a whole-image pass pads
        return torch.softmax(self.dense(x, valid=True, strategy="dilated"), dim=1)


def export_bioimageio(
    model: str | os.PathLike | Classifier,
    output: str | os.PathLike,
    report: Callable[[str], None] = lambda _message: None,
) -> Path:
    """Write the bioimage.io package (.zip) of a model file or classifier.

    Parameters
    ----------
    model
        A napari-dsparse model file or a :class:`Classifier`.
    output
        The package to write, ending in ``.zip``; written atomically.

    Returns
    -------
    The path of the package.
    """
    output = Path(output)
    if output.suffix.lower() != ".zip":
        raise InputError(f"a bioimage.io package ends in .zip, not {output}")
    check_output_folder(output)  # before the model is read and the package built
    classifier = model if isinstance(model, Classifier) else load_classifier(model)
    classifier = classifier.to("cpu")
    try:
        from bioimageio.spec import save_bioimageio_package
    except ImportError as error:
        raise InputError(
            "exporting to bioimage.io needs bioimageio.core: "
            "pip install 'napari-dsparse[bioimageio]'"
        ) from error
    with tempfile.TemporaryDirectory(prefix="dsparse-bioimageio-") as folder:
        description = build_model_description(classifier, Path(folder))
        write_atomically(
            output,
            lambda temporary: save_bioimageio_package(
                description, output_path=Path(temporary)
            ),
        )
    report(f"wrote {output}")
    return output


def build_model_description(classifier: Classifier, folder: Path):
    """A validated ``ModelDescr``; its files (weights, tensors, docs) in ``folder``."""
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.model import v0_5 as spec

    files = _write_files(classifier, folder)
    with ValidationContext(root=folder, perform_io_checks=True):
        return spec.ModelDescr(
            name=f"napari-dsparse pixel classifier ({classifier.num_classes} classes)",
            description=(
                f"Pixel classification into {classifier.num_classes} classes by a "
                f"patch CNN (receptive field {classifier.patch_size} px) run densely "
                "with exact d-regularly sparse kernels; trained from scribbles in "
                "napari-dsparse."
            ),
            authors=[spec.Author(name="napari-dsparse user")],
            cite=[spec.CiteEntry(text=CITATION, url=spec.HttpUrl(CITATION_URL))],
            license=spec.LicenseId("BSD-3-Clause"),
            documentation=spec.FileDescr(source=files["readme"]),
            covers=[spec.FileDescr(source=files["cover"])],
            tags=["pixel-classification", "semantic-segmentation", "napari-dsparse"],
            inputs=[_input_description(classifier, files["input"])],
            outputs=[_output_description(classifier, files["output"])],
            weights=spec.WeightsDescr(
                torchscript=spec.TorchscriptWeightsDescr(
                    source=files["weights"],
                    pytorch_version=spec.Version(torch.__version__.split("+")[0]),
                )
            ),
            config=spec.Config(**{"napari-dsparse": _settings(classifier)}),
        )


def _input_description(classifier: Classifier, test_tensor: Path):
    from bioimageio.spec.model import v0_5 as spec

    minimum = 2 * classifier.halo + 2  # reflect padding needs more than one halo
    low, high = classifier.normalization.percentiles
    per_image = _per_image(classifier)
    return spec.InputTensorDescr(
        id=spec.TensorId("raw"),
        description=(
            f"raw intensities, any range; each image is normalised by its own {low} "
            f"and {high} percentiles per channel (scale_range preprocessing)"
            if per_image
            else "raw intensities, any range (the model normalises them)"
        ),
        axes=[
            spec.BatchAxis(),
            spec.ChannelAxis(
                channel_names=[
                    spec.Identifier(f"channel{c}")
                    for c in range(classifier.in_channels)
                ]
            ),
            *(
                spec.SpaceInputAxis(
                    id=spec.AxisId(axis),
                    size=spec.ParameterizedSize(min=minimum, step=1),
                )
                for axis in ("y", "x")
            ),
        ],
        test_tensor=spec.FileDescr(source=test_tensor),
        sample_tensor=spec.FileDescr(source=test_tensor.with_suffix(".tif")),
        data=spec.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[_scale_range(classifier)] if per_image else [],
    )


def _per_image(classifier: Classifier) -> bool:
    return classifier.normalization.policy == "per_image"


def _scale_range(classifier: Classifier):
    """bioimage.io's per-sample percentile normalisation, as the per-image policy."""
    from bioimageio.spec.model import v0_5 as spec

    low, high = classifier.normalization.percentiles
    return spec.ScaleRangeDescr(
        kwargs=spec.ScaleRangeKwargs(
            axes=[spec.AxisId("y"), spec.AxisId("x")],
            min_percentile=low,
            max_percentile=high,
            eps=SCALE_RANGE_EPS,
        )
    )


def preprocess(classifier: Classifier, images: np.ndarray) -> np.ndarray:
    """What the package's preprocessing makes of raw ``(B, C, Y, X)`` images.

    Per image: bioimage.io's ``scale_range`` per sample and channel,
    ``(x - p_low) / (p_high - p_low + eps)``; with a fixed normalisation nothing
    (the module normalises).
    """
    if not _per_image(classifier):
        return images.astype(np.float32)
    values = images.astype(np.float64)
    low, high = np.percentile(
        values, classifier.normalization.percentiles, axis=(2, 3), keepdims=True
    )
    return ((values - low) / (high - low + SCALE_RANGE_EPS)).astype(np.float32)


def _output_description(classifier: Classifier, test_tensor: Path):
    from bioimageio.spec.model import v0_5 as spec

    return spec.OutputTensorDescr(
        id=spec.TensorId("probabilities"),
        description="class probabilities; argmax + 1 gives napari-dsparse's labels",
        axes=[
            spec.BatchAxis(),
            spec.ChannelAxis(
                channel_names=[
                    spec.Identifier(f"class{k}")
                    for k in range(1, classifier.num_classes + 1)
                ]
            ),
            *(
                spec.SpaceOutputAxisWithHalo(
                    id=spec.AxisId(axis),
                    size=spec.SizeReference(
                        tensor_id=spec.TensorId("raw"), axis_id=spec.AxisId(axis)
                    ),
                    halo=classifier.halo,
                )
                for axis in ("y", "x")
            ),
        ],
        test_tensor=spec.FileDescr(source=test_tensor),
        sample_tensor=spec.FileDescr(source=test_tensor.with_suffix(".tif")),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )


def _write_files(classifier: Classifier, folder: Path) -> dict[str, Path]:
    """Weights, test tensors, cover and README of the package, in ``folder``."""
    module = PixelProbabilities(classifier).eval()
    test_input = _test_image(classifier)  # (1, C, S, S) float32
    model_input = torch.from_numpy(preprocess(classifier, test_input))
    with torch.inference_mode():
        test_output = module(model_input).numpy()
    with warnings.catch_warnings():  # shape checks become constants: all dilated
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # TorchScript is deprecated in torch, but it is bioimage.io's torch format.
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module, model_input)
    files = {
        "weights": folder / "weights_torchscript.pt",
        "input": folder / "test_input.npy",
        "output": folder / "test_output.npy",
        "cover": folder / "cover.png",
        "readme": folder / "README.md",
    }
    traced.save(str(files["weights"]))
    for kind, tensor in (("input", test_input), ("output", test_output)):
        np.save(files[kind], tensor)
        sample = files[kind].with_suffix(".tif")
        tifffile.imwrite(sample, tensor, photometric="minisblack")
    _write_cover(classifier, test_input, test_output, files["cover"])
    files["readme"].write_text(_readme(classifier), encoding="utf-8")
    return files


def _test_image(classifier: Classifier) -> np.ndarray:
    """A smooth random test image spanning each channel's normalisation range."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    noise = rng.random((classifier.in_channels, TEST_SIDE, TEST_SIDE))
    smooth = np.stack([gaussian_filter(channel, 4) for channel in noise])
    smooth = (smooth - smooth.min()) / max(float(np.ptp(smooth)), 1e-12)
    low = np.asarray(classifier.normalization.low)[:, None, None]
    high = np.asarray(classifier.normalization.high)[:, None, None]
    return (low + smooth * (high - low))[None].astype(np.float32)


def _write_cover(
    classifier: Classifier, test_input: np.ndarray, test_output: np.ndarray, path: Path
) -> None:
    """Input (grey, first channel) next to the predicted classes in their colours."""
    from skimage.io import imsave
    from skimage.transform import resize

    channel = test_input[0, 0]
    grey = (channel - channel.min()) / max(float(np.ptp(channel)), 1e-12)
    colors = np.asarray(classifier.colors())[:, :3]  # (K, 3)
    classes = colors[test_output[0].argmax(axis=0)]  # (S, S, 3)
    picture = np.concatenate([np.repeat(grey[..., None], 3, axis=2), classes], axis=1)
    picture = resize(picture, (256, 512), order=0)  # bioimage.io covers are 2:1
    imsave(path, (picture * 255).round().astype(np.uint8), check_contrast=False)


def _settings(classifier: Classifier) -> dict:
    """What napari-dsparse knows about the model, as plain JSON-able data."""
    return {
        "class_names": list(classifier.class_names),
        "class_colors": [list(color) for color in classifier.colors()],
        "receptive_field": classifier.patch_size,
        "halo": classifier.halo,
        "preset": classifier.preset.name,
        "normalization": classifier.normalization.to_dict(),
        "provenance": json.loads(json.dumps(classifier.provenance, default=str)),
        "exported_by": f"napari-dsparse {__version__}",
    }


def _normalisation_text(classifier: Classifier) -> str:
    normalization = classifier.normalization
    if _per_image(classifier):
        low, high = normalization.percentiles
        return (
            f"each image is normalised per channel by its own {low} and {high} "
            "percentiles (`scale_range` preprocessing, per sample: tools compute it "
            "on the whole image before tiling), as napari-dsparse does"
        )
    return (
        f"the model applies its own normalisation (per channel, `low` -> 0, `high` "
        f"-> 1: low {list(normalization.low)}, high {list(normalization.high)})"
    )


def _readme(classifier: Classifier) -> str:
    classes = "\n".join(
        f"- class {k} ({name}): colour {_hex(color)}"
        for k, (name, color) in enumerate(
            zip(classifier.class_names, classifier.colors(), strict=True), start=1
        )
    )
    provenance = classifier.provenance
    return f"""# napari-dsparse pixel classifier

A patch classifier with a receptive field of {classifier.patch_size} x
{classifier.patch_size} pixels, run densely and exactly with d-regularly sparse kernels
({CITATION}, {CITATION_URL}). It was trained in napari-dsparse from scribbles.

## Classes
{classes}

## Input and output
- input `raw`: (batch, {classifier.in_channels} channel(s), y, x) float32 raw
  intensities; {_normalisation_text(classifier)}.
- output `probabilities`: (batch, {classifier.num_classes} classes, y, x), the same
  size as the input. Borders are handled by reflect padding; when tiling, crop a halo
  of {classifier.halo} pixels on each side of every tile (declared in the package),
  and tiles then equal a whole-image pass.
- labels as napari-dsparse writes them: argmax over classes, plus one.

## Training
Preset `{classifier.preset.name}`, {provenance.get("steps", "?")} steps, seed
{provenance.get("seed", "?")}, napari-dsparse {provenance.get("package_version", "?")}.

## Validation
The test tensors of this package were produced by the exported module itself; in
napari-dsparse's tests the same module equals the model file's whole-image
prediction within 1e-5 at sizes other than the test tensor's. The model is as good as
the scribbles it was trained on: check its predictions on images like yours.

## Use
In napari-dsparse: keep the original model file (`.pt`) and load it in the widget or
with `napari-dsparse predict`. With this package: bioimageio.core
(`bioimageio predict`), or any tool that runs bioimage.io models with TorchScript
weights.
"""


def _hex(color: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in color[:3])
