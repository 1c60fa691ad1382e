"""Training variants at equal step counts: what moves mean IoU, free of machine load.

``bench_quality.py`` measures quality per second of wall-clock time, which a busy
machine distorts. This script counts optimiser steps instead (30 s on 2 quiet CPU
cores are about 3000 steps of the default ``pixel`` preset, 330 of ``fast``), trains
one variant of the training recipe on the same scribbles as ``bench_quality.py`` and
prints mean IoU at each step count next to the random forest's, plus CPU
milliseconds per step.

    .venv/bin/python benchmarks/bench_training.py                     # the defaults
    .venv/bin/python benchmarks/bench_training.py --ema 0.95          # averaged weights
    .venv/bin/python benchmarks/bench_training.py --preset fast --steps 200 330 660
    .venv/bin/python benchmarks/bench_training.py --standardize --lr 3e-4
    .venv/bin/python benchmarks/bench_training.py --steps 3000 9000 --lr-half-life 0
    .venv/bin/python benchmarks/bench_training.py --tasks ihc-rgb --no-invariants
    .venv/bin/python benchmarks/bench_training.py --tasks coins --mix 0  # no CutMix
    .venv/bin/python benchmarks/bench_training.py --focal-gamma 0  # plain CE
    .venv/bin/python benchmarks/bench_training.py --invariant-gain 1  # as before
    .venv/bin/python benchmarks/bench_training.py --smooth 1.5  # blurred output
    .venv/bin/python benchmarks/bench_training.py --tta 8  # rotations and flips
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).parent))

from bench_quality import (
    STROKES_PER_CLASS,
    Forest,
    add_recipe_options,
    mean_iou,
)
from napari_dsparse.data import Normalization, as_channels_first
from napari_dsparse.model import Classifier
from napari_dsparse.nets import DEFAULT_PRESET, PRESETS
from napari_dsparse.predict import labels_and_uncertainty, predict_proba
from napari_dsparse.scribbles import initial_strokes
from napari_dsparse.train import TrainConfig, Trainer
from tasks import TASKS, Task, make_task


class WeightAverage:
    """Exponential moving average of a network's weights, swapped in to predict."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.net, self.decay = net, decay
        self.average = copy.deepcopy(net.state_dict())

    @torch.no_grad()
    def update(self) -> None:
        for name, value in self.net.state_dict().items():
            if value.dtype.is_floating_point:
                self.average[name].lerp_(value, 1 - self.decay)

    def predict(self, predict: Callable[[], np.ndarray]) -> np.ndarray:
        """``predict()`` with the averaged weights in place of the live ones."""
        live = copy.deepcopy(self.net.state_dict())
        self.net.load_state_dict(self.average)
        try:
            return predict()
        finally:
            self.net.load_state_dict(live)


@dataclass
class Variant:
    """One task's image, strokes and the untrained variant that learns from them."""

    task: Task
    image: np.ndarray  # (C, Z, Y, X)
    labels: np.ndarray  # (Y, X), 0 unpainted
    trainer: Trainer  # its ``classifier`` is the variant's network


def make_variant(name: str, args: argparse.Namespace) -> Variant:
    """Task ``name`` with ``bench_quality.py``'s strokes for ``args.seed`` and a
    classifier and trainer set up as ``args`` says."""
    task = make_task(name)
    image = as_channels_first(task.image, task.channel_axis)
    rng = np.random.default_rng(args.seed)
    labels = initial_strokes(task.truth, rng, strokes_per_class=STROKES_PER_CLASS)
    preset = PRESETS[args.preset]
    if args.standardize is not None:
        preset = replace(preset, standardize=args.standardize)
    if args.invariants is not None:
        preset = replace(preset, invariants=args.invariants)
    if args.invariant_gain is not None:
        preset = replace(preset, invariant_gain=args.invariant_gain)
    if args.scales:
        preset = replace(preset, filter_scales=tuple(args.scales))
    if args.filter_size:
        preset = replace(preset, filter_size=args.filter_size)
    classifier = Classifier.create(
        image.shape[0],
        task.class_names,
        Normalization.from_image(image),
        preset=preset,
        seed=args.seed,
    )
    config = TrainConfig(
        learning_rate=args.lr,
        batch_size=args.batch,
        crop_size=args.crop,
        class_balance=not args.no_balance,
        lr_half_life=args.lr_half_life or None,
        prior_strength=args.prior_strength,
        focal_gamma=args.focal_gamma,
        mix=args.mix,
        seed=args.seed,
    )
    return Variant(task, image, labels, Trainer(classifier, image, labels, config))


