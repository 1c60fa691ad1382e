"""The live loop behind the napari widget, Qt-free.

The GUI thread posts label snapshots and the visible region into a :class:`Mailbox`;
:func:`iter_live` (run in a background worker) trains in short rounds and, after each
round, yields :class:`PredictionUpdate` tiles: the visible region first, then the
rest of the current slice. A new snapshot interrupts the predictions so that strokes
show up in the next update without waiting for the whole image.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from napari_dsparse.data import Normalization
from napari_dsparse.model import Classifier, pick_device
from napari_dsparse.nets import DEFAULT_PRESET
from napari_dsparse.predict import Box, iter_tiles, labels_and_uncertainty, predict_box
from napari_dsparse.train import TrainConfig, Trainer, TrainStatus
from napari_dsparse.training_set import TrainingSet

__all__ = [
    "LiveSession",
    "Mailbox",
    "PredictionUpdate",
    "Waiting",
    "iter_live",
]

LIVE_TILE = 256  # output pixels per preview tile side: about 0.1 s on 2 CPU cores
AFTER_STROKE_SECONDS = 0.15  # training on new strokes before they are previewed


def cpu_threads_for_live_training(cpu_count: int | None = None) -> int:
    """Torch threads for training next to a GUI: every core but one.

    With all cores busy in torch, a GUI thread (or any other process) that needs a
    core stalls torch's thread pool: on 2 cores, 2 threads gave 1 step/s next to a
    busy core where 1 thread gave 5-6 (benchmarks/bench_quality.py, docs/benchmarks.md).
    """
    cpu_count = cpu_count or os.cpu_count() or 1
    return max(1, cpu_count - 1)


class Mailbox:
    """Latest label snapshot and visible region, from the GUI thread to the worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._labels: np.ndarray | None = None
        self._view: Box | None = None
        self._slice = 0
        self._pair_changes: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        self.posted = 0  # snapshots posted so far; the version of the latest

    def post_labels(self, labels: np.ndarray) -> int:
        """Hand over a copy of ``labels``; returns its version number."""
        snapshot = np.array(labels, copy=True)
        with self._lock:
            self._labels = snapshot
            self.posted += 1
            return self.posted

    def take_labels(self) -> tuple[np.ndarray, int] | None:
        """The latest snapshot not taken yet, with its version, or ``None``."""
        with self._lock:
            labels, self._labels = self._labels, None
            return None if labels is None else (labels, self.posted)

    def has_new_labels(self) -> bool:
        """Whether a label snapshot or a training-set change is waiting."""
        with self._lock:
            return self._labels is not None or bool(self._pair_changes)

    def post_pair(self, name: str, image: np.ndarray, labels: np.ndarray) -> None:
        """Add (or update) the training pair ``name``: the image is not copied."""
        snapshot = np.array(labels, copy=True)
        with self._lock:
            self._pair_changes[name] = (image, snapshot)

    def post_pair_removal(self, name: str) -> None:
        """Stop training on the pair ``name``."""
        with self._lock:
            self._pair_changes[name] = None

    def take_pair_changes(self) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
        """Pairs added or updated (``(image, labels)``) and removed (``None``)."""
        with self._lock:
            changes, self._pair_changes = self._pair_changes, {}
            return changes

    def post_view(self, view: Box | None, current_slice: int = 0) -> None:
        """The region on screen (``None``: unknown) and the slice being shown."""
        with self._lock:
            self._view, self._slice = view, current_slice

    def view(self) -> tuple[Box | None, int]:
        with self._lock:
            return self._view, self._slice


@dataclass(frozen=True)
class PredictionUpdate:
    """Classes 1..K and uncertainty of one box, from the model at ``step``."""

    box: Box
    classes: np.ndarray  # (h, w) uint8
    uncertainty: np.ndarray  # (h, w) float32 in [0, 1]
    step: int
    labels_version: int


@dataclass(frozen=True)
class Waiting:
    """Nothing to train on yet; ``reason`` says what the user should do."""

    reason: str


