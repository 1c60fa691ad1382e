"""Long live session: memory, threads and update latency over time (run under Xvfb).

    xvfb-run -a python benchmarks/soak.py [--seconds 600] [--size 1024]

A real viewer with the widget docked trains live without pause while a stroke of
the true class is painted every ``--stroke-every`` seconds. Every ``--sample-every``
seconds the process's resident memory (RSS) and thread count are recorded; each
stroke is timed to the first redraw that includes a prediction from labels with it.
At the end the viewer is closed *while training*: the worker must stop and, within
the 30 s for which Qt's thread pools keep idle threads (``expiryTimeout``), no more
OS threads may remain than before training started.
Targets: RSS growth <= 50 MB after the first minute (the first third of shorter
runs); no thread leak; update latency stable (median of the last third of strokes
<= 1.5 x that of the first third + 0.1 s).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from bench_ui import open_live_viewer, paint_stroke, record_redraws

RSS_GROWTH_MB = 50.0
WARM_UP_SECONDS = 60.0
# Idle pooled Qt threads exit after 30 s (QThreadPool.expiryTimeout); a leaked
# thread never does. The global pool is joined at once; other pools are waited for.
THREAD_SETTLE_SECONDS = 40.0


def _sample(process: psutil.Process, start: float) -> tuple[float, float, int]:
    """(seconds since start, RSS in MB, OS threads)."""
    rss = process.memory_info().rss / 2**20
    return time.perf_counter() - start, rss, process.num_threads()


def _os_threads() -> dict[int, str]:
    """This process's OS threads, thread id -> name (Linux; empty elsewhere)."""
    threads = {}
    for comm in Path("/proc/self/task").glob("*/comm"):
        with contextlib.suppress(OSError):
            threads[int(comm.parent.name)] = comm.read_text().strip()
    return threads


def _settle_threads(process: psutil.Process, limit: int) -> float:
    """Seconds until at most ``limit`` OS threads remain (gives up after the settle
    time), processing Qt events meanwhile."""
    from qtpy.QtWidgets import QApplication

    start = time.perf_counter()
    while (
        process.num_threads() > limit
        and time.perf_counter() - start < THREAD_SETTLE_SECONDS
    ):
        QApplication.processEvents()
        time.sleep(0.1)
    return time.perf_counter() - start


def run(size: int, seconds: float, stroke_every: float, sample_every: float) -> dict:
    from qtpy.QtCore import QThreadPool
    from qtpy.QtWidgets import QApplication

    process = psutil.Process()
    viewer, widget, scribbles, truth, rng = open_live_viewer(size)
    shown = record_redraws(widget)
    threads_before = process.num_threads()
    os_threads_before = _os_threads()
    widget.start()
    start = time.perf_counter()
    samples, strokes = [_sample(process, start)], []
    next_stroke = next_sample = start
    while time.perf_counter() - start < seconds:
        now = time.perf_counter()
        if now >= next_stroke:
            paint_stroke(scribbles, truth, rng)
            QApplication.processEvents()  # the snapshot is posted on the next turn
            strokes.append((time.perf_counter(), widget._mailbox.posted))
            next_stroke += stroke_every
        if now >= next_sample:
            samples.append(_sample(process, start))
            next_sample += sample_every
        QApplication.processEvents()
        time.sleep(0.002)
    samples.append(_sample(process, start))
    steps = widget._session.trainer.steps_done
    worker = widget._worker
    viewer.close()  # while training
    deadline = time.perf_counter() + 5.0
    while worker.is_running and time.perf_counter() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    stopped = not worker.is_running
    for _ in range(50):  # let Qt wind down
        QApplication.processEvents()
        time.sleep(0.02)
    # Qt keeps idle pooled threads for 30 s (expiryTimeout). waitForDone joins the
    # global pool's; _settle_threads waits out those of other pools.
    pool_drained = QThreadPool.globalInstance().waitForDone(10_000)
    settle_s = _settle_threads(process, threads_before)
    os_threads_after = _os_threads()
    new_threads = [n for t, n in os_threads_after.items() if t not in os_threads_before]
    latencies = [
        next((t - t0 for t, version in shown if t >= t0 and version >= v), np.nan)
        for t0, v in strokes
    ]
    return {
        "samples": samples,
        "latencies": latencies,
        "steps": steps,
        "threads_before": threads_before,
        "threads_after_close": process.num_threads(),
        "python_threads_after_close": [t.name for t in threading.enumerate()],
        "os_threads_after_close": sorted(os_threads_after.values()),
        "new_os_threads_after_close": sorted(new_threads),
        "pool_drained": pool_drained,
        "threads_settle_s": settle_s,
        "stopped_after_close": stopped,
        "seconds": seconds,
    }


