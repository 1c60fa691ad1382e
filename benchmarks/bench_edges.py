"""Where a two-class task's errors lie, ours against the random forest's.

Trains one ``bench_training.py`` variant (its options but ``--ema``, the same
strokes) for the last of ``--steps`` and prints, for ours and the forest: mean IoU,
the mean IoU at the best threshold on P(second class) found with the truth known (an
oracle, for diagnosis only: it tells a shifted boundary from a poor ranking), false
"second class" and false "first class" pixels, and wrong pixels by distance to the
true edge. Then the oracle IoU of a single Gaussian-smoothed intensity per sigma,
the one-feature classifier a forest split can pick.

    .venv/bin/python benchmarks/bench_edges.py --tasks blobs --steps 3000 --seed 0
    .venv/bin/python benchmarks/bench_edges.py --tasks coins --steps 3000 --mix 0
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).parent))

from bench_quality import Forest, mean_iou
from bench_training import make_variant, parse_args
from napari_dsparse.predict import predict_proba

DISTANCE_BINS = ((0.0, 1.5), (1.5, 3.0), (3.0, np.inf))  # px from the true edge
THRESHOLDS = np.linspace(0.05, 0.95, 91)
SIGMAS = (1.0, 1.5, 2.0, 3.0, 4.0)


def edge_distance(truth: np.ndarray) -> np.ndarray:
    """Each pixel's distance to the nearest pixel of the other class."""
    second = truth == truth.max()
    return np.where(
        second, ndi.distance_transform_edt(second), ndi.distance_transform_edt(~second)
    )


def oracle_iou(truth: np.ndarray, score: np.ndarray, thresholds) -> float:
    """Best mean IoU of ``score > t`` as the second class over ``thresholds``."""
    first, second = np.unique(truth)
    return max(mean_iou(truth, np.where(score > t, second, first)) for t in thresholds)


def row(name: str, truth: np.ndarray, p_second: np.ndarray, distance) -> str:
    """One table row for the probabilities ``p_second`` of the second class."""
    first, second = np.unique(truth)
    classes = np.where(p_second > 0.5, second, first)
    wrong = classes != truth
    by_distance = [
        int((wrong & (distance > a) & (distance <= b)).sum()) for a, b in DISTANCE_BINS
    ]
    cells = [
        name,
        f"{mean_iou(truth, classes):.4f}",
        f"{oracle_iou(truth, p_second, THRESHOLDS):.4f}",
        str(int((wrong & (truth == first)).sum())),
        str(int((wrong & (truth == second)).sum())),
        *map(str, by_distance),
    ]
    return "| " + " | ".join(cells) + " |"


def smoothed_rows(image: np.ndarray, truth: np.ndarray) -> list[str]:
    """Oracle IoU of each Gaussian-smoothed intensity (one channel)."""
    rows = []
    for sigma in SIGMAS:
        smooth = ndi.gaussian_filter(image.astype(np.float64), sigma)
        levels = np.quantile(smooth, np.linspace(0.01, 0.99, 197))
        brighter = oracle_iou(truth, smooth, levels)
        darker = oracle_iou(truth, -smooth, -levels)
        rows.append(f"| sigma {sigma:g} | {max(brighter, darker):.4f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.ema:
        sys.exit(
            "bench_edges.py: --ema is not supported (it predicts with the live weights)"
        )
    torch.set_num_threads(args.threads)
    print(" ".join(sys.argv[1:]) or "(defaults)")
    for name in args.tasks:
        variant = make_variant(name, args)
        truth = variant.task.truth
        if len(np.unique(truth)) != 2:
            print(f"{name}: skipped, {len(np.unique(truth))} classes (this needs 2)")
            continue
        for _ in range(max(args.steps)):
            variant.trainer.step()
        variant.trainer.fit_class_prior()
        ours = predict_proba(variant.trainer.classifier, variant.image)[:, 0][
            -1
        ]  # (Y, X)
        forest = Forest(variant.task, args.seed).probabilities(variant.labels)[-1]
        distance = edge_distance(truth)
        bins = [
            f"wrong {a:g}-{b:g} px" if np.isfinite(b) else f"wrong > {a:g} px"
            for a, b in DISTANCE_BINS
        ]
        header = ["", "IoU", "oracle IoU", "false 2nd", "false 1st", *bins]
        print(f"\n{name}, {max(args.steps)} steps, seed {args.seed}")
        print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
        print(row("ours", truth, ours, distance))
        print(row("forest", truth, forest, distance))
        if variant.image.shape[0] == 1 and variant.image.shape[1] == 1:
            print("\n| one smoothed intensity | oracle IoU |\n| --- | --- |")
            print("\n".join(smoothed_rows(variant.image[0, 0], truth)))


if __name__ == "__main__":
    main()