@dataclass
class LiveSession:
    """An image, its classes and the model being trained on it (Qt-free state).

    ``image`` is ``(C, Z, Y, X)``: the image in view, whose label snapshots
    (:meth:`set_labels`) are the training pair ``name`` and whose predictions are
    shown. ``pairs`` are more ``(image, labels)`` pairs trained on at the same time
    (:meth:`add_pair`, :meth:`remove_pair`); :meth:`for_image` moves the view to
    another image and keeps the model and the pairs. The classifier is created on
    the first snapshot and kept across pauses; :meth:`reset` forgets it.
    """

    image: np.ndarray
    class_names: tuple[str, ...]
    preset: str = DEFAULT_PRESET
    config: TrainConfig = field(default_factory=TrainConfig)
    device: str | None = None
    classifier: Classifier | None = None
    trainer: Trainer | None = None
    labels_version: int = 0
    painted: bool = False  # whether the latest snapshot has any painted pixel
    name: str = "image"  # the training pair of the image in view
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    optimizer_state: dict | None = None  # carried over from another image's session
    _labels: np.ndarray | None = field(default=None, repr=False)  # latest snapshot
    _view_normalization: tuple[Normalization, Normalization] | None = field(
        default=None, repr=False
    )  # (the model's, resolved for the image in view)

    @property
    def ready(self) -> bool:
        """Whether there is a model and painted pixels to train on."""
        return self.trainer is not None and (self.painted or self._pairs_painted())

    def _pairs_painted(self) -> bool:
        return any((labels > 0).any() for _, labels in self.pairs.values())

    def set_labels(self, labels: np.ndarray, version: int) -> None:
        """Train on ``labels`` from now on (warm start; grows classes if needed).

        A snapshot without paint keeps the model and pauses training until strokes
        come back.
        """
        self.labels_version = version
        self.painted = bool((labels > 0).any())
        self._labels = labels
        if not self.painted and not self._pairs_painted():
            return
        self._update_pair(self.name, self.image, labels)

    def add_pair(self, name: str, image: np.ndarray, labels: np.ndarray) -> None:
        """Train on ``image`` (``(C, Z, Y, X)``, not copied) and ``labels`` too.

        ``name`` is the pair's name; the image in view is the pair :attr:`name`.
        """
        self.pairs[name] = (image, labels)
        if name == self.name:
            self.set_labels(labels, self.labels_version)
            return
        if (labels > 0).any() or self.trainer is not None:
            self._update_pair(name, image, labels)

    def remove_pair(self, name: str) -> None:
        """Stop training on the pair ``name`` (the image in view stays)."""
        self.pairs.pop(name, None)
        if self.trainer is not None and name != self.name:
            self.trainer.remove_pair(name)

    def for_image(self, name: str, image: np.ndarray) -> LiveSession:
        """A session viewing ``image`` as pair ``name``, with this model and pairs.

        The image in view so far stays in the training set only if it is one of
        :attr:`pairs`. The optimiser's state carries over.
        """
        trainer = self.trainer
        pairs = dict(self.pairs)
        if self.name in pairs and self._labels is not None:
            pairs[self.name] = (self.image, self._labels)  # the latest strokes
        return LiveSession(
            image,
            self.class_names,
            preset=self.preset,
            config=self.config,
            device=self.device,
            classifier=self.classifier,
            labels_version=self.labels_version,
            name=name,
            pairs=pairs,
            optimizer_state=(
                trainer.optimizer.state_dict() if trainer else self.optimizer_state
            ),
        )

    def _update_pair(self, name: str, image: np.ndarray, labels: np.ndarray) -> None:
        """Put ``(image, labels)`` into the trainer's set, growing classes if needed."""
        num_classes = max(len(self.class_names), int(labels.max(initial=0)))
        if num_classes > len(self.class_names):
            extra = range(len(self.class_names) + 1, num_classes + 1)
            self.class_names = (*self.class_names, *(f"class {k}" for k in extra))
        if self.classifier is None:
            self.classifier = self._new_classifier()
        elif self.classifier.num_classes < num_classes:
            self.classifier = self.classifier.with_classes(self.class_names)
            self.trainer = None
        if self.trainer is None:
            self.trainer = self._new_trainer(name, image, labels)
        else:
            self.trainer.add_pair(name, image, labels)

    def _new_trainer(self, name: str, image: np.ndarray, labels: np.ndarray) -> Trainer:
        """A trainer on the image in view and every added pair."""
        assert self.classifier is not None
        training_set = TrainingSet(
            self.classifier.normalization, self.classifier.num_classes
        )
        if self._labels is not None:
            training_set.add(self.name, self.image, self._labels)
        for other, (other_image, other_labels) in self.pairs.items():
            if other != self.name:
                training_set.add(other, other_image, other_labels)
        training_set.add(name, image, labels)
        trainer = Trainer.from_set(self.classifier, training_set, self.config)
        if self.optimizer_state is not None:
            trainer.optimizer.load_state_dict(self.optimizer_state)
            for group in trainer.optimizer.param_groups:
                group["lr"] = self.config.learning_rate
            self.optimizer_state = None
        return trainer

    def set_learning_rate(self, learning_rate: float) -> None:
        """Use ``learning_rate`` from the next step on (the optimiser state stays)."""
        self.config = replace(self.config, learning_rate=learning_rate)
        if self.trainer is not None:
            for group in self.trainer.optimizer.param_groups:
                group["lr"] = learning_rate

    def _new_classifier(self) -> Classifier:
        classifier = Classifier.create(
            self.image.shape[0],
            self.class_names,
            Normalization.from_image(self.image),
            preset=self.preset,
            seed=self.config.seed,
        )
        return classifier.to(pick_device(self.device))

    def reset(self) -> None:
        """Forget the model; the next snapshot starts from a fresh network."""
        self.classifier = None
        self.trainer = None
        self.optimizer_state = None
        self._view_normalization = None

    def predict(self, box: Box) -> PredictionUpdate:
        """Classes and uncertainty of ``box`` from the current model."""
        assert self.classifier is not None and self.trainer is not None
        model = self.classifier.normalization
        if self._view_normalization is None or self._view_normalization[0] != model:
            # once per image and model: the image's own percentiles by default
            self._view_normalization = (model, model.for_image(self.image))
        proba = predict_box(
            self.classifier, self.image, box, self._view_normalization[1]
        )  # (K, h, w)
        classes, uncertainty = labels_and_uncertainty(proba)
        return PredictionUpdate(
            box, classes, uncertainty, self.trainer.steps_done, self.labels_version
        )


