"""Dense sparse-kernel networks vs patch-by-patch classification: one command.

    .venv/bin/python benchmarks/bench_sparse.py          # docs/algorithm.md (~30 min)
    .venv/bin/python benchmarks/bench_sparse.py --quick  # a short run (about a minute)

Prints markdown tables: (1) the reference patch networks of docs/DESIGN.md at
several image sizes: patch-by-patch time, dense time per strategy (forward, and
forward + masked backward), speedup, Mpx/s and GFLOP/s against the peak of a plain
convolution measured in the same run; (2) the strategy comparison behind the
``"auto"`` rule. All times are the best of ``--reps`` runs, float32, on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_dsparse.sparse import DenseNet, choose_strategy, iter_patches, to_dense

STRATEGIES = ("dilated", "space_to_batch")
PAINTED = 0.02  # fraction of pixels in the training mask


def conv_stack(channels: int, layers: list[tuple[str, int, int]]) -> list[nn.Module]:
    """("c", kernel, width) convolutions + ReLU and ("p", 2, 0) max pooling."""
    modules: list[nn.Module] = []
    for kind, size, width in layers:
        if kind == "p":
            modules.append(nn.MaxPool2d(size))
        else:
            modules += [nn.Conv2d(channels, width, size), nn.ReLU()]
            channels = width
    return modules


def reference_net(p: int, in_channels: int = 3, classes: int = 10) -> nn.Sequential:
    """The reference patch networks of docs/DESIGN.md (P = 33, 65, 133)."""
    c, pool = "c", ("p", 2, 0)
    layers = {
        33: [(c, 4, 32), pool, (c, 4, 64), pool, (c, 3, 64)],
        65: [(c, 4, 32), pool, (c, 4, 64), pool, (c, 3, 64), pool, (c, 3, 128)],
        133: [(c, 6, 32), pool, (c, 5, 64), pool, (c, 5, 64), pool, (c, 4, 128), pool],
    }[p]
    width, side = {33: (64, 4), 65: (128, 4), 133: (128, 5)}[p]
    return nn.Sequential(
        *conv_stack(in_channels, layers),
        nn.Flatten(),
        nn.Linear(width * side * side, 256),
        nn.ReLU(),
        nn.Linear(256, classes),
    )


def small_net(in_channels: int, classes: int = 3) -> nn.Sequential:
    """An interactive-size net: P = 33, widths 16/32/32, fc 64 (~50 k MACs/px)."""
    layers = [("c", 4, 16), ("p", 2, 0), ("c", 4, 32), ("p", 2, 0), ("c", 3, 32)]
    return nn.Sequential(
        *conv_stack(in_channels, layers),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


def volume_net(classes: int = 3) -> nn.Sequential:
    """A 3D net: P = 23, widths 8/16/16, fc 32."""
    return nn.Sequential(
        nn.Conv3d(1, 8, 4),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(8, 16, 3),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(16, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, classes),
    )


class Best(dict):
    """Running minimum per key: the run least disturbed by other load."""

    def add(self, key: object, seconds: float) -> None:
        self[key] = min(self.get(key, float("inf")), seconds)


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def conv_gflops() -> float:
    """GFLOP/s of a plain 5 x 5, 64 -> 64 convolution on 256 x 256, channels_last."""
    x = torch.randn(1, 64, 256, 256).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 5, 5)
    with torch.no_grad():
        F.conv2d(x, w)  # warm-up
        return 2 * 252 * 252 * 64 * 64 * 25 / timed(lambda: F.conv2d(x, w)) / 1e9


@dataclass
class PatchRunner:
    """Patch-by-patch at one batch size and layout, gathering included."""

    net: nn.Sequential
    patch_size: int
    batch_size: int
    layout: str
    measured: int = 0

    def seconds_per_patch(self, budget: float) -> float:
        """Run batches of patches of a 256 x 256 image for about ``budget`` s."""
        x = torch.randn(1, self.net[0].in_channels, 256, 256)
        patches = iter_patches(x, self.patch_size, self.batch_size)
        fmt = torch.contiguous_format if self.layout == "nchw" else torch.channels_last
        done, elapsed = 0, 0.0
        with torch.no_grad():
            self.net(next(patches).contiguous(memory_format=fmt))  # warm-up
            while elapsed < budget:
                batch = next(patches)
                elapsed += timed(
                    lambda b=batch: self.net(b.contiguous(memory_format=fmt))
                )
                done += len(batch)
        self.measured += done
        return elapsed / done


def patch_runners(net: nn.Sequential, p: int) -> list[PatchRunner]:
    """Patch-by-patch in both layouts (NCHW, channels_last) at two batch sizes."""
    return [
        PatchRunner(net, p, batch, layout)
        for layout, batch in itertools.product(("nchw", "channels_last"), (64, 256))
    ]


def dense_runs(dense: DenseNet, x: torch.Tensor) -> dict[tuple[str, str], Callable]:
    """Forward, forward + masked backward, and the sparse-head step, per strategy."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand((x.shape[0], *x.shape[2:]), generator=gen) < PAINTED
    target = torch.randint(dense.num_classes, (int(mask.sum()),), generator=gen)

    def forward(strategy: str) -> None:
        with torch.no_grad():
            dense(x, strategy=strategy)

    def train(strategy: str) -> None:
        dense.zero_grad()
        logits = dense(x, strategy=strategy).movedim(1, -1)[mask]  # (M, K)
        F.cross_entropy(logits, target).backward()

    def train_pixels(strategy: str) -> None:
        dense.zero_grad()
        F.cross_entropy(dense.pixels(x, mask, strategy=strategy), target).backward()

    runs = {"fwd": forward, "train": train, "pixels": train_pixels}
    return {
        (name, strategy): (lambda f=fn, s=strategy: f(s))
        for name, fn in runs.items()
        for strategy in STRATEGIES
    }


