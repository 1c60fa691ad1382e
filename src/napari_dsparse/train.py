"""Training from painted pixels only: masked, class-balanced, warm-startable.

Each step runs the dense network on a batch of windows (crops around painted pixels,
or whole painted slices when that costs less; both exact) and takes the
cross-entropy over painted pixels only, so unpainted pixels contribute nothing.
:func:`iter_train` is the generator that the command line, the tests and the napari
worker all drive; a new label snapshot can be sent into it between steps.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from napari_dsparse.data import (
    InputError,
    check_labels,
    class_counts,
    class_weights,
    read_window,
)
from napari_dsparse.model import Classifier

__all__ = ["TrainConfig", "TrainStatus", "Trainer", "TrainingDiverged", "iter_train"]

StepMode = Literal["crops", "whole"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; lower the learning rate."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the defaults are what kept the loop live on 2 CPU cores."""

    learning_rate: float = 1e-3  # Adam's usual rate; stable from scratch
    batch_size: int = 8  # crops per step
    crop_size: int = 64  # output pixels per crop side; the halo comes on top
    class_balance: bool = True  # label-histogram equalisation of the loss
    augment: bool = True  # flips, rot90 and a mild intensity jitter
    seed: int = 0


@dataclass(frozen=True)
class TrainStatus:
    """What one step did, for progress displays."""

    step: int
    loss: float
    steps_per_second: float
    painted: tuple[int, ...]  # painted pixels of classes 1..K
    mode: StepMode
    labels_version: int  # how many label snapshots the trainer has received


@dataclass(frozen=True)
class _Batch:
    windows: torch.Tensor  # (B, C, h + 2 halo, w + 2 halo)
    targets: torch.Tensor  # (B, h, w) int64, 0 = unpainted


