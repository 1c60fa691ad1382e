"""Faults in the live loop: divergence rolls back, out of memory shrinks the work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_dsparse.faults as faults
import napari_dsparse.live as live
from napari_dsparse.faults import Checkpoint, has_diverged, smaller_config
from napari_dsparse.live import (
    LiveSession,
    Mailbox,
    Notice,
    PredictionUpdate,
    TrainingPaused,
    iter_live,
)
from napari_dsparse.predict import Box
from napari_dsparse.train import TrainConfig, Trainer, TrainStatus


def _session(rng, **config) -> tuple[LiveSession, Mailbox]:
    image = rng.normal(size=(1, 1, 40, 50)).astype(np.float32)
    labels = np.zeros((40, 50), np.uint8)
    labels[2:4, 2:20], labels[30:33, 30:45] = 1, 2
    session = LiveSession(image, ("bg", "fg"), config=TrainConfig(**config))
    mailbox = Mailbox()
    mailbox.post_labels(labels)
    return session, mailbox


def _weights(session: LiveSession) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in session.classifier.patch_net.state_dict().items()}


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_a_diverging_loss_pauses_and_restores_the_last_good_model(rng) -> None:
    session, mailbox = _session(rng)
    list(iter_live(session, mailbox, round_seconds=0.1, rounds=1))
    good, good_steps = _weights(session), session.trainer.steps_done
    session.set_learning_rate(1e9)  # the user's mistake
    events = list(iter_live(session, mailbox, round_seconds=5.0))  # ends by itself
    paused = events[-1]
    assert isinstance(paused, TrainingPaused)
    assert paused.step == good_steps and "learning rate" in paused.message
    assert session.trainer.steps_done == good_steps
    _assert_same_weights(_weights(session), good)
    assert not any(isinstance(e, PredictionUpdate) for e in events)


def test_after_a_rollback_training_resumes_with_a_sane_rate(rng) -> None:
    session, mailbox = _session(rng)
    session.set_learning_rate(1e9)
    assert isinstance(list(iter_live(session, mailbox, 5.0))[-1], TrainingPaused)
    session.set_learning_rate(1e-3)
    events = list(iter_live(session, mailbox, round_seconds=0.1, rounds=1))
    losses = [e.loss for e in events if isinstance(e, TrainStatus)]
    assert losses and np.isfinite(losses).all()
    assert isinstance(events[-1], PredictionUpdate)


def test_nan_weights_with_a_finite_loss_count_as_divergence(rng) -> None:
    session, mailbox = _session(rng)
    list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    good = _weights(session)
    original = Trainer.step

    def poisoned_step(trainer: Trainer):
        result = original(trainer)
        with torch.no_grad():
            next(trainer.classifier.patch_net.parameters()).view(-1)[0] = np.nan
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "step", poisoned_step)
        events = list(iter_live(session, mailbox, round_seconds=5.0))
    assert isinstance(events[-1], TrainingPaused)
    _assert_same_weights(_weights(session), good)


def test_divergence_thresholds() -> None:
    net = torch.nn.Linear(2, 2)
    assert not has_diverged(3.0, net)
    assert has_diverged(float("nan"), net) and has_diverged(1e4, net)


def test_checkpoints_are_copies_that_restore_exactly(rng) -> None:
    session, mailbox = _session(rng)
    list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    trainer = session.trainer
    checkpoint = Checkpoint.of(trainer)
    before = _weights(session)
    next_losses = [trainer.step()[0] for _ in range(3)]
    checkpoint.restore(trainer)
    _assert_same_weights(_weights(session), before)
    assert [trainer.step()[0] for _ in range(3)] == next_losses


def _raise_out_of_memory(times: int, original):
    calls = {"left": times}

    def step(*args, **kwargs):
        if calls["left"] > 0:
            calls["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return original(*args, **kwargs)

    return step


def test_out_of_memory_in_training_shrinks_the_batch(rng, monkeypatch) -> None:
    session, mailbox = _session(rng)
    monkeypatch.setattr(Trainer, "step", _raise_out_of_memory(2, Trainer.step))
    events = list(iter_live(session, mailbox, round_seconds=0.1, rounds=1))
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert notices == [
        "out of memory: training on smaller batches (4 crops of 64 px)",
        "out of memory: training on smaller batches (2 crops of 64 px)",
    ]
    assert session.trainer.config.batch_size == 2 and session.config.batch_size == 2
    assert isinstance(events[-1], PredictionUpdate)


def test_out_of_memory_with_minimal_batches_moves_to_the_cpu(rng, monkeypatch) -> None:
    session, mailbox = _session(rng, batch_size=1, crop_size=16)
    list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    moved, where = [], [torch.device("cuda")]  # pretend the model is on a GPU

    def move(_trainer, device):
        moved.append(device)
        where[0] = torch.device(device)

    monkeypatch.setattr(live, "move_trainer", move)
    monkeypatch.setattr(Trainer, "step", _raise_out_of_memory(1, Trainer.step))
    monkeypatch.setattr(
        type(session.classifier), "device", property(lambda _self: where[0])
    )
    events = list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    assert moved == ["cpu"] and session.device == "cpu"
    assert any("moved to the CPU" in e.message for e in events if isinstance(e, Notice))


def test_out_of_memory_on_the_cpu_is_reported(rng, monkeypatch) -> None:
    session, mailbox = _session(rng, batch_size=1, crop_size=16)
    monkeypatch.setattr(Trainer, "step", _raise_out_of_memory(1, Trainer.step))
    with pytest.raises(MemoryError, match="close other programs"):
        list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))


def test_out_of_memory_in_prediction_uses_smaller_exact_tiles(rng, monkeypatch) -> None:
    session, mailbox = _session(rng)
    list(iter_live(session, mailbox, round_seconds=0.05, rounds=1))
    box = Box(0, 0, 40, 0, 50)
    expected = session.predict(box)
    original = faults.predict_box

    def small_tiles_only(classifier, image, part, normalization=None):
        if (part.r1 - part.r0) * (part.c1 - part.c0) > 25 * 25:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(classifier, image, part, normalization)

    monkeypatch.setattr(faults, "predict_box", small_tiles_only)
    update = session.predict(box)
    np.testing.assert_allclose(update.uncertainty, expected.uncertainty, atol=1e-6)
    np.testing.assert_array_equal(update.classes, expected.classes)
    assert session.notices == ["out of GPU memory: predicting in smaller tiles"]


def test_smaller_configs_end_at_a_minimum() -> None:
    config, sizes = TrainConfig(), []
    while config is not None:
        sizes.append((config.batch_size, config.crop_size))
        config = smaller_config(config)
    assert sizes == [(8, 64), (4, 64), (2, 64), (1, 64), (1, 32), (1, 16)]
