"""A session saved to one file comes back exactly and trains on where it stopped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_dsparse.data import InputError
from napari_dsparse.export import load_classifier
from napari_dsparse.live import LiveSession, Mailbox, iter_live
from napari_dsparse.predict import predict_proba
from napari_dsparse.session import load_session, restore_session, save_session
from napari_dsparse.train import TrainConfig


def _trained(rng) -> tuple[LiveSession, np.ndarray]:
    image = rng.normal(size=(1, 1, 40, 50)).astype(np.float32)
    labels = np.zeros((40, 50), np.uint8)
    labels[2:4, 2:20], labels[30:33, 30:45] = 1, 2
    session = LiveSession(
        image, ("bg", "fg"), config=TrainConfig(learning_rate=2e-3, seed=7)
    )
    mailbox = Mailbox()
    mailbox.post_labels(labels)
    list(iter_live(session, mailbox, round_seconds=0.1, rounds=1))
    return session, labels


def test_a_restored_session_predicts_identically_and_trains_on_alike(
    rng, tmp_path
) -> None:
    session, labels = _trained(rng)
    path = save_session(tmp_path / "s.pt", session, labels, {"autosave": 5})
    steps = session.trainer.steps_done
    continued = [session.trainer.step()[0] for _ in range(5)]
    saved = load_session(path)
    restored = restore_session(saved, session.image.copy())
    assert restored.trainer.steps_done == steps
    assert restored.class_names == ("bg", "fg") and saved.settings == {"autosave": 5}
    assert restored.config == session.config
    np.testing.assert_array_equal(saved.scribbles, labels)
    assert saved.scribbles.dtype == labels.dtype
    # the saved model, not the one trained on since
    fresh = load_session(path).classifier
    np.testing.assert_array_equal(
        predict_proba(restored.classifier, restored.image),
        predict_proba(fresh, restored.image),
    )
    resumed = [restored.trainer.step()[0] for _ in range(5)]
    assert resumed == continued  # same optimiser moments, sampler and weights
    np.testing.assert_array_equal(
        predict_proba(restored.classifier, restored.image),
        predict_proba(session.classifier, session.image),
    )


def test_a_session_file_is_also_a_model_file(rng, tmp_path) -> None:
    session, labels = _trained(rng)
    path = save_session(tmp_path / "s.pt", session, labels)
    model = load_classifier(path)
    assert model.class_names == ("bg", "fg")
    assert model.provenance["steps"] == session.trainer.steps_done


def test_a_checkpoint_taken_earlier_is_what_gets_saved(rng, tmp_path) -> None:
    session, labels = _trained(rng)
    checkpoint = session.last_good
    session.trainer.step()  # the worker trains on while the GUI saves
    path = save_session(tmp_path / "s.pt", session, labels, checkpoint=checkpoint)
    restored = restore_session(load_session(path), session.image)
    assert restored.trainer.steps_done == checkpoint.steps_done
    for name, value in restored.classifier.patch_net.state_dict().items():
        torch.testing.assert_close(value, checkpoint.model_state[name], rtol=0, atol=0)


def test_a_session_without_a_model_keeps_scribbles_and_names(rng, tmp_path) -> None:
    image = rng.normal(size=(1, 3, 20, 20))
    session = LiveSession(image, ("a", "b", "c"))
    scribbles = np.zeros((3, 20, 20), np.int32)
    scribbles[1, 2:5, 2:5] = 3
    saved = load_session(save_session(tmp_path / "s.pt", session, scribbles))
    assert saved.classifier is None and saved.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(saved.scribbles, scribbles)
    assert saved.scribbles.dtype == np.int32
    assert restore_session(saved, image).classifier is None


def test_restoring_onto_another_image_is_refused(rng, tmp_path) -> None:
    session, labels = _trained(rng)
    saved = load_session(save_session(tmp_path / "s.pt", session, labels))
    with pytest.raises(InputError, match="saved for an image of shape"):
        restore_session(saved, rng.normal(size=(3, 1, 40, 50)))


def test_bad_session_files_are_input_errors(rng, tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_session(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a session")
    with pytest.raises(InputError, match="not a readable session"):
        load_session(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a napari-dsparse session"):
        load_session(tmp_path / "other.pt")


def test_saving_is_atomic(rng, tmp_path, monkeypatch) -> None:
    session, labels = _trained(rng)
    path = save_session(tmp_path / "s.pt", session, labels)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="not a plain value"):
        save_session(path, session, labels, settings={"bad": object()})

    def disk_full(temporary, _data):
        with open(temporary, "wb") as handle:
            handle.write(b"half a fi")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(InputError, match="disk is full"):
        save_session(path, session, labels)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]
    with pytest.raises(InputError, match="does not exist"):
        save_session(tmp_path / "no" / "s.pt", session, labels)


def test_a_training_set_is_saved_by_name_and_scribbles_and_restored(
    rng, tmp_path
) -> None:
    from napari_dsparse.session import missing_pairs

    view = rng.normal(size=(1, 1, 40, 50)).astype(np.float32)
    other = rng.normal(size=(1, 1, 30, 60)).astype(np.float32)
    view_labels = np.zeros((40, 50), np.uint8)
    view_labels[2:4, 2:20] = 1
    other_labels = np.zeros((30, 60), np.uint8)
    other_labels[3:5, 3:30], other_labels[20:23, 30:50] = 1, 2
    session = LiveSession(view, ("bg", "fg"), config=TrainConfig(seed=3), name="v")
    mailbox = Mailbox()
    mailbox.post_labels(view_labels)
    mailbox.post_pair("other", other, other_labels)
    mailbox.post_pair("v", view, view_labels)  # the view is one of the set too
    list(iter_live(session, mailbox, round_seconds=0.1, rounds=1))
    assert sorted(session.trainer.training_set.names) == ["other", "v"]
    path = save_session(tmp_path / "s.pt", session, view_labels)
    continued = [session.trainer.step()[0] for _ in range(3)]

    saved = load_session(path)
    assert saved.name == "v" and saved.in_set
    [pair] = saved.pairs
    assert (pair.name, pair.image_shape) == ("other", (1, 1, 30, 60))
    np.testing.assert_array_equal(pair.scribbles, other_labels[None])
    assert missing_pairs(saved, {}) == ["other"]
    assert missing_pairs(saved, {"other": other[:, :, :20]}) == ["other"]  # shape

    restored = restore_session(saved, view.copy(), pair_images={"other": other})
    assert sorted(restored.trainer.training_set.names) == ["other", "v"]
    assert "v" in restored.pairs and "other" in restored.pairs
    resumed = [restored.trainer.step()[0] for _ in range(3)]
    assert resumed == continued  # the same set, moments, sampler and weights

    alone = restore_session(load_session(path), view.copy())  # other not open
    assert alone.trainer is None  # one class in view: waits for more strokes
    assert alone.classifier is not None and "v" in alone.pairs