def summarise(result: dict) -> dict[str, float]:
    """The figures the targets are about."""
    samples = np.asarray(result["samples"])  # (n, 3): t, RSS MB, threads
    warm_up = min(WARM_UP_SECONDS, result["seconds"] / 3)
    warm = samples[samples[:, 0] >= warm_up]
    latencies = np.asarray(result["latencies"])
    third = max(1, len(latencies) // 3)
    return {
        "rss_start_mb": samples[0, 1],
        "rss_after_warm_up_mb": warm[0, 1],
        "rss_end_mb": samples[-1, 1],
        "rss_growth_after_warm_up_mb": warm[:, 1].max() - warm[0, 1],
        "threads_training_min": warm[:, 2].min(),
        "threads_training_max": warm[:, 2].max(),
        "threads_before_training": result["threads_before"],
        "threads_after_close": result["threads_after_close"],
        "worker_stopped_after_close": float(result["stopped_after_close"]),
        "qt_pool_drained_after_close": float(result["pool_drained"]),
        "threads_settle_s_after_close": result["threads_settle_s"],
        "latency_first_third_median_s": float(np.nanmedian(latencies[:third])),
        "latency_last_third_median_s": float(np.nanmedian(latencies[-third:])),
        "latency_max_s": float(np.nanmax(latencies)),
        "strokes": len(latencies),
        "strokes_unseen": int(np.isnan(latencies).sum()),
        "steps_per_s": result["steps"] / result["seconds"],
    }


def verdicts(summary: dict[str, float]) -> dict[str, bool]:
    first = summary["latency_first_third_median_s"]
    return {
        f"RSS growth <= {RSS_GROWTH_MB:.0f} MB after warm-up": (
            summary["rss_growth_after_warm_up_mb"] <= RSS_GROWTH_MB
        ),
        "no thread leak": (
            summary["threads_training_max"] - summary["threads_training_min"] <= 2
            and summary["threads_after_close"] <= summary["threads_before_training"]
            and summary["worker_stopped_after_close"] == 1
        ),
        "latency stable": summary["latency_last_third_median_s"] <= 1.5 * first + 0.1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--stroke-every", type=float, default=1.0)
    parser.add_argument("--sample-every", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = run(args.size, args.seconds, args.stroke_every, args.sample_every)
    print("| t (s) | RSS (MB) | threads |")
    print("| ---: | ---: | ---: |")
    for t, rss, threads in result["samples"]:
        print(f"| {t:.0f} | {rss:.0f} | {threads} |")
    summary = summarise(result)
    print(f"\n| {args.size}², {args.seconds:.0f} s | value |")
    print("| --- | ---: |")
    for key, value in summary.items():
        print(f"| {key} | {value:.3g} |")
    print()
    for target, met in verdicts(summary).items():
        print(f"target {target}: {'met' if met else 'MISSED'}")
    names = ", ".join(result["python_threads_after_close"])
    print(f"Python threads after closing the viewer: {names}")
    print(f"OS threads after closing: {', '.join(result['os_threads_after_close'])}")
    new = ", ".join(result["new_os_threads_after_close"]) or "none"
    print(f"OS threads started while training that are still there: {new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