@dataclass
class Row:
    p: int
    size: int
    dense: DenseNet
    runners: list[PatchRunner]
    patch: Best  # seconds per patch by runner index, shared by a net's rows
    best: Best


def measure_reference(
    nets: list[int], sizes: list[int], reps: int, budget: float, peaks: list[float]
) -> list[Row]:
    """Patch-by-patch, dense runs and the conv peak, interleaved rep by rep.

    Every configuration runs in every rep and keeps its best time, so a busy
    moment on the shared machine penalises neither side more than the other.
    """
    rows = []
    for p in nets:
        torch.manual_seed(p)
        dense = to_dense(reference_net(p))
        assert dense.patch_size == p
        runners, patch = patch_runners(dense.patch_net, p), Best()
        for size in sizes:
            x = torch.randn(1, 3, size, size)
            best, runs = Best(), dense_runs(dense, x)
            for _ in range(reps):
                peaks.append(conv_gflops())
                for i, runner in enumerate(runners):
                    patch.add(i, runner.seconds_per_patch(budget))
                for key, run in runs.items():
                    best.add(key, timed(run))
            rows.append(Row(p, size, dense, runners, patch, best))
            print(f"measured P={p} {size}²", file=sys.stderr, flush=True)
    return rows


def format_row(row: Row, peak: float) -> str:
    t, size = row.best, row.size
    fwd = t["fwd", choose_strategy(torch.empty(0), grad=False)]
    fastest = min(row.patch, key=row.patch.get)
    runner, measured = row.runners[fastest], sum(r.measured for r in row.runners)
    patchwise_s = row.patch[fastest] * size * size
    nchw = min(t for i, t in row.patch.items() if row.runners[i].layout == "nchw")
    gflops = 2 * row.dense.macs((size, size)) / fwd / 1e9
    cells = [
        f"{row.p}",
        f"{size}²",
        f"{patchwise_s:,.0f} (bs {runner.batch_size}, {runner.layout}; "
        f"{measured:,} patches run)",
        *(f"{t['fwd', s]:.2f}" for s in STRATEGIES),
        f"**{patchwise_s / fwd:,.0f}x**",
        f"{nchw * size * size / fwd:,.0f}x",
        f"{size * size / fwd / 1e6:.2f}",
        f"{gflops:.0f} ({100 * gflops / peak:.0f}%)",
        *(f"{t[k, s]:.2f}" for k in ("train", "pixels") for s in STRATEGIES),
    ]
    return f"| {' | '.join(cells)} |"