def run_variant(name: str, args: argparse.Namespace) -> str:
    variant = make_variant(name, args)
    task, image, labels = variant.task, variant.image, variant.labels
    trainer = variant.trainer
    classifier = trainer.classifier
    average = WeightAverage(classifier.patch_net, args.ema) if args.ema else None
    ious, done, cpu = [], 0, 0.0
    for target in args.steps:
        tick = time.process_time()
        while done < target:
            trainer.step()
            done += 1
            if average is not None:
                average.update()
        cpu += time.process_time() - tick
        trainer.fit_class_prior()
        predict = partial(dihedral_mean, classifier, image, args.tta)
        proba = average.predict(predict) if average else predict()
        classes, _ = labels_and_uncertainty(smoothed(proba, args.smooth))
        ious.append(mean_iou(task.truth, classes[0]))
    forest_prediction, _ = Forest(task, args.seed).fit_predict(labels)
    cells = [name, *(f"{iou:.3f}" for iou in ious)]
    cells += [
        f"{mean_iou(task.truth, forest_prediction):.3f}",
        f"{1e3 * cpu / done:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def dihedral_mean(
    classifier: Classifier, image: np.ndarray, transforms: int
) -> np.ndarray:
    """Probabilities averaged over the first ``transforms`` of the 8 rotations and
    flips of the image's Y-X plane, each mapped back (1: plain prediction)."""
    total = None
    for index in range(transforms):
        turns, flip = index % 4, index >= 4
        view = np.rot90(image, turns, axes=(-2, -1))
        view = np.flip(view, -1) if flip else view
        proba = predict_proba(classifier, np.ascontiguousarray(view))
        proba = np.flip(proba, -1) if flip else proba
        proba = np.rot90(proba, -turns, axes=(-2, -1))
        total = proba if total is None else total + proba
    return total / transforms


def smoothed(proba: np.ndarray, sigma: float) -> np.ndarray:
    """``(K, Z, Y, X)`` probabilities, each class's plane blurred by a Gaussian of
    ``sigma`` px in Y and X (a post-processing diagnostic; 0: unchanged)."""
    if not sigma:
        return proba
    return ndi.gaussian_filter(proba, (0, 0, sigma, sigma))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=list(TASKS),
        default=["membranes", "ihc-rgb", "blobs"],
    )
    parser.add_argument("--steps", nargs="+", type=int, default=[330, 1000, 3000])
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS))
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--batch", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--crop", type=int, default=TrainConfig.crop_size)
    parser.add_argument("--ema", type=float, default=0.0, help="weight average decay")
    parser.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        help="standardised filter-bank features (default: the preset's choice)",
    )
    parser.add_argument(
        "--invariants",
        action=argparse.BooleanOptionalAction,
        help="gradient magnitude and Hessian eigenvalues (default: the preset's)",
    )
    parser.add_argument(
        "--invariant-gain",
        type=float,
        help="factor on the invariants (default: the preset's)",
    )
    parser.add_argument(
        "--scales", nargs="+", type=float, help="Gaussian sigmas of the filter bank"
    )
    parser.add_argument("--filter-size", type=int, help="odd filter-bank support")
    parser.add_argument("--no-balance", action="store_true")
    parser.add_argument(
        "--tta",
        type=int,
        default=1,
        choices=range(1, 9),
        help="average our probabilities over this many of the image's 8 rotations "
        "and flips (1: none); a diagnostic",
    )
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="blur the predicted probabilities by this sigma (px) before the argmax; "
        "ours only, a diagnostic",
    )
    add_recipe_options(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(" ".join(sys.argv[1:]) or "(defaults)")
    header = ["task", *(f"ours {s} steps" for s in args.steps), "RF", "CPU ms/step"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for name in args.tasks:
        print(run_variant(name, args), flush=True)


if __name__ == "__main__":
    main()