def preview_boxes(
    shape: tuple[int, int, int], view: Box | None, z: int
) -> Iterator[Box]:
    """Tiles of the visible region of slice ``z``, then the rest of that slice."""
    depth, height, width = shape
    z = min(max(z, 0), depth - 1)
    whole = Box(z, 0, height, 0, width)
    if view is None:
        yield from iter_tiles(shape, LIVE_TILE, whole)
        return
    view = Box(
        z,
        max(0, view.r0),
        min(height, max(view.r1, view.r0 + 1)),
        max(0, view.c0),
        min(width, max(view.c1, view.c0 + 1)),
    )
    if view.r0 >= view.r1 or view.c0 >= view.c1:
        yield from iter_tiles(shape, LIVE_TILE, whole)
        return
    yield from iter_tiles(shape, LIVE_TILE, view)
    bands = (
        Box(z, 0, view.r0, 0, width),
        Box(z, view.r1, height, 0, width),
        Box(z, view.r0, view.r1, 0, view.c0),
        Box(z, view.r0, view.r1, view.c1, width),
    )
    for band in bands:
        if band.r0 < band.r1 and band.c0 < band.c1:
            yield from iter_tiles(shape, LIVE_TILE, band)


def iter_live(
    session: LiveSession,
    mailbox: Mailbox,
    round_seconds: float = 0.4,
    rounds: int | None = None,
) -> Generator[TrainStatus | PredictionUpdate | Waiting, None, None]:
    """Train in rounds of ``round_seconds`` and stream predictions (forever by default).

    Yields after every step and every tile, so a worker can quit promptly.
    """
    done = 0
    while rounds is None or done < rounds:
        if not _take_snapshot(session, mailbox):
            yield Waiting("paint a few strokes of each class")
            time.sleep(0.05)
            continue
        yield from _train_round(session, mailbox, round_seconds)
        view, z = mailbox.view()
        for box in preview_boxes(session.image.shape[1:], view, z):
            if mailbox.has_new_labels():
                break
            yield session.predict(box)
        done += 1


def _take_snapshot(session: LiveSession, mailbox: Mailbox) -> bool:
    """Apply the newest snapshot, if any; whether there is something to train on."""
    for name, pair in mailbox.take_pair_changes().items():
        if pair is None:
            session.remove_pair(name)
        else:
            session.add_pair(name, *pair)
    posted = mailbox.take_labels()
    if posted is not None:
        session.set_labels(*posted)
    return session.ready


def _train_round(
    session: LiveSession, mailbox: Mailbox, seconds: float
) -> Iterator[TrainStatus]:
    assert session.trainer is not None
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        loss, mode = session.trainer.step()
        yield TrainStatus(
            session.trainer.steps_done,
            loss,
            1 / max(time.perf_counter() - tick, 1e-9),
            tuple(int(c) for c in session.trainer.counts),
            mode,
            session.labels_version,
        )
        if mailbox.has_new_labels() and _take_snapshot(session, mailbox):
            # show the stroke soon: a short burst of steps, then the preview
            start = time.perf_counter() - seconds + min(seconds, AFTER_STROKE_SECONDS)