class Trainer:
    """Holds the optimiser and the latest label snapshot; :meth:`step` trains once.

    ``image`` is ``(C, Z, Y, X)`` in any dtype (see :mod:`napari_dsparse.data`);
    ``labels`` are ``(Z, Y, X)`` or ``(Y, X)``, 0 = unpainted, 1..K = classes.
    """

    def __init__(
        self,
        classifier: Classifier,
        image: np.ndarray,
        labels: np.ndarray,
        config: TrainConfig | None = None,
    ) -> None:
        self.classifier = classifier
        classifier.fit_feature_scale(image)  # once, for a fresh model
        self.image = image
        self.config = config or TrainConfig()
        self.rng = np.random.default_rng(self.config.seed)
        params = [p for p in classifier.patch_net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=self.config.learning_rate)
        self.steps_done = int(classifier.provenance.get("steps", 0))
        self.labels_version = 0
        self.set_labels(labels)

    def set_labels(self, labels: np.ndarray) -> None:
        """Take a new snapshot of the painted labels (copied; the model is kept)."""
        labels = check_labels(np.array(labels, copy=True), self.image.shape[1:])
        counts = class_counts(labels, self.classifier.num_classes)
        if labels.max(initial=0) > self.classifier.num_classes:
            raise InputError(
                f"labels use class {labels.max()} but the model has "
                f"{self.classifier.num_classes} classes"
            )
        if counts.sum() == 0:
            raise InputError("no painted pixels: paint a few strokes of each class")
        self.labels = labels
        self.counts = counts
        self.weights = torch.as_tensor(
            class_weights(counts) if self.config.class_balance else (counts > 0) * 1.0,
            dtype=torch.float32,
        )
        self._painted = [np.argwhere(labels == k) for k in range(1, len(counts) + 1)]
        self.labels_version += 1

    def step(self) -> tuple[float, StepMode]:
        """One optimiser step on a fresh batch; returns the loss and the mode."""
        mode = self.choose_mode()
        batch = self.whole_batch() if mode == "whole" else self.crop_batch()
        device = self.classifier.device
        self.classifier.patch_net.train()
        targets = batch.targets.to(device)
        painted = targets > 0  # only these pixels' logits are computed
        logits = self.classifier.dense.pixels(
            batch.windows.to(device), painted, valid=True
        )  # (M, K)
        loss = painted_cross_entropy(
            logits, targets[painted] - 1, self.weights.to(device)
        )
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at step {self.steps_done + 1}; "
                "lower the learning rate"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        self.classifier.provenance["steps"] = self.steps_done
        return float(loss.detach()), mode

    def choose_mode(self) -> StepMode:
        """Whole painted slices when they cost fewer pixels than a batch of crops."""
        halo = self.classifier.halo
        height, width = self.image.shape[-2:]
        crop_h, crop_w = (
            min(self.config.crop_size, height),
            min(self.config.crop_size, width),
        )
        crops = self.config.batch_size * (crop_h + 2 * halo) * (crop_w + 2 * halo)
        slices = len(self._painted_slices())
        whole = slices * (height + 2 * halo) * (width + 2 * halo)
        return "whole" if whole <= crops else "crops"

    def _painted_slices(self) -> np.ndarray:
        return np.unique(np.concatenate([coords[:, 0] for coords in self._painted]))

    def whole_batch(self) -> _Batch:
        """Every painted slice, whole, with its reflected halo."""
        height, width = self.image.shape[-2:]
        items = [
            self._item(int(z), (0, height), (0, width)) for z in self._painted_slices()
        ]
        return _stack(items)

    def crop_batch(self) -> _Batch:
        """``batch_size`` crops, each around a painted pixel of a random class."""
        height, width = self.image.shape[-2:]
        crop_h = min(self.config.crop_size, height)
        crop_w = min(self.config.crop_size, width)
        painted = [coords for coords in self._painted if len(coords)]
        items = []
        for _ in range(self.config.batch_size):
            coords = painted[self.rng.integers(len(painted))]
            z, row, col = coords[self.rng.integers(len(coords))]
            r0 = int(np.clip(row - self.rng.integers(crop_h), 0, height - crop_h))
            c0 = int(np.clip(col - self.rng.integers(crop_w), 0, width - crop_w))
            items.append(self._item(int(z), (r0, r0 + crop_h), (c0, c0 + crop_w)))
        return _stack(items)

    def _item(
        self, z: int, rows: tuple[int, int], cols: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        window = read_window(
            self.image,
            self.classifier.normalization,
            z,
            rows,
            cols,
            self.classifier.halo,
        )  # (C, h + 2 halo, w + 2 halo)
        target = self.labels[z, rows[0] : rows[1], cols[0] : cols[1]]  # (h, w)
        if self.config.augment:
            window, target = self._augment(window, target)
        return window, target

    def _augment(
        self, window: np.ndarray, target: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flips, rot90 (square windows) and intensity jitter; exact for reflections."""
        for axis in (-1, -2):
            if self.rng.random() < 0.5:
                window, target = np.flip(window, axis), np.flip(target, axis)
        if target.shape[0] == target.shape[1]:
            turns = int(self.rng.integers(4))
            window = np.rot90(window, turns, axes=(-2, -1))
            target = np.rot90(target, turns)
        gain = self.rng.uniform(0.9, 1.1, size=(window.shape[0], 1, 1))
        offset = self.rng.uniform(-0.05, 0.05, size=(window.shape[0], 1, 1))
        return (window * gain + offset).astype(np.float32), target


def _stack(items: list[tuple[np.ndarray, np.ndarray]]) -> _Batch:
    windows = torch.from_numpy(np.stack([np.ascontiguousarray(w) for w, _ in items]))
    targets = torch.from_numpy(np.stack([np.ascontiguousarray(t) for _, t in items]))
    return _Batch(windows, targets)


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted mean cross-entropy over painted pixels (``targets > 0``) only.

    ``logits`` are ``(B, K, h, w)``, ``targets`` ``(B, h, w)`` with 0 = unpainted and
    1..K = classes, ``weights`` ``(K,)``. Unpainted pixels get zero weight, so their
    logits receive exactly zero gradient.
    """
    painted = targets > 0
    classes = (targets - 1).clamp(min=0)
    per_pixel = F.cross_entropy(logits, classes, reduction="none")  # (B, h, w)
    pixel_weights = weights[classes] * painted
    return (per_pixel * pixel_weights).sum() / pixel_weights.sum().clamp(min=1e-12)


def painted_cross_entropy(
    logits: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted mean cross-entropy of painted pixels' ``(M, K)`` logits.

    ``classes`` are ``(M,)`` in 0..K-1. Equal to :func:`masked_cross_entropy` on the
    dense logits, whose unpainted pixels get zero weight.
    """
    per_pixel = F.cross_entropy(logits, classes, reduction="none")  # (M,)
    pixel_weights = weights[classes]
    return (per_pixel * pixel_weights).sum() / pixel_weights.sum().clamp(min=1e-12)


def iter_train(
    trainer: Trainer, steps: int | None = None, seconds: float | None = None
) -> Generator[TrainStatus, np.ndarray | None, None]:
    """Train until ``steps`` or ``seconds`` run out (or forever), yielding status.

    ``generator.send(labels)`` hands in a new label snapshot; the next step uses it
    and the model keeps what it learned.
    """
    start = time.perf_counter()
    rate = 0.0
    done = 0
    while (steps is None or done < steps) and (
        seconds is None or time.perf_counter() - start < seconds
    ):
        tick = time.perf_counter()
        loss, mode = trainer.step()
        done += 1
        elapsed = time.perf_counter() - tick
        rate = 1 / elapsed if rate == 0 else 0.8 * rate + 0.2 / elapsed
        new_labels = yield TrainStatus(
            trainer.steps_done,
            loss,
            rate,
            tuple(int(c) for c in trainer.counts),
            mode,
            trainer.labels_version,
        )
        if new_labels is not None:
            trainer.set_labels(new_labels)
