"""Latency of the live loop: training speed and label update -> updated prediction.

For 512² and 1024² images (noisy blobs, simulated scribbles) and the default preset:

1. core figures: training steps/s; ``Trainer.set_labels``; one step; prediction of a
   512 x 512 view (``predict_proba(region=...)``) and of the whole image. "update ->
   view" adds set_labels + one step + the view, "update -> whole" set_labels + one
   step + the whole image: the least a live loop must spend.
2. the live loop itself (``live.iter_live``, driven as napari's worker would): a new
   snapshot is posted at a random moment (mid-round or mid-preview) and the clock
   runs until every tile of the view, then of the whole image, comes from a model
   that has trained on it.

3. label snapshots of a volume (``VOLUME_SLICES`` x 1024 x 1024, strokes on a few
   slices): the worker's time to take a posted snapshot (copy, checks, counts,
   the stroke's centre, the training set's index), beside one count over every
   pixel (``np.bincount``), which is what it used to cost at least.

Targets on 2 CPU cores (issue 4): >= 5 steps/s; update -> 512² view <= 0.5 s;
update -> whole 1024² image <= 2 s.

    .venv/bin/python benchmarks/bench_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from napari_dsparse.data import Normalization, as_channels_first
from napari_dsparse.live import LiveSession, Mailbox, PredictionUpdate, iter_live
from napari_dsparse.model import Classifier
from napari_dsparse.nets import DEFAULT_PRESET
from napari_dsparse.predict import Box, labels_and_uncertainty, predict_proba
from napari_dsparse.scribbles import correction_strokes, initial_strokes
from napari_dsparse.train import TrainConfig, Trainer
from tasks import Task, blobs

TORCH_THREADS = 2
VIEW = 512  # side of the visible region
VOLUME_SLICES = 100


@dataclass(frozen=True)
class CoreTimes:
    """Medians in seconds, except ``steps_per_second``."""

    size: int
    steps_per_second: float
    set_labels: float
    step: float
    view: float
    whole: float


@dataclass(frozen=True)
class LiveTimes:
    """Seconds from posting a snapshot to the view / whole image being updated."""

    size: int
    view: list[float]
    whole: list[float]


def _scribbled(size: int, seed: int) -> tuple[Task, np.ndarray, list[np.ndarray]]:
    """A task, its first scribbles and a series of corrected snapshots."""
    task = blobs(size)
    rng = np.random.default_rng(seed)
    labels = initial_strokes(task.truth, rng, strokes_per_class=4)
    wrong = np.where(task.truth == 1, 2, 1)  # every pixel wrong: strokes anywhere
    snapshots = [labels]
    for _ in range(12):
        snapshots.append(correction_strokes(task.truth, wrong, snapshots[-1], rng))
    return task, labels, snapshots[1:]


def _view_box(size: int) -> Box:
    start = (size - VIEW) // 2
    return Box(0, start, start + VIEW, start, start + VIEW)


def _timed(function, *args, **kwargs) -> float:
    tick = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - tick


def _predict_labels(classifier: Classifier, image: np.ndarray, **kwargs) -> None:
    labels_and_uncertainty(predict_proba(classifier, image, **kwargs))


def measure_core(size: int, seconds: float, repeats: int, seed: int) -> CoreTimes:
    """Steps/s over ``seconds`` of training, then ``repeats`` label updates."""
    task, labels, snapshots = _scribbled(size, seed)
    image = as_channels_first(task.image)  # (1, 1, Y, X)
    classifier = Classifier.create(
        1, task.class_names, Normalization.from_image(image), DEFAULT_PRESET, seed
    )
    trainer = Trainer(classifier, image, labels, TrainConfig(seed=seed))
    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        trainer.step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.step()
        steps += 1
    rate = steps / (time.perf_counter() - start)
    times = {"set_labels": [], "step": [], "view": [], "whole": []}
    for snapshot in snapshots[:repeats]:
        times["set_labels"].append(_timed(trainer.set_labels, snapshot))
        times["step"].append(_timed(trainer.step))
        times["view"].append(
            _timed(_predict_labels, classifier, image, region=_view_box(size))
        )
        times["whole"].append(_timed(_predict_labels, classifier, image))
    medians = {name: float(np.median(values)) for name, values in times.items()}
    return CoreTimes(size, rate, **medians)


def _covered(updates: list[PredictionUpdate], box: Box) -> bool:
    mask = np.zeros((box.r1 - box.r0, box.c1 - box.c0), bool)
    for update in updates:
        b = update.box
        r0, r1 = max(b.r0, box.r0), min(b.r1, box.r1)
        c0, c1 = max(b.c0, box.c0), min(b.c1, box.c1)
        if r0 < r1 and c0 < c1:
            mask[r0 - box.r0 : r1 - box.r0, c0 - box.c0 : c1 - box.c0] = True
    return bool(mask.all())


def _time_one_update(
    events, mailbox: Mailbox, snapshot: np.ndarray, size: int
) -> tuple[float, float]:
    """Post ``snapshot`` now; seconds until the view, then the image, show it."""
    version = mailbox.post_labels(snapshot)
    posted = time.perf_counter()
    fresh: list[PredictionUpdate] = []
    view_seconds = None
    whole = Box(0, 0, size, 0, size)
    for event in events:
        if isinstance(event, PredictionUpdate) and event.labels_version >= version:
            fresh.append(event)
            if view_seconds is None and _covered(fresh, _view_box(size)):
                view_seconds = time.perf_counter() - posted
            if _covered(fresh, whole):
                assert view_seconds is not None
                return view_seconds, time.perf_counter() - posted
    raise RuntimeError("the live loop ended early")


def measure_live(size: int, repeats: int, seed: int) -> LiveTimes:
    """Drive ``iter_live`` and post snapshots at random moments."""
    task, labels, snapshots = _scribbled(size, seed)
    session = LiveSession(as_channels_first(task.image), task.class_names)
    mailbox = Mailbox()
    mailbox.post_labels(labels)
    mailbox.post_view(_view_box(size))
    events = iter_live(session, mailbox)
    rng = np.random.default_rng(seed)
    view, whole = [], []
    for snapshot in snapshots[:repeats]:
        for _ in range(int(rng.integers(1, 40))):  # a random point in the loop
            next(events)
        view_seconds, whole_seconds = _time_one_update(events, mailbox, snapshot, size)
        view.append(view_seconds)
        whole.append(whole_seconds)
    events.close()
    return LiveTimes(size, view, whole)


@dataclass(frozen=True)
class SnapshotTimes:
    """Seconds per label snapshot of a volume, and of one count over its pixels."""

    shape: tuple[int, int, int]
    snapshot: list[float]
    count_every_pixel: float


def measure_snapshots(slices: int, repeats: int, seed: int) -> SnapshotTimes:
    """Post a stroke at a time on a volume; time the worker taking each snapshot."""
    rng = np.random.default_rng(seed)
    shape = (slices, 1024, 1024)
    image = rng.random((1, *shape), dtype=np.float32)
    labels = np.zeros(shape, np.uint8)
    middle = slices // 2
    labels[middle, 100:110, 100:400], labels[middle, 600:610, 100:400] = 1, 2
    session, mailbox = LiveSession(image, ("a", "b")), Mailbox()
    mailbox.post_labels(labels)
    session.set_labels(*mailbox.take_labels())  # the first one builds the model
    times = []
    for _ in range(repeats):
        z, row, col = int(rng.integers(slices)), *rng.integers(0, 1000, 2)
        labels[z, row : row + 5, col : col + 20] = rng.integers(1, 3)  # a stroke
        version = mailbox.post_labels(labels)
        start = time.perf_counter()
        snapshot, taken = mailbox.take_labels()
        session.set_labels(snapshot, taken)
        times.append(time.perf_counter() - start)
        assert taken == version
    count = _timed(np.bincount, labels.ravel())
    return SnapshotTimes(shape, times, count)


def format_snapshots(t: SnapshotTimes) -> str:
    z, y, x = t.shape
    return "\n".join(
        [
            "| volume | snapshot ms, median (max) | one count over every pixel ms "
            "| snapshots |",
            "| --- | --- | --- | --- |",
            f"| {z} x {y} x {x} uint8 | {1e3 * np.median(t.snapshot):.0f} "
            f"({1e3 * max(t.snapshot):.0f}) | {1e3 * t.count_every_pixel:.0f} "
            f"| {len(t.snapshot)} |",
        ]
    )


def format_tables(core: list[CoreTimes], live: list[LiveTimes]) -> str:
    lines = [
        "| image | steps/s | set_labels ms | step ms | 512² view ms | whole ms "
        "| update -> view ms | update -> whole ms |",
        "|" + " --- |" * 8,
    ]
    for c in core:
        lines.append(
            f"| {c.size}² | {c.steps_per_second:.1f} | {1e3 * c.set_labels:.0f} "
            f"| {1e3 * c.step:.0f} | {1e3 * c.view:.0f} | {1e3 * c.whole:.0f} "
            f"| {1e3 * (c.set_labels + c.step + c.view):.0f} "
            f"| {1e3 * (c.set_labels + c.step + c.whole):.0f} |"
        )
    lines += [
        "",
        "| image | live: update -> view s, median (max) "
        "| live: update -> whole image s, median (max) | updates |",
        "| --- | --- | --- | --- |",
    ]
    for t in live:
        lines.append(
            f"| {t.size}² | {np.median(t.view):.2f} ({max(t.view):.2f}) "
            f"| {np.median(t.whole):.2f} ({max(t.whole):.2f}) | {len(t.view)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=TORCH_THREADS)
    parser.add_argument(
        "--volume-slices",
        type=int,
        default=VOLUME_SLICES,
        help="slices of the 1024 x 1024 volume whose label snapshots are timed",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = f"{os.getloadavg()[0]:.2f}"
    seconds, repeats = (3.0, 3) if args.quick else (15.0, 10)
    core, live = [], []
    for size in (512, 1024):
        print(f"measuring {size}² ...", file=sys.stderr, flush=True)
        core.append(measure_core(size, seconds, repeats, args.seed))
        live.append(measure_live(size, repeats, args.seed))
    print(f"measuring snapshots of {args.volume_slices} slices ...", file=sys.stderr)
    snapshots = measure_snapshots(args.volume_slices, repeats, args.seed)
    print(
        f"torch {torch.__version__}, {args.threads} threads, preset "
        f"{DEFAULT_PRESET}; medians of {repeats} label updates; 1-min load "
        f"average {load_before} before, {os.getloadavg()[0]:.2f} after\n"
    )
    print(format_tables(core, live))
    print()
    print(format_snapshots(snapshots))


if __name__ == "__main__":
    main()
