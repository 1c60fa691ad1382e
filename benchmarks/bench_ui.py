"""Responsiveness of napari while training live (run under Xvfb).

    xvfb-run -a python benchmarks/bench_ui.py [--size 1024] [--seconds 30]

A real viewer with the widget docked trains live on a ``size``² image while strokes
are painted programmatically every ``--stroke-every`` seconds. A Qt timer ticking
every 10 ms measures how long the event loop stalls; each stroke is timed to the
first prediction tile shown that was computed from labels including it, and Train to
the first prediction shown (the model built, a first round trained and predicted).
Targets: no stall > 100 ms; stroke -> visible update <= 1 s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def synthetic_image(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy blobs and their truth, ``(size, size)`` float32 and uint8 (1, 2)."""
    from skimage import data, filters

    rng = np.random.default_rng(seed)
    mask = data.binary_blobs(
        size, blob_size_fraction=0.05, volume_fraction=0.4, rng=seed
    )
    image = filters.gaussian(mask.astype(float), 2) + rng.normal(0, 0.3, mask.shape)
    return image.astype(np.float32), mask.astype(np.uint8) + 1


class StallMeter:
    """Largest gap between ticks of a 10 ms Qt timer."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.gaps: list[float] = []
        self._last = time.perf_counter()
        self._timer = QTimer()
        self._timer.setInterval(10)
        self._timer.timeout.connect(self._tick)
        self._timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self._last = now


def paint_stroke(layer, truth: np.ndarray, rng: np.random.Generator) -> None:
    """A short horizontal stroke of the true class at a random place."""
    row = int(rng.integers(10, truth.shape[0] - 10))
    col = int(rng.integers(10, truth.shape[1] - 40))
    label = int(truth[row, col])
    for c in range(col, col + 30):
        if truth[row, c] == label:
            layer.paint((row, c), label, refresh=False)
    layer.refresh()


def open_live_viewer(size: int):
    """A viewer with the synthetic image, the widget docked and six strokes painted.

    Returns ``(viewer, widget, scribbles, truth, rng)``; training is not started.
    """
    import napari

    from napari_dsparse._widget import DsparseWidget

    image, truth = synthetic_image(size)
    viewer = napari.Viewer()
    viewer.add_image(image, name="image")
    widget = DsparseWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_scribbles_button.clicked.emit()
    scribbles = widget.scribble_picker.value
    scribbles.brush_size = 3
    rng = np.random.default_rng(1)
    for _ in range(6):
        paint_stroke(scribbles, truth, rng)
    return viewer, widget, scribbles, truth, rng


def record_redraws(widget) -> list[tuple[float, int]]:
    """A list that gets (time, newest labels version shown) at every redraw."""
    shown: list[tuple[float, int]] = []
    written = [0]
    original_show = widget._show_update

    def record_write(update) -> None:
        original_show(update)
        written[0] = max(written[0], update.labels_version)

    widget._show_update = record_write
    widget._refresh_timer.timeout.connect(
        lambda: shown.append((time.perf_counter(), written[0]))
    )
    return shown


def run(size: int, seconds: float, stroke_every: float) -> dict[str, float]:
    from qtpy.QtWidgets import QApplication

    viewer, widget, scribbles, truth, rng = open_live_viewer(size)
    shown = record_redraws(widget)
    pressed = time.perf_counter()
    widget.start()
    while not shown:  # the first update: model built, first round trained
        QApplication.processEvents()
    first_update = shown[0][0] - pressed
    meter = StallMeter()
    strokes: list[tuple[float, int]] = []
    start = next_stroke = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if time.perf_counter() >= next_stroke:
            paint_stroke(scribbles, truth, rng)
            QApplication.processEvents()  # the snapshot is posted on the next turn
            strokes.append((time.perf_counter(), widget._mailbox.posted))
            next_stroke += stroke_every
        QApplication.processEvents()
        time.sleep(0.002)
    steps = widget._session.trainer.steps_done
    worker = widget._worker
    widget.stop()
    deadline = time.perf_counter() + 10
    while worker.is_running and time.perf_counter() < deadline:
        QApplication.processEvents()  # let the worker end before its signals go
        time.sleep(0.01)
    viewer.close()
    latencies = [
        next((t - t0 for t, version in shown if t >= t0 and version >= v), np.nan)
        for t0, v in strokes
    ]
    return {
        "train_to_first_update_s": first_update,
        "max_stall_ms": 1000 * (max(meter.gaps) - 0.010),
        "p99_stall_ms": 1000 * (np.percentile(meter.gaps, 99) - 0.010),
        "stroke_to_update_mean_s": float(np.nanmean(latencies)),
        "stroke_to_update_max_s": float(np.nanmax(latencies)),
        "strokes_unseen": int(np.isnan(latencies).sum()),
        "strokes": len(strokes),
        "steps_per_s": steps / seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--stroke-every", type=float, default=2.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    result = run(args.size, args.seconds, args.stroke_every)
    print(f"| image | {args.size}² |")
    print("| --- | --- |")
    for key, value in result.items():
        print(f"| {key} | {value:.3g} |")
    stall_ok = result["max_stall_ms"] <= 100
    latency_ok = result["stroke_to_update_max_s"] <= 1
    print(
        f"\ntargets: max stall <= 100 ms ({'met' if stall_ok else 'MISSED'}), "
        f"stroke -> visible update <= 1 s ({'met' if latency_ok else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
