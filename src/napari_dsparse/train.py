"""Training from painted pixels only: masked, class-balanced, warm-startable.

Each step runs the dense network on a batch of windows (crops around painted pixels,
or whole painted slices when that costs less; both exact) drawn from a
:class:`~napari_dsparse.training_set.TrainingSet` of one or more labelled images,
and takes the (focal) cross-entropy over painted pixels only, so unpainted pixels
contribute nothing.
:func:`iter_train` is the generator that the command line, the tests and the napari
worker all drive; a new label snapshot can be sent into it between steps.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from napari_dsparse.data import InputError, check_layout, class_weights, read_window
from napari_dsparse.model import Classifier
from napari_dsparse.prior import estimate_image_prior, log_prior_ratio
from napari_dsparse.training_set import Pair, TrainingSet

__all__ = [
    "TrainConfig",
    "TrainStatus",
    "Trainer",
    "TrainingDiverged",
    "import_optimizer_early",
    "iter_train",
]

StepMode = Literal["crops", "whole"]
DEFAULT_PAIR = "image"  # the name of the pair given to ``Trainer(...)``
# The class prior's sample: windows of side _PRIOR_WINDOW spread over the pairs
# (PRIOR_PIXELS pixels: a 4 % class is then known to about +-0.2 %), and the crops
# drawn to measure the training batches' class shares.
_PRIOR_WINDOWS = 64
_PRIOR_WINDOW = 16
PRIOR_PIXELS = _PRIOR_WINDOWS * _PRIOR_WINDOW**2
_PRIOR_CROPS = 512
# torch.optim imports this (about 1 s on 2 cores) when the first optimiser is built.
_OPTIMIZER_IMPORT = "torch._dynamo"
_early_import: threading.Thread | None = None


def import_optimizer_early() -> None:
    """Start importing, in a background thread, what the first optimiser imports.

    Building the first ``torch.optim`` optimiser of a process imports
    ``torch._dynamo``, about 1 s on 2 cores. The widget calls this when it opens, so
    that the person's first Train does not wait for it. An optimiser built meanwhile
    waits for the same import (Python's import lock); a failed import is left to
    the optimiser, which then raises it where it belongs.
    """
    global _early_import
    if _early_import is not None or _OPTIMIZER_IMPORT in sys.modules:
        return
    _early_import = threading.Thread(
        target=_import_quietly, name="napari-dsparse early import", daemon=True
    )
    _early_import.start()


def _import_quietly() -> None:
    with contextlib.suppress(Exception):
        importlib.import_module(_OPTIMIZER_IMPORT)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``reason`` says at which step."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; lower the learning rate")
        self.reason = reason


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the defaults are what kept the loop live on 2 CPU cores."""

    learning_rate: float = 1e-3  # Adam's usual rate; stable from scratch
    batch_size: int = 8  # crops per step
    crop_size: int = 64  # output pixels per crop side; the halo comes on top
    class_balance: bool = True  # label-histogram equalisation of the loss
    augment: bool = True  # flips, rot90, a mild intensity jitter and ``mix``
    # Share of crops that get a rectangle of a random crop of the batch pasted in,
    # labels and all (CutMix; Yun et al., ICCV 2019; a crop that draws itself
    # stays as it was). Strokes keep away from class
    # edges, so unmixed crops never show a painted pixel next to another class's
    # content, and the network called the background ring around every coin coin.
    # Mixing lifted coins and IHC on every seed (docs/benchmarks.md). Crop steps
    # only, and only with ``augment``.
    mix: float = 0.5
    # Steps on one labelling after which the rate halves; new labels restore it, and
    # None keeps it constant. Training on fixed strokes drifts past its best point;
    # halving every 3000 steps (15-30 s of ``pixel`` on 2 CPU cores) met the forest on
    # more task-seeds, at 30 s and after corrections (docs/benchmarks.md).
    lr_half_life: int | None = 3000
    # How far predictions move from the painted classes' prior to the image's
    # (Trainer.fit_class_prior): 0 keeps the network's posteriors, 1 gives the
    # fewest wrong pixels; 0.5, their geometric midpoint, helped mean IoU on four of
    # five benchmark tasks (the texture mosaic lost about 0.01) without erasing rare
    # classes early on, as 1 did (docs/benchmarks.md).
    prior_strength: float = 0.5
    # Focal cross-entropy, -(1 - p)**gamma * log p for the painted class's
    # probability p (Lin et al., ICCV 2017); 0 is the plain cross-entropy. Strokes
    # keep away from class edges, so the edge lies in a band no painted pixel
    # covers; down-weighting the pixels the network already gets right puts it
    # between the classes' nearest painted pixels rather than where most painted
    # pixels push it. 2 lifted membranes, coins, blobs and the texture mosaic and
    # cost IHC a little (docs/benchmarks.md).
    focal_gamma: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr_half_life is not None and self.lr_half_life < 1:
            raise ValueError(
                f"lr_half_life must be at least 1 step, got {self.lr_half_life}"
            )
        if not 0 <= self.mix <= 1:
            raise ValueError(f"mix must be between 0 and 1, got {self.mix}")
        if not 0 <= self.prior_strength <= 1:
            raise ValueError(
                f"prior_strength must be between 0 and 1, got {self.prior_strength}"
            )
        if not (self.focal_gamma == 0 or 1 <= self.focal_gamma <= 10):
            # below 1 the factor's gradient is infinite where p reaches 1
            raise ValueError(
                f"focal_gamma must be 0 or between 1 and 10, got {self.focal_gamma}"
            )


@dataclass(frozen=True)
class TrainStatus:
    """What one step did, for progress displays."""

    step: int
    loss: float
    steps_per_second: float
    painted: tuple[int, ...]  # painted pixels of classes 1..K
    mode: StepMode
    labels_version: int  # how many label snapshots the trainer has received
    learning_rate: float  # of the next step (see ``TrainConfig.lr_half_life``)

    @property
    def loss_text(self) -> str:
        """The loss to three significant digits.

        A well-fitted model's focal loss lies far below 0.001, which fixed decimals
        show as 0.
        """
        return f"{self.loss:.3g}"


@dataclass(frozen=True)
class _Batch:
    windows: torch.Tensor  # (B, C, h + 2 halo, w + 2 halo)
    targets: torch.Tensor  # (B, h, w) int64, 0 = unpainted


class Trainer:
    """Holds the optimiser and a training set of labelled images; :meth:`step` trains.

    ``Trainer(classifier, image, labels)`` trains on one image: ``image`` is
    ``(C, Z, Y, X)`` in any dtype (see :mod:`napari_dsparse.data`), ``labels`` are
    ``(Z, Y, X)`` or ``(Y, X)``, 0 = unpainted, 1..K = classes; that pair is named
    ``"image"``. :meth:`from_set` trains on a :class:`TrainingSet` of several pairs;
    :meth:`add_pair` and :meth:`remove_pair` change the set between steps, and the
    model keeps what it learned (warm start).
    """

    def __init__(
        self,
        classifier: Classifier,
        image: np.ndarray,
        labels: np.ndarray,
        config: TrainConfig | None = None,
    ) -> None:
        training_set = TrainingSet(classifier.normalization, classifier.num_classes)
        self._setup(classifier, training_set, config)
        self.add_pair(DEFAULT_PAIR, image, labels)

    @classmethod
    def from_set(
        cls,
        classifier: Classifier,
        training_set: TrainingSet,
        config: TrainConfig | None = None,
    ) -> Trainer:
        """A trainer that draws its crops from every pair of ``training_set``."""
        trainer = cls.__new__(cls)
        trainer._setup(classifier, training_set, config)
        channels = training_set.channels
        if channels is not None and channels != classifier.in_channels:
            raise InputError(
                f"the training set's images have {channels} channel(s) but the "
                f"model expects {classifier.in_channels}"
            )
        trainer._check_set()
        trainer._fit_feature_scale()
        trainer._new_labels()
        return trainer

    def _setup(
        self,
        classifier: Classifier,
        training_set: TrainingSet,
        config: TrainConfig | None,
    ) -> None:
        self.classifier = classifier
        self.training_set = training_set
        self.config = config or TrainConfig()
        self.rng = np.random.default_rng(self.config.seed)
        params = [p for p in classifier.patch_net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=self.config.learning_rate)
        self.steps_done = int(classifier.provenance.get("steps", 0))
        self.labels_version = 0
        self.steps_on_labels = 0  # steps since the last change of the training set
        self._training_prior: tuple[int, np.ndarray] = (-1, np.zeros(0))
        self._prior_sample: tuple[int, _Batch | None] = (-1, None)
        self.image_prior: np.ndarray | None = None  # the last fit_class_prior's

    @property
    def image(self) -> np.ndarray:
        """The image of the first pair (the only one when trained on one image)."""
        return self.training_set.pairs[0].image

    @property
    def labels(self) -> np.ndarray:
        """The labels snapshot of the first pair, ``(Z, Y, X)``."""
        return self.training_set.pairs[0].labels

    def set_labels(self, labels: np.ndarray, name: str | None = None) -> None:
        """Take a new snapshot of a pair's labels (copied; the model is kept).

        ``name`` defaults to the first pair.
        """
        name = self.training_set.names[0] if name is None else name
        pair = self.training_set[name]
        self.add_pair(name, pair.image, labels)

    def add_pair(self, name: str, image: np.ndarray, labels: np.ndarray) -> None:
        """Add or replace the pair ``name``; the next step samples it too."""
        check_layout(image)
        if image.shape[0] != self.classifier.in_channels:
            raise InputError(
                f"{name!r} has {image.shape[0]} channel(s) but the model expects "
                f"{self.classifier.in_channels}"
            )
        previous = self.training_set.get(name)
        self.training_set.add(name, image, labels)
        try:
            self._check_set()
        except InputError:
            if previous is None:
                self.training_set.remove(name)
            else:
                self.training_set.add(name, previous.image, previous.labels)
            raise
        self._fit_feature_scale()
        self._new_labels()

    def _new_labels(self) -> None:
        """The training set changed: a new version, and the half-life restarts."""
        self.labels_version += 1
        self.steps_on_labels = 0

    def _fit_feature_scale(self) -> None:
        """Fit a fresh model's feature standardisation to the first pair, once."""
        first = self.training_set.pairs[0]
        self.classifier.fit_feature_scale(first.image, first.normalization)

    def remove_pair(self, name: str) -> None:
        """Stop training on the pair ``name``; at least one painted pair must stay."""
        if name not in self.training_set:
            return
        previous = self.training_set[name]
        self.training_set.remove(name)
        try:
            self._check_set()
        except InputError:
            self.training_set.add(name, previous.image, previous.labels)
            raise
        self._new_labels()

    def _check_set(self) -> None:
        """Refresh the class weights; ``InputError`` if nothing is painted."""
        counts = self.training_set.counts
        if counts.sum() == 0:
            raise InputError("no painted pixels: paint a few strokes of each class")
        self.counts = counts
        self.weights = torch.as_tensor(
            class_weights(counts) if self.config.class_balance else (counts > 0) * 1.0,
            dtype=torch.float32,
        )

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
        prior = self.classifier.class_prior()
        if prior is not None:  # train on the network's own posteriors
            logits = logits - prior.log_ratio
        loss = painted_cross_entropy(
            logits,
            targets[painted] - 1,
            self.weights.to(device),
            self.config.focal_gamma,
        )
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at step {self.steps_done + 1}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._set_learning_rate()
        self.optimizer.step()
        self.steps_done += 1
        self.steps_on_labels += 1
        self.classifier.provenance["steps"] = self.steps_done
        return float(loss.detach()), mode

    def training_prior(self) -> np.ndarray:
        """``(K,)`` weighted class shares of the batches: the prior trained under.

        Exact for whole-slice steps; for crops, the mean over
        ``_PRIOR_CROPS`` crops drawn from a private generator (the training
        draws stay as they are). Cached until the training set changes.
        """
        if self._training_prior[0] == self.labels_version:
            return self._training_prior[1]
        weights = self.weights.double().numpy()
        if self.choose_mode() == "whole":
            pixels = self.counts.astype(np.float64)
        else:
            rng = np.random.default_rng(self.config.seed)
            pixels = np.zeros(self.classifier.num_classes)
            for _ in range(_PRIOR_CROPS):
                crop = self.training_set.sample_crop(rng, self.config.crop_size)
                target = crop.pair.labels[crop.z, slice(*crop.rows), slice(*crop.cols)]
                pixels += np.bincount(target.ravel(), minlength=len(pixels) + 1)[1:]
        shares = pixels * weights
        prior = shares / shares.sum()
        self._training_prior = (self.labels_version, prior)
        return prior

    def fit_class_prior(self) -> np.ndarray | None:
        """Estimate the training images' class prior; the model predicts under it.

        The mean posterior of :data:`PRIOR_PIXELS` pixels spread over every slice
        of every pair (painted or not; a fixed sample, so repeated fits differ
        only as the model does), then ``prior_strength * log(image prior /
        training prior)`` goes into the network's
        :class:`~napari_dsparse.nets.ClassPrior` (see :mod:`napari_dsparse.prior`).
        Returns the estimated image prior, or ``None`` where ``prior_strength`` is
        0 (the change is then zero) or the network has no ``ClassPrior``. About
        10-20 ms on 2 CPU cores for ``pixel``.
        """
        module = self.classifier.class_prior()
        if module is None:
            return None
        if self.config.prior_strength == 0:
            module.log_ratio.zero_()
            self.image_prior = None
            return None
        train_prior = self.training_prior()
        with torch.no_grad():
            logits = self._sample_logits() - module.log_ratio
            proba = torch.softmax(logits.double(), dim=1).cpu().numpy().T  # (K, N)
        image_prior = estimate_image_prior(proba, train_prior)
        ratio = log_prior_ratio(image_prior, train_prior, self.config.prior_strength)
        module.log_ratio.copy_(torch.as_tensor(ratio, dtype=module.log_ratio.dtype))
        self.image_prior = image_prior
        return image_prior

    def _sample_logits(self) -> torch.Tensor:
        """``(N, K)`` logits of a fixed random sample of the pairs' pixels."""
        batch = self._prior_windows()
        device = self.classifier.device
        self.classifier.patch_net.eval()
        return self.classifier.dense.pixels(
            batch.windows.to(device), batch.targets.to(device) > 0, valid=True
        )

    def _prior_windows(self) -> _Batch:
        """The sample's windows, read once per training set (images can be lazy)."""
        version, batch = self._prior_sample
        if version == self.labels_version and batch is not None:
            return batch
        rng = np.random.default_rng(self.config.seed)
        units = [
            (pair, z)
            for pair in self.training_set.pairs
            for z in range(pair.labels.shape[0])
        ]
        areas = np.array([pair.labels[0].size for pair, _ in units], np.float64)
        picks = rng.choice(len(units), size=_PRIOR_WINDOWS, p=areas / areas.sum())
        items = []
        for index in picks:
            pair, z = units[index]
            height, width = pair.labels.shape[1:]
            h, w = min(_PRIOR_WINDOW, height), min(_PRIOR_WINDOW, width)
            r0 = int(rng.integers(height - h + 1))
            c0 = int(rng.integers(width - w + 1))
            window = read_window(
                pair.image,
                pair.normalization,
                z,
                (r0, r0 + h),
                (c0, c0 + w),
                self.classifier.halo,
            )
            items.append((window, np.ones((h, w), np.uint8)))
        batch = _stack(items)
        self._prior_sample = (self.labels_version, batch)
        return batch

    def set_prior_strength(self, strength: float) -> None:
        """Use ``strength`` from the next :meth:`fit_class_prior` on (0 to 1)."""
        self.config = replace(self.config, prior_strength=strength)

    def set_learning_rate(self, learning_rate: float) -> None:
        """Train at ``learning_rate`` from the next step on; Adam's state stays."""
        self.config = replace(self.config, learning_rate=learning_rate)
        self._set_learning_rate()

    @property
    def learning_rate(self) -> float:
        """The next step's rate: the configured one, halved per ``lr_half_life``."""
        rate = self.config.learning_rate
        if self.config.lr_half_life is not None:
            rate *= 0.5 ** (self.steps_on_labels / self.config.lr_half_life)
        return rate

    def _set_learning_rate(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate

    def choose_mode(self) -> StepMode:
        """Whole painted slices when they cost fewer pixels than a batch of crops.

        Slices of different sizes are padded to the largest (see :func:`_stack`).
        """
        halo = self.classifier.halo
        height, width = self.training_set.largest_slice
        crop_h, crop_w = (
            min(self.config.crop_size, height),
            min(self.config.crop_size, width),
        )
        crops = self.config.batch_size * (crop_h + 2 * halo) * (crop_w + 2 * halo)
        slices = len(self.training_set.painted_units)
        whole = slices * (height + 2 * halo) * (width + 2 * halo)
        return "whole" if whole <= crops else "crops"

    def whole_batch(self) -> _Batch:
        """Every painted slice of every pair, whole, with its reflected halo."""
        items = [
            self._item(pair, z, (0, pair.image.shape[-2]), (0, pair.image.shape[-1]))
            for pair, z in self.training_set.painted_units
        ]
        return _stack(items)

    def crop_batch(self) -> _Batch:
        """``batch_size`` crops, balanced across classes and painted slices."""
        items = []
        for _ in range(self.config.batch_size):
            crop = self.training_set.sample_crop(self.rng, self.config.crop_size)
            items.append(self._item(crop.pair, crop.z, crop.rows, crop.cols))
        if self.config.augment and self.config.mix:
            items = self._mix(items)
        return _stack(items)

    def _mix(
        self, items: list[tuple[np.ndarray, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Paste a rectangle of a random crop, window and labels, into some crops.

        Every crop is drawn the same way, so the batches' expected class shares
        (:meth:`training_prior`) stay as they are.
        """
        halo = self.classifier.halo
        mixed = list(items)
        for index, (window, target) in enumerate(items):
            if self.rng.random() >= self.config.mix:
                continue
            other_window, other_target = items[int(self.rng.integers(len(items)))]
            if other_target.shape != target.shape:
                continue  # a crop clipped by a small image
            rows = _random_span(self.rng, target.shape[0])
            cols = _random_span(self.rng, target.shape[1])
            inner = (
                slice(None),
                slice(rows.start + halo, rows.stop + halo),
                slice(cols.start + halo, cols.stop + halo),
            )
            window, target = window.copy(), target.copy()
            window[inner] = other_window[inner]
            target[rows, cols] = other_target[rows, cols]
            mixed[index] = (window, target)
        return mixed

    def _item(
        self, pair: Pair, z: int, rows: tuple[int, int], cols: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        window = read_window(
            pair.image,
            pair.normalization,
            z,
            rows,
            cols,
            self.classifier.halo,
        )  # (C, h + 2 halo, w + 2 halo)
        target = pair.labels[z, rows[0] : rows[1], cols[0] : cols[1]]  # (h, w)
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


def _random_span(rng: np.random.Generator, size: int) -> slice:
    """A random run of a quarter to three quarters of ``range(size)``."""
    length = int(rng.integers(size // 4, 3 * size // 4 + 1))
    start = int(rng.integers(size - length + 1))
    return slice(start, start + length)


def _stack(items: list[tuple[np.ndarray, np.ndarray]]) -> _Batch:
    """Stack windows and targets, padding smaller ones at the bottom and right.

    Padded targets are 0 (unpainted) and a painted pixel's output depends only on
    its own window's pixels, so padding changes neither the loss nor its gradient.
    """
    height = max(t.shape[0] for _, t in items)
    width = max(t.shape[1] for _, t in items)
    windows, targets = [], []
    for window, target in items:
        pad_h, pad_w = height - target.shape[0], width - target.shape[1]
        if pad_h or pad_w:
            window = np.pad(window, ((0, 0), (0, pad_h), (0, pad_w)))
            target = np.pad(target, ((0, pad_h), (0, pad_w)))
        windows.append(np.ascontiguousarray(window))
        targets.append(np.ascontiguousarray(target))
    return _Batch(
        torch.from_numpy(np.stack(windows)),
        torch.from_numpy(np.stack(targets).astype(np.int64)),
    )


def masked_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Weighted mean (focal) cross-entropy over painted pixels (``targets > 0``) only.

    ``logits`` are ``(B, K, h, w)``, ``targets`` ``(B, h, w)`` with 0 = unpainted and
    1..K = classes, ``weights`` ``(K,)``; ``focal_gamma`` as in
    :class:`TrainConfig`. Unpainted pixels get zero weight, so their logits receive
    exactly zero gradient.
    """
    painted = targets > 0
    classes = (targets - 1).clamp(min=0)
    per_pixel = _focal_cross_entropy(logits, classes, focal_gamma)  # (B, h, w)
    pixel_weights = weights[classes] * painted
    return (per_pixel * pixel_weights).sum() / pixel_weights.sum().clamp(min=1e-12)


def painted_cross_entropy(
    logits: torch.Tensor,
    classes: torch.Tensor,
    weights: torch.Tensor,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Weighted mean (focal) cross-entropy of painted pixels' ``(M, K)`` logits.

    ``classes`` are ``(M,)`` in 0..K-1. Equal to :func:`masked_cross_entropy` on the
    dense logits, whose unpainted pixels get zero weight.
    """
    per_pixel = _focal_cross_entropy(logits, classes, focal_gamma)  # (M,)
    pixel_weights = weights[classes]
    return (per_pixel * pixel_weights).sum() / pixel_weights.sum().clamp(min=1e-12)


def _focal_cross_entropy(
    logits: torch.Tensor, classes: torch.Tensor, focal_gamma: float
) -> torch.Tensor:
    """Per-pixel ``-(1 - p)**focal_gamma * log p``, class axis 1 of ``logits``."""
    log_p = -F.cross_entropy(logits, classes, reduction="none")
    if focal_gamma == 0:
        return -log_p
    one_minus_p = (-torch.expm1(log_p)).clamp(min=0)  # never below 0 by rounding
    return -(one_minus_p**focal_gamma) * log_p


def iter_train(
    trainer: Trainer, steps: int | None = None, seconds: float | None = None
) -> Generator[TrainStatus, np.ndarray | None, None]:
    """Train until ``steps`` or ``seconds`` run out (or forever), yielding status.

    ``generator.send(labels)`` hands in a new label snapshot; the next step uses it
    and the model keeps what it learned. When the budget runs out, the class prior
    is fitted (:meth:`Trainer.fit_class_prior`); a caller that stops early calls it
    before predicting.
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
            trainer.learning_rate,
        )
        if new_labels is not None:
            trainer.set_labels(new_labels)
    trainer.fit_class_prior()
