"""bioimage.io packages: valid, tested by bioimageio.core, exact like the model file."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_dsparse.bioimageio_export import (
    PixelProbabilities,
    export_bioimageio,
    preprocess,
)
from napari_dsparse.data import InputError, as_channels_first
from napari_dsparse.export import save_classifier
from napari_dsparse.predict import predict_proba

pytest.importorskip("bioimageio.core")


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BIOIMAGEIO_CACHE_PATH", str(tmp_path / "cache"))


@pytest.fixture
def classifier(make_classifier, rng):
    image = as_channels_first(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    classifier = make_classifier(image, num_classes=3, seed=7)
    classifier.provenance.update(steps=11, seed=7)
    classifier.class_prior().log_ratio.copy_(torch.tensor([0.7, -1.2, 0.3]))
    return classifier


def test_package_passes_the_bioimageio_model_test(classifier, tmp_path) -> None:
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    model_file = save_classifier(classifier, tmp_path / "model.pt")
    package = export_bioimageio(model_file, tmp_path / "model.zip")
    summary = test_model(package)
    assert summary.status == "passed", summary.format()
    description = load_description(package)
    settings = description.config.model_extra["napari-dsparse"]
    assert settings["class_names"] == list(classifier.class_names)
    assert settings["class_colors"] == [list(c) for c in classifier.colors()]
    assert settings["provenance"]["steps"] == 11
    [output] = description.outputs
    assert [axis.halo for axis in output.axes[2:]] == [classifier.halo] * 2
    import zipfile

    with zipfile.ZipFile(package) as archive:
        assert {"cover.png", "README.md", "weights_torchscript.pt"} <= set(
            archive.namelist()
        )


@pytest.mark.parametrize("policy", ["per_image", "fixed"])
def test_torchscript_weights_equal_the_model_at_any_size(
    classifier, rng, tmp_path, policy
) -> None:
    import zipfile

    classifier.normalization = replace(classifier.normalization, policy=policy)
    package = export_bioimageio(classifier, tmp_path / "model.zip")
    with zipfile.ZipFile(package) as archive:
        archive.extract("weights_torchscript.pt", tmp_path)
    scripted = torch.jit.load(str(tmp_path / "weights_torchscript.pt"))
    # another brightness and contrast than the training image's
    image = rng.integers(0, 255, (3, 1, 53, 70)).astype(np.float32) * 3 + 500
    raw = image[:, 0][None]  # (B, C, Y, X)
    with torch.inference_mode():
        proba = scripted(torch.from_numpy(preprocess(classifier, raw)))[0].numpy()
    np.testing.assert_allclose(proba, predict_proba(classifier, image)[:, 0], atol=1e-5)


def test_per_image_models_declare_scale_range_per_sample(classifier, tmp_path) -> None:
    from bioimageio.spec import load_description

    assert classifier.normalization.policy == "per_image"
    description = load_description(export_bioimageio(classifier, tmp_path / "a.zip"))
    [step] = [p for p in description.inputs[0].preprocessing if p.id == "scale_range"]
    assert [str(axis) for axis in step.kwargs.axes] == ["y", "x"]  # not the batch
    low, high = classifier.normalization.percentiles
    assert (step.kwargs.min_percentile, step.kwargs.max_percentile) == (low, high)

    classifier.normalization = replace(classifier.normalization, policy="fixed")
    description = load_description(export_bioimageio(classifier, tmp_path / "b.zip"))
    assert all(p.id != "scale_range" for p in description.inputs[0].preprocessing)


def test_bioimageio_core_predicts_like_the_model_file_per_image(
    classifier, rng, tmp_path
) -> None:
    """bioimage.io.core's own pipeline (preprocessing + weights) on a new image.

    The pipeline's numbers differ from a direct call of the same weights by a few
    1e-4 (also for fixed normalisation); without the per-sample preprocessing they
    would differ by more than 0.5.
    """
    from bioimageio.core import create_prediction_pipeline, load_description
    from bioimageio.core.digest_spec import create_sample_for_model

    description = load_description(export_bioimageio(classifier, tmp_path / "m.zip"))
    image = rng.normal(4000, 900, (3, 1, 50, 61)).astype(np.float32)  # (C, Z, Y, X)
    with create_prediction_pipeline(description) as pipeline:
        sample = create_sample_for_model(  # a copy: preprocessing works in place
            description, inputs={"raw": image[:, 0][None].copy()}, sample_id="new"
        )
        result = pipeline.predict_sample_without_blocking(sample)
    proba = np.asarray(result.members["probabilities"].data)[0]
    np.testing.assert_allclose(proba, predict_proba(classifier, image)[:, 0], atol=2e-3)


def test_the_exported_module_tiles_exactly_with_the_declared_halo(
    classifier, rng
) -> None:
    module = PixelProbabilities(classifier).eval()
    image = torch.from_numpy(rng.normal(size=(1, 3, 60, 60)).astype(np.float32))
    halo = classifier.halo
    with torch.inference_mode():
        whole = module(image)
        tile = module(image[..., : 30 + halo, :])  # the top half plus one halo
    torch.testing.assert_close(tile[..., :30, :], whole[..., :30, :], atol=1e-5, rtol=0)


def test_package_name_must_end_in_zip(classifier, tmp_path) -> None:
    with pytest.raises(InputError, match=r"ends in \.zip"):
        export_bioimageio(classifier, tmp_path / "model.bioimage")
    with pytest.raises(InputError, match=r"ends in \.zip, not \.$"):  # not ''
        export_bioimageio(classifier, ".")


def test_the_packages_folder_is_checked_before_the_model_is_read(
    classifier, tmp_path, monkeypatch
) -> None:
    from napari_dsparse import bioimageio_export

    def no_loading(*_args, **_kwargs):
        raise AssertionError("read the model before the output folder was checked")

    monkeypatch.setattr(bioimageio_export, "load_classifier", no_loading)
    output = tmp_path / "missing" / "model.zip"
    with pytest.raises(InputError, match=r"folder .*missing does not exist"):
        export_bioimageio(tmp_path / "model.pt", output)
