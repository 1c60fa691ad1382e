"""The live loop on several images: pairs added and removed between rounds."""

from __future__ import annotations

import numpy as np

from napari_dsparse.data import as_channels_first
from napari_dsparse.live import LiveSession, Mailbox, PredictionUpdate, iter_live
from napari_dsparse.predict import iter_tiles
from napari_dsparse.train import TrainConfig

CONFIG = TrainConfig(batch_size=2, crop_size=16)


def _image(rng, shape) -> np.ndarray:
    return as_channels_first(rng.normal(size=shape).astype(np.float32))


def _strokes(shape) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[..., 2:4, 2:12] = 1
    labels[..., -5:-3, -14:-2] = 2
    return labels


def _round(session: LiveSession, mailbox: Mailbox) -> list:
    return list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))


def test_pairs_join_and_leave_the_running_loop(rng) -> None:
    view = _image(rng, (40, 50))
    other = _image(rng, (30, 70))
    session, mailbox = LiveSession(view, ("a", "b"), config=CONFIG), Mailbox()
    mailbox.post_labels(_strokes((40, 50)))
    _round(session, mailbox)
    trainer = session.trainer
    assert trainer.training_set.names == ["image"]

    mailbox.post_pair("other", other, _strokes((30, 70)))
    assert mailbox.has_new_labels()
    events = _round(session, mailbox)
    assert session.trainer is trainer  # the same trainer, warm
    assert sorted(trainer.training_set.names) == ["image", "other"]
    updates = [e for e in events if isinstance(e, PredictionUpdate)]
    assert updates and all(u.box.r1 <= 40 and u.box.c1 <= 50 for u in updates)
    assert (
        trainer.counts.sum()
        == (_strokes((40, 50)) > 0).sum() + (_strokes((30, 70)) > 0).sum()
    )

    mailbox.post_pair_removal("other")
    _round(session, mailbox)
    assert trainer.training_set.names == ["image"]


def test_added_pairs_alone_are_enough_to_train(rng) -> None:
    session, mailbox = LiveSession(_image(rng, (40, 50)), ("a", "b")), Mailbox()
    mailbox.post_labels(np.zeros((40, 50), np.uint8))  # nothing painted in view
    mailbox.post_pair("other", _image(rng, (30, 70)), _strokes((30, 70)))
    events = _round(session, mailbox)
    assert session.trainer is not None and session.trainer.steps_done > 0
    assert any(isinstance(e, PredictionUpdate) for e in events)


def test_moving_the_view_keeps_the_model_and_added_pairs(rng) -> None:
    first, second = _image(rng, (40, 50)), _image(rng, (30, 70))
    session, mailbox = LiveSession(first, ("a", "b"), config=CONFIG), Mailbox()
    session.name = "first"
    mailbox.post_labels(_strokes((40, 50)))
    mailbox.post_pair("first", first, _strokes((40, 50)))  # in the set explicitly
    _round(session, mailbox)
    moved = session.for_image("second", second)
    assert moved.classifier is session.classifier and "first" in moved.pairs
    steps = session.trainer.steps_done
    mailbox.post_labels(_strokes((30, 70)))
    _round(moved, mailbox)
    assert sorted(moved.trainer.training_set.names) == ["first", "second"]
    assert moved.trainer.steps_done > steps  # continues, not from zero

    # an image in view that was never added leaves the set when the view moves
    back = moved.for_image("third", first)
    mailbox.post_labels(_strokes((40, 50)))
    _round(back, mailbox)
    assert sorted(back.trainer.training_set.names) == ["first", "third"]


def test_each_painted_time_point_of_a_series_is_trained_on(rng) -> None:
    series = _image(rng, (4, 40, 50))  # (1, 4, 40, 50): a time series
    labels = np.zeros((4, 40, 50), np.uint8)
    labels[1], labels[3] = _strokes((40, 50)), _strokes((40, 50))
    session, mailbox = LiveSession(series, ("a", "b"), config=CONFIG), Mailbox()
    mailbox.post_labels(labels)
    _round(session, mailbox)
    units = session.trainer.training_set.painted_units
    assert [z for _, z in units] == [1, 3]
    assert all(pair.image is series for pair, _ in units)  # no copy of the image


def test_new_pixels_of_the_view_replace_its_pair_and_its_normalisation(rng) -> None:
    view, other = _image(rng, (40, 50)), _image(rng, (30, 70))
    session, mailbox = LiveSession(view, ("a", "b"), config=CONFIG), Mailbox()
    mailbox.post_labels(_strokes((40, 50)))
    mailbox.post_pair("other", other, _strokes((30, 70)))
    mailbox.post_pair("image", view, _strokes((40, 50)))  # the view is in the set
    events = _round(session, mailbox)
    trainer = session.trainer
    before = session._view_normalization[1]
    assert any(isinstance(e, PredictionUpdate) for e in events)

    brighter = view * 4 + 100
    assert session.replace_image(brighter)
    assert session.trainer is trainer  # same model and optimiser
    assert trainer.training_set["image"].image is brighter
    assert session.pairs["image"][0] is brighter
    np.testing.assert_array_equal(
        trainer.training_set["image"].labels[0], _strokes((40, 50))
    )
    session.predict(next(iter_tiles(brighter.shape[1:], 16)))
    assert session._view_normalization[1] != before  # the new pixels' own map

    assert not session.replace_image(_image(rng, (20, 20)))  # another size
    assert session.trainer is None and "image" not in session.pairs
    assert "other" in session.pairs  # the rest of the set stays
