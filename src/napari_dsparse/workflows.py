"""File-to-file workflows behind the command line: train a model, predict images."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_dsparse import __version__
from napari_dsparse.data import (
    InputError,
    Normalization,
    as_channels_first,
    check_labels,
    check_trainable_image,
    class_counts,
)
from napari_dsparse.export import load_classifier, save_classifier
from napari_dsparse.files import read_array
from napari_dsparse.large import DEFAULT_MEMORY, Outputs, predict_file, progress_bar
from napari_dsparse.model import Classifier, pick_device
from napari_dsparse.train import TrainConfig, Trainer, iter_train

__all__ = ["predict_files", "train_from_files"]

Report = Callable[[str], None]
DEFAULT_SECONDS = 30.0


def _silent(_message: str) -> None:
    pass


def _device(requested: str | None):
    try:
        return pick_device(requested)
    except (ValueError, RuntimeError) as error:
        raise InputError(str(error)) from error


def train_from_files(
    image_path: str | Path,
    labels_path: str | Path,
    output: str | Path,
    seconds: float | None = None,
    steps: int | None = None,
    preset: str = "fast",
    device: str | None = None,
    seed: int = 0,
    channel_axis: int | None = None,
    report: Report = _silent,
) -> Classifier:
    """Train on an image and its painted labels; write the model to ``output``."""
    image = as_channels_first(read_array(image_path), channel_axis)  # (C, Z, Y, X)
    check_trainable_image(image)
    labels = check_labels(read_array(labels_path), image.shape[1:])
    num_classes = int(labels.max())
    counts = class_counts(labels, num_classes)
    if (counts > 0).sum() < 2:
        raise InputError(
            "fewer than two classes are painted; paint strokes of at least two "
            "classes (labels 1..K, 0 = unpainted)"
        )
    if seconds is None and steps is None:
        seconds = DEFAULT_SECONDS
    target = _device(device)
    classifier = Classifier.create(
        image.shape[0],
        tuple(f"class {k}" for k in range(1, num_classes + 1)),
        Normalization.from_image(image),
        preset=preset,
        seed=seed,
    ).to(target)
    classifier.provenance.update(
        seed=seed, package_version=__version__, image=Path(image_path).name
    )
    report(
        f"training {classifier.preset.name} (P = {classifier.patch_size}) on {target}: "
        f"painted pixels per class {counts.tolist()}"
    )
    trainer = Trainer(classifier, image, labels, TrainConfig(seed=seed))
    _drive(iter_train(trainer, steps=steps, seconds=seconds), report)
    save_classifier(classifier, output)
    report(f"wrote {output}")
    return classifier


def _drive(statuses, report: Report, every: float = 1.0) -> None:
    """Run a training generator, reporting at most once per ``every`` seconds."""
    last = 0.0
    status = None
    for status in statuses:
        if time.perf_counter() - last >= every:
            last = time.perf_counter()
            report(
                f"step {status.step:6d}  loss {status.loss:.4f}  "
                f"{status.steps_per_second:5.1f} steps/s"
            )
    if status is not None:
        report(f"done: {status.step} steps, last loss {status.loss:.4f}")


def predict_files(
    model_path: str | Path,
    image_paths: Sequence[str | Path],
    output: str | Path,
    probabilities: bool = False,
    uncertainty: bool = False,
    device: str | None = None,
    channel_axis: int | None = None,
    report: Report = _silent,
    memory: int = DEFAULT_MEMORY,
    scheduler: str | None = None,
    show_progress: bool = False,
) -> list[Path]:
    """Predict each image with the model; returns the class files written.

    Images of any size are read lazily and predicted tile by tile within ``memory``
    bytes (see :mod:`napari_dsparse.large`); ``scheduler`` (``"local"`` or an
    address) runs the tiles on a dask cluster.
    """
    classifier = load_classifier(model_path, _device(device))
    targets = _output_paths(image_paths, Path(output))
    outputs = Outputs(probabilities=probabilities, uncertainty=uncertainty)
    written = []
    for image_path, classes_path in zip(image_paths, targets, strict=True):
        with progress_bar(Path(image_path).name, show_progress) as progress:
            paths = predict_file(
                classifier,
                image_path,
                classes_path,
                outputs,
                memory=memory,
                channel_axis=channel_axis,
                progress=progress,
                scheduler=scheduler,
            )
        written.append(paths[0])
        report(f"{image_path} -> {classes_path}")
    return written


def _output_paths(images: Sequence[str | Path], output: Path) -> list[Path]:
    """One .tif for a single image, else ``output/<image stem>.tif`` for each."""
    if len(images) == 1 and output.suffix.lower() in (".tif", ".tiff", ".zarr"):
        return [output]
    if output.suffix.lower() in (".tif", ".tiff"):
        raise InputError(
            f"{len(images)} images need an output folder, not the file {output}"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create output folder {output}: {error}") from error
    stems = [Path(image).stem for image in images]
    if len(set(stems)) < len(stems):
        raise InputError("two input images share a file name; outputs would collide")
    return [output / f"{stem}.tif" for stem in stems]
