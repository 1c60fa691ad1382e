"""The live loop without Qt: snapshots, rounds, preview order, growing classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_dsparse import live
from napari_dsparse.data import as_channels_first
from napari_dsparse.live import (
    LiveSession,
    Mailbox,
    PredictionUpdate,
    PreviewSweep,
    Waiting,
    cpu_threads_for_live_training,
    iter_live,
    preview_boxes,
    volume_boxes,
)
from napari_dsparse.predict import Box, labels_and_uncertainty, predict_proba
from napari_dsparse.train import TrainStatus


def test_mailbox_hands_over_copies_with_versions() -> None:
    """The worker copies the labels when it takes them: the GUI thread only posts."""
    mailbox = Mailbox()
    labels = np.ones((3, 3), np.uint8)
    assert mailbox.post_labels(labels) == 1
    labels[0] = 7  # painted before the worker took them: included
    taken, version = mailbox.take_labels()
    assert version == 1 and (taken[0] == 7).all() and (taken[1:] == 1).all()
    labels[:] = 9  # painted after: the worker's copy is its own
    assert (taken[1:] == 1).all()
    assert mailbox.take_labels() is None and not mailbox.has_new_labels()


def test_preview_covers_the_slice_once_with_the_view_first() -> None:
    shape = (3, 600, 700)
    view = Box(0, 100, 400, 50, 300)
    boxes = list(preview_boxes(shape, view, 2))
    covered = np.zeros(shape[1:], int)
    for box in boxes:
        assert box.z == 2
        covered[box.r0 : box.r1, box.c0 : box.c1] += 1
    assert (covered == 1).all()
    first = boxes[0]
    assert (first.r0, first.c0) == (100, 50)
    in_view = boxes[:2]  # 300 x 250 in tiles of 256: two tiles
    assert all(
        b.r0 >= 100 and b.r1 <= 400 and b.c0 >= 50 and b.c1 <= 300 for b in in_view
    )
    assert sum((b.r1 - b.r0) * (b.c1 - b.c0) for b in in_view) == 300 * 250


def test_a_volume_sweep_covers_its_slices_nearest_first() -> None:
    shape = (8, 300, 280)  # two time points of four planes, merged
    boxes = list(volume_boxes(shape, range(4, 8), 5))
    covered = np.zeros(shape, int)
    for box in boxes:
        covered[box.z, box.r0 : box.r1, box.c0 : box.c1] += 1
    assert (covered[4:] == 1).all() and not covered[:4].any()
    slices = list(dict.fromkeys(box.z for box in boxes))
    assert slices == [5, 4, 6, 7]


def test_the_pass_goes_on_across_calls_and_restarts_for_a_new_key() -> None:
    sweep, shape = PreviewSweep(), (3, 40, 50)

    def boxes():
        return volume_boxes(shape, range(3), 1)

    assert [sweep.take("a", boxes).z for _ in range(2)] == [1, 0]
    assert sweep.take("a", boxes).z == 2  # the same pass goes on
    assert sweep.take("a", boxes) is None  # done: the next call begins another
    assert sweep.take("a", boxes).z == 1
    assert sweep.take("b", boxes).z == 1  # another key: from the start


def _session(rng, classes=("bg", "fg")) -> tuple[LiveSession, np.ndarray]:
    image = as_channels_first(rng.normal(size=(40, 50)).astype(np.float32))
    labels = np.zeros((40, 50), np.uint8)
    labels[2:4, 2:20], labels[30:33, 30:45] = 1, 2
    return LiveSession(image, classes), labels


def test_without_paint_the_loop_waits(rng) -> None:
    session, labels = _session(rng)
    mailbox = Mailbox()
    mailbox.post_labels(np.zeros_like(labels))
    assert isinstance(next(iter_live(session, mailbox)), Waiting)


def test_a_round_trains_then_predicts_the_whole_slice(rng) -> None:
    session, labels = _session(rng)
    mailbox = Mailbox()
    mailbox.post_labels(labels)
    events = list(iter_live(session, mailbox, round_seconds=0.2, rounds=1))
    statuses = [e for e in events if isinstance(e, TrainStatus)]
    updates = [e for e in events if isinstance(e, PredictionUpdate)]
    assert statuses and updates and isinstance(events[-1], PredictionUpdate)
    assert statuses[-1].painted == (int((labels == 1).sum()), int((labels == 2).sum()))
    whole = predict_proba(session.classifier, session.image)[:, 0]
    expected, _ = labels_and_uncertainty(whole)
    shown = np.zeros(labels.shape, np.uint8)
    for update in updates:
        box = update.box
        shown[box.r0 : box.r1, box.c0 : box.c1] = update.classes
    np.testing.assert_array_equal(shown, expected)


def test_a_volume_on_screen_is_predicted_slice_by_slice(rng) -> None:
    """In napari's 3D display the preview covers the volume, not one slice."""
    image = as_channels_first(rng.normal(size=(4, 40, 50)).astype(np.float32))
    labels = np.zeros((4, 40, 50), np.uint8)
    labels[1, 2:4, 2:20], labels[1, 30:33, 30:45] = 1, 2
    session, mailbox = LiveSession(image, ("bg", "fg")), Mailbox()
    mailbox.post_labels(labels)
    mailbox.post_view(None, 2, volume=range(4))
    events = list(iter_live(session, mailbox, round_seconds=0.3, rounds=1))
    updates = [e for e in events if isinstance(e, PredictionUpdate)]
    assert [update.box.z for update in updates] == [2, 1, 3, 0]
    whole = predict_proba(session.classifier, session.image)
    expected, _ = labels_and_uncertainty(whole)
    for update in updates:
        np.testing.assert_array_equal(update.classes, expected[update.box.z])
    labels = labels.copy()
    labels[3, 20:22, 5:30] = 2  # a stroke on plane 3: the next pass begins there
    mailbox.post_labels(labels)
    events = list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    planes = [e.box.z for e in events if isinstance(e, PredictionUpdate)]
    assert planes == [3, 2, 1, 0]
    mailbox.post_view(None, 2)  # back to 2D: the slice on screen only
    events = list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    assert {e.box.z for e in events if isinstance(e, PredictionUpdate)} == {2}