@contextmanager
def busy_neighbour() -> Iterator[None]:
    """Another process spinning on one core, as a GUI or a second job would."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def strategy_rows(quick: bool, reps: int) -> list[str]:
    """Dilated vs space-to-batch beyond the reference nets: narrow, 1-channel, 3D."""
    cases = [
        ("small, 1 ch", small_net(1), (1, 1, 512, 512)),
        ("small, 3 ch", small_net(3), (1, 3, 512, 512)),
        ("small, 1 ch, batch 8", small_net(1), (8, 1, 128, 128)),
        ("3D, P=23", volume_net(), (1, 1, 64, 64, 64)),
        ("reference P=33", reference_net(33), (1, 3, 512, 512)),
        ("reference P=65", reference_net(65), (1, 3, 512, 512)),
    ]
    if quick:
        cases = [
            (n, net, (*s[:2], *(min(d, 128) for d in s[2:]))) for n, net, s in cases
        ]
    rows = []
    for name, net, shape in cases:
        torch.manual_seed(0)
        x = torch.randn(shape)
        best, runs = Best(), dense_runs(to_dense(net), x)
        for _ in range(reps):
            for key, run in runs.items():
                if key[0] != "pixels":
                    best.add(key, timed(run))
            with busy_neighbour():
                for s in STRATEGIES:
                    best.add(("busy", s), timed(runs["train", s]))
        rows.append(strategy_row(name, x, best))
        print(rows[-1], flush=True)
    return rows


def strategy_row(name: str, x: torch.Tensor, best: Best) -> str:
    kinds = ("fwd", "train", "busy")
    cells = [f"{best[k, s]:.2f}" for k in kinds for s in STRATEGIES]
    faster = [min(STRATEGIES, key=lambda s, k=k: best[k, s]) for k in kinds]
    auto = [choose_strategy(x, grad=g) for g in (False, True)]
    return (
        f"| {name} | {'x'.join(map(str, x.shape))} | {' | '.join(cells)} "
        f"| {' / '.join(faster)} | {' / '.join(auto)} |"
    )


def header(*columns: str) -> str:
    return f"| {' | '.join(columns)} |\n|{' --- |' * len(columns)}"


REFERENCE_HEADER = header(
    "P",
    "image",
    "patch-by-patch, s (extrapolated)",
    "dense fwd dilated, s",
    "dense fwd space-to-batch, s",
    "speedup vs best patch-by-patch (auto)",
    "speedup vs NCHW patch-by-patch",
    "Mpx/s (auto)",
    "GFLOP/s (auto, % of conv peak)",
    "fwd + masked bwd dilated, s",
    "fwd + masked bwd s2b, s",
    "`pixels()` fwd + bwd dilated, s",
    "`pixels()` fwd + bwd s2b, s",
)
STRATEGY_HEADER = header(
    "network",
    "input",
    "fwd dilated",
    "fwd s2b",
    "fwd + bwd dilated",
    "fwd + bwd s2b",
    "fwd + bwd dilated, busy core",
    "fwd + bwd s2b, busy core",
    "faster (fwd / fwd + bwd / busy)",
    "auto picks (fwd / fwd + bwd)",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 rep")
    parser.add_argument("--reps", type=int, default=None, help="best of N (3)")
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    nets, sizes = ([33, 65], [256]) if args.quick else ([33, 65, 133], [256, 512, 644])
    budget = 0.5 if args.quick else 1.5  # seconds per patch-by-patch config

    load = os.getloadavg()[0]
    peaks = [conv_gflops()]
    rows = measure_reference(nets, sizes, reps, budget, peaks)
    peak = max(peaks)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}; load average {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at the end. Best of {reps} interleaved runs.\n"
        f"Plain 5x5 64->64 convolution peak: {peak:.0f} GFLOP/s (best of "
        f"{len(peaks)}, median {statistics.median(peaks):.0f}).\n"
    )
    print(REFERENCE_HEADER)
    for row in rows:
        print(format_row(row, peak))
    print(
        "\nPatch-by-patch: the best per-patch time of batch sizes 64 and 256 in "
        "NCHW and channels_last (gathering included; the stated number of patches "
        "were run in all, by all configurations and sizes of that network), "
        "multiplied by the number of pixels. Speedup, Mpx/s and GFLOP/s use the "
        "forward strategy `auto` picks for prediction. Training: cross-entropy over "
        f"{PAINTED:.0%} of the pixels.\n",
        flush=True,
    )
    print(
        "Strategies, seconds. Busy core: forward + backward while another process "
        "spins on one core (as napari's GUI or a second job would).\n"
    )
    print(STRATEGY_HEADER, flush=True)
    strategy_rows(args.quick, reps)


if __name__ == "__main__":
    main()
