"""Model files: round trip, and clear errors for damaged or foreign files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_dsparse.data import InputError, as_channels_first
from napari_dsparse.export import (
    FORMAT_VERSION,
    ModelFileError,
    classifier_to_dict,
    load_classifier,
    save_classifier,
)
from napari_dsparse.predict import predict_proba


@pytest.fixture
def image(rng) -> np.ndarray:
    return as_channels_first(rng.integers(0, 4000, (33, 29), dtype=np.uint16))


def test_round_trip_predicts_identically(make_classifier, image, tmp_path) -> None:
    classifier = make_classifier(image, num_classes=3, seed=4)
    classifier.provenance.update(steps=12, seed=4)
    path = save_classifier(classifier, tmp_path / "model.pt")
    loaded = load_classifier(path)
    assert loaded.class_names == classifier.class_names
    assert loaded.normalization == classifier.normalization
    assert loaded.preset == classifier.preset
    assert loaded.provenance["steps"] == 12
    np.testing.assert_allclose(
        predict_proba(loaded, image), predict_proba(classifier, image), atol=1e-6
    )


def test_saving_leaves_no_temporary_files(make_classifier, image, tmp_path) -> None:
    save_classifier(make_classifier(image), tmp_path / "model.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_missing_model_file(tmp_path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        load_classifier(tmp_path / "nothing.pt")


def test_truncated_model_file(make_classifier, image, tmp_path) -> None:
    path = save_classifier(make_classifier(image), tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_classifier(path)


def test_model_from_a_newer_version(make_classifier, image, tmp_path) -> None:
    payload = classifier_to_dict(make_classifier(image))
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "new.pt")
    with pytest.raises(ModelFileError, match="newer napari-dsparse"):
        load_classifier(tmp_path / "new.pt")


def test_foreign_file(tmp_path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not a napari-dsparse model"):
        load_classifier(tmp_path / "other.pt")


def test_unwritable_folder(make_classifier, image, tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        save_classifier(make_classifier(image), tmp_path / "missing" / "model.pt")
