"""Model files: round trip, and clear errors for damaged or foreign files."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_dsparse import __version__
from napari_dsparse.data import InputError, as_channels_first
from napari_dsparse.export import (
    FORMAT_VERSION,
    ModelFileError,
    classifier_to_dict,
    frozen_copy,
    load_classifier,
    save_classifier,
)
from napari_dsparse.model import Classifier
from napari_dsparse.nets import build_patch_net
from napari_dsparse.predict import predict_proba


@pytest.fixture
def image(rng) -> np.ndarray:
    return as_channels_first(rng.integers(0, 4000, (33, 29), dtype=np.uint16))


@pytest.mark.parametrize("preset", ["fast", "pixel"])
def test_round_trip_predicts_identically(
    make_classifier, image, tmp_path, preset
) -> None:
    classifier = make_classifier(image, num_classes=3, seed=4, preset=preset)
    classifier.fit_feature_scale(image)  # its fitted buffers travel with the file
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


def test_a_snapshot_is_saved_instead_of_the_live_weights(
    make_classifier, image, tmp_path
) -> None:
    classifier = make_classifier(image)
    before = predict_proba(classifier, image)
    snapshot = SimpleNamespace(
        model_state={
            k: v.clone() for k, v in classifier.patch_net.state_dict().items()
        },
        steps_done=7,
    )
    frozen = frozen_copy(classifier, snapshot)
    with torch.no_grad():  # training goes on in the live model
        for parameter in classifier.patch_net.parameters():
            parameter.add_(0.5)
    assert not np.allclose(predict_proba(classifier, image), before, atol=1e-3)
    np.testing.assert_array_equal(predict_proba(frozen, image), before)
    loaded = load_classifier(save_classifier(classifier, tmp_path / "m.pt", snapshot))
    assert loaded.provenance["steps"] == 7
    np.testing.assert_allclose(predict_proba(loaded, image), before, atol=1e-6)


def test_a_snapshot_of_another_shape_is_refused(make_classifier, image) -> None:
    three = make_classifier(image, num_classes=3)
    snapshot = SimpleNamespace(
        model_state=make_classifier(image).patch_net.state_dict(), steps_done=1
    )
    with pytest.raises(InputError, match="gained a class meanwhile"):
        classifier_to_dict(three, snapshot)


def test_saving_leaves_no_temporary_files(make_classifier, image, tmp_path) -> None:
    save_classifier(make_classifier(image), tmp_path / "model.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_written_files_get_the_permissions_a_plain_write_gives(
    make_classifier, image, tmp_path
) -> None:
    classifier, path = make_classifier(image), tmp_path / "model.pt"
    previous = os.umask(0o027)
    try:
        save_classifier(classifier, path)
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not a temporary file's 0o600
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode
    path.chmod(0o604)
    save_classifier(classifier, path)  # a replaced file keeps its permissions
    assert stat.S_IMODE(path.stat().st_mode) == 0o604


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


def test_file_holds_colours_receptive_field_and_provenance(
    make_classifier, image, tmp_path
) -> None:
    classifier = make_classifier(image, num_classes=3)
    classifier.class_colors = ((1.0, 0.0, 0.0, 1.0),)  # one given, two defaulted
    classifier.provenance.update(steps=7, seed=3)
    loaded = load_classifier(save_classifier(classifier, tmp_path / "m.pt"))
    assert loaded.colors() == classifier.colors()
    assert loaded.colors()[0] == (1.0, 0.0, 0.0, 1.0)
    assert len(set(loaded.colors())) == 3
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["receptive_field"] == classifier.patch_size
    assert payload["halo"] == classifier.patch_size // 2
    assert payload["provenance"]["steps"] == 7
    assert payload["provenance"]["seed"] == 3
    assert payload["provenance"]["package_version"] == __version__


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 100])
def test_corrupt_model_file(tmp_path, content) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_classifier(tmp_path / "bad.pt")


def test_weights_of_the_wrong_shape(make_classifier, image, tmp_path) -> None:
    payload = classifier_to_dict(make_classifier(image))
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = torch.zeros(1)
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match="not a valid model file"):
        load_classifier(tmp_path / "m.pt")


def test_model_without_a_format_version(make_classifier, image, tmp_path) -> None:
    payload = classifier_to_dict(make_classifier(image))
    payload["format_version"] = "one"
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match="format version"):
        load_classifier(tmp_path / "m.pt")


def test_a_model_file_whose_weights_do_not_fit_is_one_line(
    make_classifier, image, tmp_path
) -> None:
    path = save_classifier(make_classifier(image), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["in_channels"] += 2  # the layers then expect 3 channels
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="size mismatch for") as error:
        load_classifier(path)
    assert "\n" not in str(error.value)
    payload["in_channels"] -= 2
    del payload["normalization"]
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=r"\(no 'normalization'\)"):
        load_classifier(path)


def test_a_full_disk_leaves_no_model_file(
    make_classifier, image, tmp_path, monkeypatch
) -> None:
    write_bytes = Path.write_bytes

    def full_disk(path, data) -> None:
        write_bytes(path, bytes(data)[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(InputError, match="disk is full"):
        save_classifier(make_classifier(image), tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_files_from_before_the_feature_scale_load_unchanged(
    make_classifier, image, tmp_path
) -> None:
    classifier = make_classifier(image, seed=2)
    classifier = Classifier(
        replace(classifier.preset, standardize=False),
        classifier.in_channels,
        classifier.class_names,
        classifier.normalization,
        build_patch_net(replace(classifier.preset, standardize=False), 1, 2),
    )
    path = save_classifier(classifier, tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    del payload["preset"]["standardize"]  # as written before the field existed
    torch.save(payload, path)
    loaded = load_classifier(path)
    assert loaded.feature_scale() is None
    np.testing.assert_allclose(
        predict_proba(loaded, image), predict_proba(classifier, image), atol=1e-6
    )


def test_files_from_before_the_invariant_gain_load_with_gain_one(
    make_classifier, image, tmp_path
) -> None:
    classifier = make_classifier(image, seed=3, preset="pixel")
    assert classifier.preset.invariant_gain == 2.0
    path = save_classifier(classifier, tmp_path / "new.pt")
    assert load_classifier(path).preset == classifier.preset
    old_preset = replace(classifier.preset, invariant_gain=1.0)
    old_net = build_patch_net(old_preset, 1, 2)
    old_net.load_state_dict(classifier.patch_net.state_dict())  # same weights
    old = Classifier(
        old_preset,
        classifier.in_channels,
        classifier.class_names,
        classifier.normalization,
        old_net,
    )
    path = save_classifier(old, tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    del payload["preset"]["invariant_gain"]  # as written before the field existed
    torch.save(payload, path)
    loaded = load_classifier(path)
    assert loaded.preset.invariant_gain == 1.0
    np.testing.assert_allclose(
        predict_proba(loaded, image), predict_proba(old, image), atol=1e-6
    )
    assert not np.allclose(  # the gain alone changes the prediction
        predict_proba(loaded, image), predict_proba(classifier, image), atol=1e-3
    )


def test_the_class_prior_is_saved_and_older_files_load_without_one(
    make_classifier, image, tmp_path
) -> None:
    classifier = make_classifier(image, seed=2)
    classifier.class_prior().log_ratio.copy_(torch.tensor([1.5, -0.5]))
    loaded = load_classifier(save_classifier(classifier, tmp_path / "model.pt"))
    torch.testing.assert_close(
        loaded.class_prior().log_ratio, torch.tensor([1.5, -0.5])
    )
    np.testing.assert_allclose(
        predict_proba(loaded, image), predict_proba(classifier, image), atol=1e-6
    )
    path = tmp_path / "old.pt"
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    names = [k for k in payload["state_dict"] if k.endswith("log_ratio")]
    assert len(names) == 1
    del payload["state_dict"][names[0]]  # as written before the class prior
    torch.save(payload, path)
    old = load_classifier(path)
    assert old.class_prior().log_ratio.abs().max() == 0
    classifier.class_prior().log_ratio.zero_()
    np.testing.assert_allclose(
        predict_proba(old, image), predict_proba(classifier, image), atol=1e-6
    )
