"""The live loop behind the napari widget, Qt-free.

The GUI thread posts label snapshots and the visible region into a :class:`Mailbox`;
:func:`iter_live` (run in a background worker) trains in short rounds and, after each
round, yields :class:`PredictionUpdate` tiles of a pass over the visible region
first, then the rest of the current slice (while a volume is shown in 3D: every slice
of it, nearest to the current one first). A round predicts for at most
``PREVIEW_SECONDS``; the pass goes on in the next round, so a large image does not
starve training. New strokes interrupt the predictions, and the next pass begins
with the view's tiles nearest to them (in 3D: at their plane), so that they show up
without waiting for the whole image.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from napari_dsparse.data import (
    InputError,
    Normalization,
    check_labels,
    check_trainable_image,
    class_id_ranges,
    painted_classes,
    small_image_warning,
)
from napari_dsparse.faults import (
    Checkpoint,
    free_accelerator_memory,
    has_diverged,
    is_out_of_memory,
    move_trainer,
    predict_fitting,
    smaller_config,
)
from napari_dsparse.memory import PeriodicRelease
from napari_dsparse.model import Classifier, pick_device
from napari_dsparse.nets import DEFAULT_PRESET
from napari_dsparse.predict import Box, iter_tiles, labels_and_uncertainty, predict_box
from napari_dsparse.train import TrainConfig, Trainer, TrainingDiverged, TrainStatus
from napari_dsparse.training_set import TrainingSet

__all__ = [
    "LiveSession",
    "Mailbox",
    "Notice",
    "PredictionUpdate",
    "TrainingPaused",
    "Waiting",
    "iter_live",
]

LIVE_TILE = 256  # output pixels per preview tile side: about 0.1 s on 2 CPU cores
AFTER_STROKE_SECONDS = 0.15  # training on new strokes before they are previewed
PREVIEW_SECONDS = 0.5  # the most a live round predicts; the pass goes on next round


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
        self._volume: range | None = None
        self._pair_changes: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        self.posted = 0  # snapshots posted so far; the version of the latest

    def post_labels(self, labels: np.ndarray) -> int:
        """Tell the worker that ``labels`` (the scribble layer's own array) changed;
        returns the version number. Nothing is copied here: a volume's copy takes
        hundreds of ms, which the GUI thread must not wait for."""
        with self._lock:
            self._labels = labels
            self.posted += 1
            return self.posted

    def take_labels(self) -> tuple[np.ndarray, int] | None:
        """A copy of the labels last posted, with its version, or ``None`` if none
        was posted since the last take.

        The copy is made here, in the worker (NumPy lets the GUI run meanwhile), so
        it holds every change made until now. A stroke painted during the copy may
        come in part; its paint event posts again, so the next take holds it whole.
        """
        with self._lock:
            labels, self._labels = self._labels, None
            version = self.posted
        return None if labels is None else (np.array(labels, copy=True), version)

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

    def post_view(
        self, view: Box | None, current_slice: int = 0, volume: range | None = None
    ) -> None:
        """The region on screen (``None``: unknown), the slice being shown and, in
        napari's 3D display, the slices of the volume on screen (``None`` in 2D)."""
        with self._lock:
            self._view, self._slice, self._volume = view, current_slice, volume

    def view(self) -> tuple[Box | None, int]:
        with self._lock:
            return self._view, self._slice

    def volume(self) -> range | None:
        """The slices shown as a volume, or ``None`` (a 2D display)."""
        with self._lock:
            return self._volume


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


@dataclass(frozen=True)
class Notice:
    """Something the user should know; training goes on."""

    message: str


@dataclass(frozen=True)
class TrainingPaused:
    """Training stopped by itself (the last event); the model is at ``step``."""

    message: str
    step: int


@dataclass
class LiveSession:
    """An image, its classes and the model being trained on it (Qt-free state).

    ``image`` is ``(C, Z, Y, X)``: the image in view, whose label snapshots
    (:meth:`set_labels`) are the training pair ``name`` and whose predictions are
    shown. ``pairs`` are more ``(image, labels)`` pairs trained on at the same time
    (:meth:`add_pair`, :meth:`remove_pair`); :meth:`for_image` moves the view to
    another image and keeps the model and the pairs. The classifier is created once
    two classes are painted (over the view and the pairs) and kept across pauses;
    :meth:`reset` forgets it. ``last_good`` is a copy of the trainer's state after
    the latest healthy round (see :meth:`keep_last_good`).
    """

    image: np.ndarray
    class_names: tuple[str, ...]
    preset: str = DEFAULT_PRESET
    config: TrainConfig = field(default_factory=TrainConfig)
    device: str | None = None
    classifier: Classifier | None = None
    trainer: Trainer | None = None
    labels_version: int = 0
    painted: bool = False  # whether the view and the pairs have two painted classes
    name: str = "image"  # the training pair of the image in view
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    optimizer_state: dict | None = None  # carried over from another image's session
    last_good: Checkpoint | None = None
    notices: list[str] = field(default_factory=list)  # for the user, not shown yet
    last_stroke: tuple[int, int, int] | None = None  # (z, row, col) of the latest
    _gaps: list[int] = field(default_factory=list)
    _told: set[str] = field(default_factory=set)
    _labels: np.ndarray | None = field(default=None, repr=False)  # latest snapshot
    _classes: dict[str, frozenset[int]] = field(
        default_factory=dict, repr=False
    )  # painted classes of the view (``name``) and of each pair, counted once
    _view_normalization: tuple[Normalization, Normalization] | None = field(
        default=None, repr=False
    )  # (the model's, resolved for the image in view)

    def __post_init__(self) -> None:
        check_trainable_image(self.image)
        for other, (_image, labels) in self.pairs.items():
            if other != self.name:
                self._classes[other] = frozenset(painted_classes(labels).tolist())

    @property
    def ready(self) -> bool:
        """Whether there is a model and two painted classes to train on."""
        return self.trainer is not None and self.painted

    @property
    def waiting_reason(self) -> str:
        """What the user should do before training can start."""
        return "paint a few strokes of each class (at least two classes)"

    def _painted_classes(self) -> set[int]:
        """Class ids painted in the view or in any pair."""
        return set().union(*self._classes.values())

    def set_labels(self, labels: np.ndarray, version: int) -> None:
        """Train on ``labels`` from now on (warm start; grows classes if needed).

        Training needs strokes of two classes over the view and the pairs together:
        one class alone teaches nothing but "everything is this class". Until then
        the model is kept and training pauses.
        """
        self.labels_version = version
        labels = check_labels(labels, self.image.shape[1:])
        self.last_stroke = _centre_of_change(self._labels, labels)
        self._labels = labels
        self._classes[self.name] = frozenset(painted_classes(labels).tolist())
        self.painted = len(self._painted_classes()) >= 2
        if not self.painted:
            return
        self._note_gaps()
        self._update_pair(self.name, self.image, labels)

    def add_pair(self, name: str, image: np.ndarray, labels: np.ndarray) -> None:
        """Train on ``image`` (``(C, Z, Y, X)``, not copied) and ``labels`` too.

        ``name`` is the pair's name; the image in view is the pair :attr:`name`.
        """
        check_trainable_image(image)
        labels = check_labels(labels, image.shape[1:])
        self.pairs[name] = (image, labels)
        if name == self.name:
            self.set_labels(labels, self.labels_version)
            return
        self._classes[name] = frozenset(painted_classes(labels).tolist())
        self.painted = len(self._painted_classes()) >= 2
        if self.painted:
            self._note_gaps()
        if self.painted or self.trainer is not None:
            self._update_pair(name, image, labels)

    def remove_pair(self, name: str) -> None:
        """Stop training on the pair ``name`` (the image in view stays)."""
        self.pairs.pop(name, None)
        if name == self.name:
            return
        self._classes.pop(name, None)
        self.painted = len(self._painted_classes()) >= 2
        if self.trainer is None:
            return
        try:
            self.trainer.remove_pair(name)
        except InputError:  # nothing painted would be left: keep the optimiser
            self.optimizer_state = self.trainer.optimizer.state_dict()
            self.trainer = None

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

    def _all_labels(self) -> Iterator[np.ndarray]:
        if self._labels is not None:
            yield self._labels
        for other, (_image, labels) in self.pairs.items():
            if other != self.name:
                yield labels

    def _update_pair(self, name: str, image: np.ndarray, labels: np.ndarray) -> None:
        """Put ``(image, labels)`` into the trainer's set, growing classes if needed."""
        largest = max(int(labels.max(initial=0)) for labels in self._all_labels())
        num_classes = max(len(self.class_names), largest, int(labels.max(initial=0)))
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
            self.keep_last_good()
            warning = small_image_warning(image.shape[1:], self.classifier.patch_size)
            if warning:
                self.tell(warning)
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
            trainer.set_learning_rate(self.config.learning_rate)
            self.optimizer_state = None
        return trainer

    def _note_gaps(self) -> None:
        """Tell the user once about class ids without strokes (e.g. 1 and 3 only)."""
        painted = self._painted_classes()
        gaps = sorted(set(range(1, max(painted, default=0) + 1)) - painted)
        if gaps and gaps != self._gaps:
            names = class_id_ranges(gaps, self.class_names)
            self.tell(f"no strokes of class {names}: it is not predicted until painted")
        self._gaps = gaps

    def tell(self, message: str) -> None:
        """Queue ``message`` for the user, once per session."""
        if message not in self._told:
            self._told.add(message)
            self.notices.append(message)

    def keep_last_good(self) -> None:
        """Remember the trainer's state as the one to return to after divergence."""
        if self.trainer is not None:
            self.last_good = Checkpoint.of(self.trainer)

    def restore_last_good(self) -> int:
        """Put the model back to :attr:`last_good`; returns its step count."""
        assert self.trainer is not None and self.last_good is not None
        self.last_good.restore(self.trainer)
        return self.last_good.steps_done

    def recover_from_out_of_memory(self) -> str:
        """Train on smaller batches; once they are minimal, on the CPU."""
        assert self.trainer is not None
        free_accelerator_memory()
        smaller = smaller_config(self.trainer.config)
        if smaller is not None:
            self.config = self.trainer.config = smaller
            return (
                "out of memory: training on smaller batches "
                f"({smaller.batch_size} crops of {smaller.crop_size} px)"
            )
        if self.trainer.classifier.device.type == "cpu":
            raise MemoryError("out of memory even on the CPU: close other programs")
        move_trainer(self.trainer, "cpu")
        self.device = "cpu"
        return "out of GPU memory: training moved to the CPU (slower)"

    def replace_image(self, image: np.ndarray) -> bool:
        """Train on new pixels of the same layout; whether the model could be kept.

        With the same shape the view's training pair gets the new pixels (and, per
        image, their own normalisation) and training goes on. With another number of
        channels or another size the model and trainer are forgotten (the scribbles
        would not fit); the other pairs of the set stay for the next model.
        """
        check_trainable_image(image)
        same = image.shape == self.image.shape
        self.image = image
        self._view_normalization = None
        if self.name in self.pairs:
            labels = self.pairs[self.name][1]
            if same:
                self.pairs[self.name] = (image, labels)
            else:
                del self.pairs[self.name]
        if not same:
            self._labels = None
            self._classes.pop(self.name, None)
            self.painted = len(self._painted_classes()) >= 2
            self.reset()
        elif self.trainer is not None and self.name in self.trainer.training_set:
            labels = self.trainer.training_set[self.name].labels
            self.trainer.add_pair(self.name, image, labels)
        return same

    def set_learning_rate(self, learning_rate: float) -> None:
        """Use ``learning_rate`` from the next step on (the optimiser state stays)."""
        self.config = replace(self.config, learning_rate=learning_rate)
        if self.trainer is not None:
            self.trainer.set_learning_rate(learning_rate)

    def set_prior_strength(self, strength: float) -> None:
        """Predict under ``strength`` of the image's class prior from the next round.

        Training refits the prior after every round (``TrainConfig.prior_strength``).
        """
        self.config = replace(self.config, prior_strength=strength)
        if self.trainer is not None:
            self.trainer.set_prior_strength(strength)

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
        self.last_good = None
        self._view_normalization = None

    def predict(self, box: Box) -> PredictionUpdate:
        """Classes and uncertainty of ``box`` from the current model."""
        assert self.classifier is not None and self.trainer is not None
        model = self.classifier.normalization
        if self._view_normalization is None or self._view_normalization[0] != model:
            # once per image and model: the image's own percentiles by default
            self._view_normalization = (model, model.for_image(self.image))
        proba = self._predict_fitting(box, self._view_normalization[1])  # (K, h, w)
        classes, uncertainty = labels_and_uncertainty(proba)
        return PredictionUpdate(
            box, classes, uncertainty, self.trainer.steps_done, self.labels_version
        )

    def _predict_fitting(self, box: Box, normalization: Normalization) -> np.ndarray:
        """``predict_box`` in smaller tiles, then on the CPU, when memory runs out."""
        try:
            return predict_fitting(
                self.classifier, self.image, box, self.tell, normalization
            )
        except Exception as error:
            if not is_out_of_memory(error):
                raise
        if self.classifier.device.type == "cpu":
            raise MemoryError("out of memory even on the CPU: close other programs")
        move_trainer(self.trainer, "cpu")
        self.device = "cpu"
        self.tell("out of GPU memory: moved to the CPU (slower)")
        return predict_box(self.classifier, self.image, box, normalization)


def _centre_of_change(
    before: np.ndarray | None, after: np.ndarray
) -> tuple[int, int, int] | None:
    """``(z, row, col)`` of the middle of the pixels that differ (the latest
    strokes), or ``None`` when nothing changed or there is nothing to compare."""
    if before is None or before.shape != after.shape:
        return None
    differs = before != after  # (Z, Y, X)
    slices = np.flatnonzero(differs.reshape(differs.shape[0], -1).any(1))
    if not slices.size:
        return None
    z, rows, cols = np.nonzero(differs[slices])  # only the slices that changed
    return int(np.median(slices[z])), int(np.median(rows)), int(np.median(cols))


def _nearest_first(boxes: Iterator[Box], near: tuple[int, int] | None) -> list[Box]:
    """``boxes`` ordered by the distance of their centres from ``near`` (row,
    col); in their own order when ``near`` is ``None``."""
    boxes = list(boxes)
    if near is None:
        return boxes

    def distance(box: Box) -> float:
        return np.hypot(
            (box.r0 + box.r1) / 2 - near[0], (box.c0 + box.c1) / 2 - near[1]
        )

    return sorted(boxes, key=distance)


def preview_boxes(
    shape: tuple[int, int, int],
    view: Box | None,
    z: int,
    near: tuple[int, int] | None = None,
) -> Iterator[Box]:
    """Tiles of the visible region of slice ``z``, then the rest of that slice.

    The region's tiles come nearest to ``near`` (row, col: the latest strokes) first,
    so that on a large view the strokes' surroundings are shown first.
    """
    depth, height, width = shape
    z = min(max(z, 0), depth - 1)
    whole = Box(z, 0, height, 0, width)
    if view is None:
        yield from _nearest_first(iter_tiles(shape, LIVE_TILE, whole), near)
        return
    view = Box(
        z,
        max(0, view.r0),
        min(height, max(view.r1, view.r0 + 1)),
        max(0, view.c0),
        min(width, max(view.c1, view.c0 + 1)),
    )
    if view.r0 >= view.r1 or view.c0 >= view.c1:
        yield from _nearest_first(iter_tiles(shape, LIVE_TILE, whole), near)
        return
    yield from _nearest_first(iter_tiles(shape, LIVE_TILE, view), near)
    bands = (
        Box(z, 0, view.r0, 0, width),
        Box(z, view.r1, height, 0, width),
        Box(z, view.r0, view.r1, 0, view.c0),
        Box(z, view.r0, view.r1, view.c1, width),
    )
    for band in bands:
        if band.r0 < band.r1 and band.c0 < band.c1:
            yield from iter_tiles(shape, LIVE_TILE, band)


def volume_boxes(shape: tuple[int, int, int], slices: range, z: int) -> Iterator[Box]:
    """Tiles of the ``slices`` (within the image) of a ``(Z, Y, X)`` image: slice
    ``z`` first, then the others by their distance from it (``z - 1``, ``z + 1``,
    ``z - 2``, ...)."""
    for k in sorted(slices, key=lambda k: (abs(k - z), k)):
        yield from iter_tiles(shape, LIVE_TILE, Box(k, 0, shape[1], 0, shape[2]))


class PreviewSweep:
    """Where the preview stands in its pass over the image, across rounds."""

    def __init__(self) -> None:
        self._boxes: Iterator[Box] | None = None
        self._key: tuple | None = None

    def take(self, key: tuple, boxes: Callable[[], Iterator[Box]]) -> Box | None:
        """The next box of the pass, or ``None`` once it is done (the next call
        begins another). Another ``key`` (a new view, slice, shape or labels
        version: strokes are shown first) begins a new pass from ``boxes()``."""
        if self._boxes is None or self._key != key:
            self._boxes, self._key = boxes(), key
        box = next(self._boxes, None)
        if box is None:
            self._boxes = None
        return box


def _preview(
    session: LiveSession,
    mailbox: Mailbox,
    sweep: PreviewSweep,
    seconds: float | None,
) -> Iterator[Box]:
    """The boxes to predict after a round: the next ``seconds`` of the pass (at
    least one box; to its end if ``None``), which goes over the view, then the rest
    of its slice, or, while a volume is shown in 3D, over every slice of it, nearest
    first. Stops early when new labels wait."""
    view, z = mailbox.view()
    shape = session.image.shape[1:]
    slices = mailbox.volume() or range(0)
    slices = range(max(slices.start, 0), min(slices.stop, shape[0]))
    stroke = session.last_stroke
    if len(slices) >= 2:  # from the plane of the latest strokes, if any
        start_slice = stroke[0] if stroke and stroke[0] in slices else z
        key = (shape, slices, start_slice)
        boxes = partial(volume_boxes, shape, slices, start_slice)
    else:  # a 2D display, or a single plane
        near = stroke[1:] if stroke and stroke[0] == z else None
        key, boxes = (
            (shape, view, z, near),
            partial(preview_boxes, shape, view, z, near),
        )
    key = (*key, session.labels_version)
    start = time.perf_counter()
    while not mailbox.has_new_labels():
        box = sweep.take(key, boxes)
        if box is None:
            return
        yield box  # at least one a round, so the pass always moves on
        if seconds is not None and time.perf_counter() - start >= seconds:
            return


def iter_live(
    session: LiveSession,
    mailbox: Mailbox,
    round_seconds: float = 0.4,
    rounds: int | None = None,
) -> Generator[
    TrainStatus | PredictionUpdate | Waiting | Notice | TrainingPaused, None, None
]:
    """Train in rounds of ``round_seconds`` and stream predictions (forever by default).

    Yields after every step and every tile, so a worker can quit promptly. When the
    loss diverges the model goes back to its last good state and the loop ends with
    :class:`TrainingPaused`; out of GPU memory it shrinks the work and says so in a
    :class:`Notice`. Every few seconds, between rounds, the C heap's free pages go back
    to the OS (:class:`~napari_dsparse.memory.PeriodicRelease`), so that the memory
    of a long session stays flat.
    """
    done = 0
    release = PeriodicRelease()
    sweep = PreviewSweep()
    # Live, each round predicts for a bounded time, so that a large image or volume
    # does not starve training; a set number of rounds predicts each pass whole.
    preview_seconds = PREVIEW_SECONDS if rounds is None else None
    while rounds is None or done < rounds:
        ready = _take_snapshot(session, mailbox)
        yield from _notices(session)
        if not ready:
            yield Waiting(session.waiting_reason)
            time.sleep(0.05)
            continue
        diverged = yield from _train_round(session, mailbox, round_seconds)
        yield from _notices(session)
        if diverged:
            step = session.restore_last_good()
            yield TrainingPaused(
                f"training paused: {diverged}; the model is back at step "
                f"{step}. Lower the learning rate and press Train",
                step,
            )
            return
        if session.trainer is not None:  # predict under the image's class prior
            session.trainer.fit_class_prior()
        session.keep_last_good()
        for box in _preview(session, mailbox, sweep, preview_seconds):
            yield session.predict(box)
            yield from _notices(session)
        release()
        done += 1


def _notices(session: LiveSession) -> Iterator[Notice]:
    while session.notices:
        yield Notice(session.notices.pop(0))


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


def _step(session: LiveSession) -> tuple[float, str] | str:
    """One training step: its loss and mode, or why it diverged.

    Out of memory, the work shrinks (see :meth:`LiveSession.recover_from_out_of_memory`)
    and the step is tried again.
    """
    assert session.trainer is not None
    while True:
        try:
            loss, mode = session.trainer.step()
        except TrainingDiverged as error:
            return error.reason  # the widget gives its own advice
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            session.tell(session.recover_from_out_of_memory())
            continue
        if has_diverged(loss, session.trainer.classifier.patch_net):
            return (
                f"the loss exploded to {loss:.3g} at step {session.trainer.steps_done}"
            )
        return loss, mode


def _train_round(
    session: LiveSession, mailbox: Mailbox, seconds: float
) -> Generator[TrainStatus, None, str | None]:
    """Train for ``seconds``; returns why the loss diverged, or ``None``."""
    assert session.trainer is not None
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        outcome = _step(session)
        if isinstance(outcome, str):
            return outcome
        loss, mode = outcome
        yield TrainStatus(
            session.trainer.steps_done,
            loss,
            1 / max(time.perf_counter() - tick, 1e-9),
            tuple(int(c) for c in session.trainer.counts),
            mode,
            session.labels_version,
            session.trainer.learning_rate,
        )
        if mailbox.has_new_labels() and _take_snapshot(session, mailbox):
            # show the stroke soon: a short burst of steps, then the preview
            start = time.perf_counter() - seconds + min(seconds, AFTER_STROKE_SECONDS)
    return None
