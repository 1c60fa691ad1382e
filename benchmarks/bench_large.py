"""Training and prediction on an image far larger than its activations: speed and RSS.

An N x N uint16 image (default 8192², 64 Mpx) is written as a tiled, compressed TIFF
tile by tile (noisy blobs), with painted strokes of two classes in a tiled label TIFF.
Then, each in a child process whose peak resident memory is measured from outside
(``/usr/bin/time -v``, else by polling ``VmHWM`` in ``/proc``):

1. ``napari-dsparse train IMAGE LABELS --steps S`` (crops around the strokes);
2. ``napari-dsparse predict MODEL IMAGE --memory M`` (tiles sized from M, written
   incrementally into a tiled TIFF);

and finally a region at the image corner and one in the middle are predicted in one
untiled pass here and compared with the tiled output.

Targets (issue 6), default preset, 2 CPU cores: peak RSS <= 1.5 GB for prediction and
<= 2 GB for training, where a naive whole-image pass would need tens of GB.

    .venv/bin/python benchmarks/bench_large.py              # 8192², a quiet machine
    .venv/bin/python benchmarks/bench_large.py --size 2048  # quick
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import tifffile
from scipy.ndimage import gaussian_filter

from napari_dsparse.export import load_classifier
from napari_dsparse.large import activation_bytes_per_pixel, open_lazy, parse_memory
from napari_dsparse.predict import Box, labels_and_uncertainty, predict_proba

TILE = 512  # TIFF tile of the generated image
REGION = 512  # side of the regions checked against an untiled pass


@dataclass(frozen=True)
class Run:
    """One measured child process."""

    what: str
    seconds: float
    peak_rss: int  # bytes
    returncode: int


def write_image(path: Path, size: int, seed: int = 0) -> None:
    """Blobs on a noisy background, tile by tile (never the whole image in memory)."""
    _write_tiled(path, size, np.uint16, partial(_blob_tile, seed))


def _write_tiled(path: Path, size: int, dtype, tile_at) -> None:
    """A tiled zlib BigTIFF of ``size``², filled by ``tile_at(r0, c0, h, w)``."""

    def tiles():
        for r0 in range(0, size, TILE):
            for c0 in range(0, size, TILE):
                yield tile_at(r0, c0, min(TILE, size - r0), min(TILE, size - c0))

    tifffile.imwrite(
        path,
        data=tiles(),
        shape=(size, size),
        dtype=dtype,
        tile=(TILE, TILE),
        compression="zlib",
        bigtiff=True,
    )


def _blob_tile(seed: int, r0: int, c0: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng([seed, r0, c0])
    field = gaussian_filter(rng.normal(size=(height, width)), 12, mode="wrap")
    blobs = field > 0.01
    noise = rng.normal(0, 120, (height, width))
    return (1000 + 1200 * blobs + noise).clip(0, 65535).astype(np.uint16)


def write_labels(path: Path, image_path: Path, size: int) -> None:
    """Strokes on blobs (2) and background (1) in a few tiles spread over the image."""
    image = open_lazy(image_path)
    painted = {}
    for k, r0 in enumerate(range(0, size, max(TILE, size // 4))):
        c0 = (k * 3 * TILE) % size
        tile = np.asarray(image[r0 : r0 + TILE, c0 : c0 + TILE])
        labels = np.zeros(tile.shape, np.uint8)
        rows = slice(TILE // 4, TILE // 4 + 200, 4)  # every 4th row: thin strokes
        labels[rows][tile[rows] > 1700] = 2
        labels[rows][tile[rows] < 1300] = 1
        painted[(r0, c0)] = labels

    def tile_at(r0: int, c0: int, height: int, width: int) -> np.ndarray:
        blank = np.zeros((height, width), np.uint8)
        return painted.get((r0, c0), blank)[:height, :width]

    _write_tiled(path, size, np.uint8, tile_at)


def measure(what: str, command: list[str], threads: int) -> Run:
    """Run ``command``; its wall time and peak RSS measured from outside."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    timer = shutil.which("time") or "/usr/bin/time"
    start = time.perf_counter()
    if Path(timer).exists():
        result = subprocess.run(
            [timer, "-v", *command], env=env, capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
        peak = int(match.group(1)) * 1024 if match else -1
        code = result.returncode
        if code:
            print(result.stdout, result.stderr, file=sys.stderr)
    else:
        peak, code = _poll_peak(command, env)
        seconds = time.perf_counter() - start
    return Run(what, seconds, peak, code)


def _poll_peak(command: list[str], env: dict[str, str]) -> tuple[int, int]:
    """Peak RSS (``VmHWM``) of a child, read from /proc until it exits."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max(peak, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024)
        except (OSError, AttributeError):
            pass
        time.sleep(0.05)
    return peak, process.returncode


def check_regions(model: Path, image_path: Path, output: Path, size: int) -> str:
    """Classes of the tiled output == one untiled pass, at a corner and the middle."""
    classifier = load_classifier(model)
    image = open_lazy(image_path)[None, None]  # (C, Z, Y, X), lazy
    result = open_lazy(output)
    middle = size // 2 - REGION // 2
    verdicts = []
    for name, r0, c0 in (("corner", 0, 0), ("middle", middle, middle)):
        box = Box(0, r0, r0 + REGION, c0, c0 + REGION)
        proba = predict_proba(classifier, image, region=box, tile=REGION)
        classes = labels_and_uncertainty(proba)[0]
        tiled = np.asarray(result[r0 : r0 + REGION, c0 : c0 + REGION])
        verdicts.append(
            f"{name} {'equal' if np.array_equal(classes, tiled) else 'DIFFERENT'}"
        )
    return ", ".join(verdicts)


def _print_table(args, classifier, train: Run, predict: Run) -> None:
    pixels = args.size**2
    window = (args.size + 2 * classifier.halo) ** 2
    whole_gib = activation_bytes_per_pixel(classifier) * window / 2**30
    budget = parse_memory(args.memory) / 2**30
    print(
        f"\nimage {args.size} x {args.size} uint16 ({pixels / 1e6:.0f} Mpx), preset "
        f"{classifier.preset.name} (P = {classifier.patch_size}), {args.threads} "
        f"torch threads, --memory {args.memory} ({budget:.2f} GiB)"
    )
    print(
        f"one whole-image pass would hold about {whole_gib:.0f} GiB (the tile "
        "estimate: every layer's output plus the input and output buffers)\n"
    )
    print("| run | seconds | Mpx/s | peak RSS (GB) | exit |")
    print("| --- | --- | --- | --- | --- |")
    rate = pixels / predict.seconds / 1e6
    print(
        f"| train ({args.steps} steps) | {train.seconds:.1f} | - | "
        f"{train.peak_rss / 1e9:.2f} | {train.returncode} |"
    )
    print(
        f"| predict | {predict.seconds:.1f} | {rate:.3f} | "
        f"{predict.peak_rss / 1e9:.2f} | {predict.returncode} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="image side (8192)")
    parser.add_argument("--memory", default="1GB", help="predict --memory (1GB)")
    parser.add_argument("--steps", type=int, default=50, help="training steps (50)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument(
        "--workdir", help="where to write (default: a temporary folder)"
    )
    parser.add_argument(
        "--train-only", action="store_true", help="measure training only"
    )
    args = parser.parse_args()
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="bench-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    image, labels, model, output = (
        folder / name for name in ("image.tif", "labels.tif", "model.pt", "classes.tif")
    )
    cli = [sys.executable, "-m", "napari_dsparse.cli"]
    tick = time.perf_counter()
    write_image(image, args.size)
    write_labels(labels, image, args.size)
    print(f"wrote {args.size}² image and labels in {time.perf_counter() - tick:.1f} s")
    train = measure(
        "train",
        [
            *cli,
            "train",
            str(image),
            str(labels),
            "-o",
            str(model),
            "--steps",
            str(args.steps),
            "--device",
            "cpu",
        ],
        args.threads,
    )
    if args.train_only:
        print(f"train: {train.seconds:.1f} s, peak RSS {train.peak_rss / 1e9:.2f} GB")
        return
    predict = measure(
        "predict",
        [
            *cli,
            "predict",
            str(model),
            str(image),
            "-o",
            str(output),
            "--memory",
            args.memory,
            "--device",
            "cpu",
            "-q",
        ],
        args.threads,
    )
    _print_table(args, load_classifier(model), train, predict)
    if predict.returncode == 0:
        verdict = check_regions(model, image, output, args.size)
        print(f"\nregions against an untiled pass: {verdict}")
    if not args.workdir:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