def test_live_rounds_predict_a_bounded_part_and_go_on_from_there(
    rng, monkeypatch
) -> None:
    """A large image must not starve training: each live round predicts for at
    most PREVIEW_SECONDS (here: one tile), and the next goes on where it stopped;
    new strokes begin a new pass at the view."""
    monkeypatch.setattr(live, "PREVIEW_SECONDS", 0.0)
    image = as_channels_first(rng.normal(size=(600, 560)).astype(np.float32))
    labels = np.zeros((600, 560), np.uint8)
    labels[2:4, 2:20], labels[300:303, 300:345] = 1, 2
    session, mailbox = LiveSession(image, ("bg", "fg")), Mailbox()
    mailbox.post_labels(labels)
    view = Box(0, 256, 600, 0, 560)
    mailbox.post_view(view, 0)
    order = list(preview_boxes((1, 600, 560), view, 0))
    shown: list[tuple[Box, bool]] = []  # (box, training ran since the last one)
    trained = False
    for event in iter_live(session, mailbox, round_seconds=0.02):
        if isinstance(event, TrainStatus):
            trained = True
        elif isinstance(event, PredictionUpdate):
            shown.append((event.box, trained))
            trained = False
            if len(shown) == 3:
                mailbox.post_labels(labels)  # a new snapshot (version) restarts
            if len(shown) == 5:
                break
    boxes = [box for box, _ in shown]
    assert boxes == [*order[:3], *order[:2]]
    assert all(since for _, since in shown)  # one tile a round, training between


def test_the_pass_after_a_stroke_begins_at_the_stroke(rng) -> None:
    """On a view of many tiles the strokes' surroundings are shown first."""
    image = as_channels_first(rng.normal(size=(600, 560)).astype(np.float32))
    labels = np.zeros((600, 560), np.uint8)
    labels[2:4, 2:20], labels[30:33, 30:45] = 1, 2
    session, mailbox = LiveSession(image, ("bg", "fg")), Mailbox()
    mailbox.post_labels(labels)
    mailbox.post_view(Box(0, 0, 600, 0, 560), 0)
    first = next(
        e for e in iter_live(session, mailbox) if isinstance(e, PredictionUpdate)
    )
    assert (first.box.r0, first.box.c0) == (0, 0)  # no stroke to follow: in order
    labels = labels.copy()
    labels[540:545, 500:530] = 2  # a stroke in the bottom-right tile
    mailbox.post_labels(labels)
    update = next(
        e for e in iter_live(session, mailbox) if isinstance(e, PredictionUpdate)
    )
    assert session.last_stroke == (0, 542, 514)
    assert (update.box.r0, update.box.c0) == (512, 512)


def test_the_stroke_centre_in_a_volume_is_the_median_of_every_change(rng) -> None:
    """Only slices that changed are searched; the centre must be that of them all."""
    image = as_channels_first(rng.normal(size=(9, 40, 50)).astype(np.float32))
    labels = np.zeros((9, 40, 50), np.uint8)
    labels[1, 2:5, 2:30], labels[1, 20:25, 5:40] = 1, 2
    session = LiveSession(image, ("bg", "fg"))
    session.set_labels(labels.copy(), 1)
    labels[[2, 5, 6]] = rng.choice([0, 1, 2], p=[0.9, 0.05, 0.05], size=(3, 40, 50))
    labels[1, 2, 2] = 0  # an erased pixel is a change too
    before = session._labels
    session.set_labels(labels.copy(), 2)
    changed = np.nonzero(before != labels)
    assert session.last_stroke == tuple(int(np.median(axis)) for axis in changed)


def test_new_strokes_interrupt_the_preview(rng) -> None:
    session, _ = _session(rng)
    session.image = as_channels_first(rng.normal(size=(700, 700)).astype(np.float32))
    big = np.zeros((700, 700), np.uint8)
    big[5:8, 5:50], big[600:603, 600:650] = 1, 2
    mailbox = Mailbox()
    mailbox.post_labels(big)
    loop = iter_live(session, mailbox, round_seconds=0.05)
    event = next(loop)
    while not isinstance(event, PredictionUpdate):
        event = next(loop)
    big[300:303, 300:340] = 2
    mailbox.post_labels(big)
    following = next(loop)
    assert isinstance(following, TrainStatus)
    assert following.painted[1] == int((big == 2).sum())


def test_painting_a_new_class_grows_the_model(rng) -> None:
    session, labels = _session(rng)
    mailbox = Mailbox()
    mailbox.post_labels(labels)
    list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    head_before = session.classifier.patch_net[-2].weight.detach().clone()
    labels[15:17, 10:30] = 3
    mailbox.post_labels(labels)
    list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    assert session.class_names == ("bg", "fg", "class 3")
    head_after = session.classifier.patch_net[-2].weight.detach()
    assert head_after.shape[0] == 3
    assert not torch.equal(head_after[:2], torch.zeros_like(head_before))
    assert session.classifier.class_prior().log_ratio.shape == (3,)
    assert session.trainer.counts.tolist()[2] == int((labels == 3).sum())


def test_the_learning_rate_can_change_between_rounds(rng) -> None:
    session, labels = _session(rng)
    mailbox = Mailbox()
    mailbox.post_labels(labels)
    list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    session.set_learning_rate(3e-4)
    trainer = session.trainer
    decay = 0.5 ** (trainer.steps_on_labels / trainer.config.lr_half_life)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-4 * decay)
    assert session.config.learning_rate == trainer.config.learning_rate == 3e-4


def test_the_prior_strength_can_change_between_rounds(rng) -> None:
    session, labels = _session(rng)
    mailbox = Mailbox()
    mailbox.post_labels(labels)
    list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    shift = session.classifier.class_prior().log_ratio
    assert shift.abs().sum() > 0  # the default strength moved the prior
    session.set_prior_strength(0.0)
    assert session.config.prior_strength == session.trainer.config.prior_strength == 0
    list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    assert not session.classifier.class_prior().log_ratio.any()
    with pytest.raises(ValueError, match="prior_strength must be between 0 and 1"):
        session.set_prior_strength(2.0)


def test_live_training_leaves_a_core_for_the_gui() -> None:
    assert cpu_threads_for_live_training(2) == 1
    assert cpu_threads_for_live_training(8) == 7
    assert cpu_threads_for_live_training(1) == 1
