"""Quality per second: our live CNN vs scikit-image's trainable segmentation.

For every task of ``tasks.py`` the same simulated scribbles (a few short strokes per
class) go to both methods:

- ours (the default preset): one training run, evaluated at checkpoints (15, 30 and
  60 s of training; prediction time is kept off the training clock and reported);
- scikit-image's gallery recipe: ``multiscale_basic_features`` + a random forest
  (50 trees, depth 10), timed for features + fit + predict.

Then correction rounds: each method gets strokes where *its own* prediction is wrong
(same random stream for both), our model warm-starts for a few seconds per round,
the forest refits (features cached). Prints a markdown table of mean IoU.

The ``multi-image`` task (``tasks.textures_two_scales``) trains on scribbles of
image A alone, then of A and B together (B shows the classes at another scale), and
scores the held-out image C, which needs both: mean IoU on C for ours at each
checkpoint and for the forest fitted on the same painted pixels.

    .venv/bin/python benchmarks/bench_quality.py            # about 12 minutes
    .venv/bin/python benchmarks/bench_quality.py --quick    # about 3 minutes
    .venv/bin/python benchmarks/bench_quality.py --tasks multi-image   # alone
    .venv/bin/python benchmarks/bench_quality.py --seed 0 1 2   # 3 x, + a summary
    .venv/bin/python benchmarks/bench_quality.py --lr-half-life 0   # constant rate
    .venv/bin/python benchmarks/bench_quality.py --prior-strength 0  # painted prior
    .venv/bin/python benchmarks/bench_quality.py --focal-gamma 0  # plain CE

Several seeds draw other scribbles (and other network and forest seeds): one table
per seed, then how often and by how much ours leads at 30 s and after corrections.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from skimage.feature import multiscale_basic_features
from sklearn.ensemble import RandomForestClassifier

sys.path.insert(0, str(Path(__file__).parent))

from napari_dsparse.data import Normalization, as_channels_first
from napari_dsparse.demo import mean_iou  # truths hold classes 1..K
from napari_dsparse.model import Classifier
from napari_dsparse.nets import DEFAULT_PRESET, PRESETS
from napari_dsparse.predict import labels_and_uncertainty, predict_proba
from napari_dsparse.scribbles import correction_strokes, initial_strokes
from napari_dsparse.train import TrainConfig, Trainer, iter_train
from napari_dsparse.training_set import TrainingSet
from tasks import TASKS, Task, make_task, textures_two_scales

TORCH_THREADS = 2  # the target machine: 2 CPU cores (RF: n_jobs=-1)
STROKES_PER_CLASS = 4
MULTI_IMAGE = "multi-image"  # the task trained on several images (run_multi_image)
CORRECTION_STROKES = 4


@dataclass(frozen=True)
class Settings:
    checkpoints: tuple[float, ...]  # seconds of training at which ours is evaluated
    rounds: int  # correction rounds
    round_seconds: float  # warm-start training per correction round
    preset: str
    seed: int
    lr_half_life: int | None = TrainConfig.lr_half_life  # None: constant rate
    prior_strength: float = TrainConfig.prior_strength  # 0: the network's posteriors
    mix: float = TrainConfig.mix  # 0: no CutMix of the crops
    focal_gamma: float = TrainConfig.focal_gamma  # 0: plain cross-entropy

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            seed=self.seed,
            lr_half_life=self.lr_half_life,
            prior_strength=self.prior_strength,
            mix=self.mix,
            focal_gamma=self.focal_gamma,
        )


@dataclass
class Result:
    """Mean IoUs and timings of both methods on one task."""

    task: str
    painted: float  # fraction of pixels in the initial scribbles
    ours: list[float] = field(default_factory=list)  # at each checkpoint
    ours_rounds: list[float] = field(default_factory=list)
    forest: float = 0.0
    forest_rounds: list[float] = field(default_factory=list)
    forest_seconds: float = 0.0  # features + fit + predict
    refit_seconds: float = 0.0  # fit + predict per round, features cached
    steps_per_second: float = 0.0
    predict_seconds: float = 0.0  # whole-image prediction, median
    painted_after: tuple[float, float] = (0.0, 0.0)  # ours, forest after corrections


class Forest:
    """scikit-image's trainable segmentation, as in its gallery example."""

    def __init__(self, task: Task, seed: int) -> None:
        tick = time.perf_counter()
        self.features = multiscale_basic_features(
            task.image,
            intensity=True,
            edges=False,
            texture=True,
            sigma_min=1,
            sigma_max=16,
            channel_axis=task.channel_axis,
        )  # (Y, X, F)
        self.feature_seconds = time.perf_counter() - tick
        self.seed = seed

    def fit_predict(self, labels: np.ndarray) -> tuple[np.ndarray, float]:
        """Fit on the painted pixels, predict every pixel; returns (classes, s)."""
        tick = time.perf_counter()
        prediction = self._fit(labels).predict(self._flat_features())
        return prediction.reshape(labels.shape), time.perf_counter() - tick

    def probabilities(self, labels: np.ndarray) -> np.ndarray:
        """Fit on the painted pixels; ``(K, Y, X)`` probabilities of the painted
        classes, in increasing order."""
        proba = self._fit(labels).predict_proba(self._flat_features())
        return proba.T.reshape(-1, *labels.shape)

    def _fit(self, labels: np.ndarray) -> RandomForestClassifier:
        forest = RandomForestClassifier(
            n_estimators=50, max_depth=10, n_jobs=-1, random_state=self.seed
        )
        painted = labels > 0
        return forest.fit(self.features[painted], labels[painted])

    def _flat_features(self) -> np.ndarray:
        return self.features.reshape(-1, self.features.shape[-1])


class Ours:
    """Our classifier, trained by ``iter_train`` on a clock that excludes prediction."""

    def __init__(self, task: Task, labels: np.ndarray, settings: Settings) -> None:
        self.image = as_channels_first(task.image, task.channel_axis)  # (C, Z, Y, X)
        classifier = Classifier.create(
            self.image.shape[0],
            task.class_names,
            Normalization.from_image(self.image),
            preset=settings.preset,
            seed=settings.seed,
        )
        self.trainer = Trainer(
            classifier,
            self.image,
            labels,
            settings.train_config(),
        )
        self.steps = iter_train(self.trainer)
        self.train_seconds = 0.0
        self.steps_done = 0
        self.predict_times: list[float] = []

    def train_until(self, seconds: float) -> None:
        """Train until the training clock reads ``seconds``."""
        while self.train_seconds < seconds:
            tick = time.perf_counter()
            next(self.steps)
            self.train_seconds += time.perf_counter() - tick
            self.steps_done += 1

    def predict(self) -> np.ndarray:
        tick = time.perf_counter()
        self.trainer.fit_class_prior()  # as the live loop does before it predicts
        proba = predict_proba(self.trainer.classifier, self.image)  # (K, 1, Y, X)
        classes, _ = labels_and_uncertainty(proba)
        self.predict_times.append(time.perf_counter() - tick)
        return classes[0]

    def set_labels(self, labels: np.ndarray) -> None:
        self.trainer.set_labels(labels)


def run_forest(task: Task, labels: np.ndarray, settings: Settings, result: Result):
    forest = Forest(task, settings.seed)
    prediction, seconds = forest.fit_predict(labels)
    result.forest = mean_iou(task.truth, prediction)
    result.forest_seconds = forest.feature_seconds + seconds
    rng = np.random.default_rng(settings.seed + 1)
    refits = []
    for _ in range(settings.rounds):
        labels = correction_strokes(
            task.truth, prediction, labels, rng, n=CORRECTION_STROKES
        )
        prediction, seconds = forest.fit_predict(labels)
        refits.append(seconds)
        result.forest_rounds.append(mean_iou(task.truth, prediction))
    result.refit_seconds = float(np.mean(refits)) if refits else 0.0
    return (labels > 0).mean()


def run_ours(task: Task, labels: np.ndarray, settings: Settings, result: Result):
    ours = Ours(task, labels, settings)
    for seconds in settings.checkpoints:
        ours.train_until(seconds)
        prediction = ours.predict()
        result.ours.append(mean_iou(task.truth, prediction))
    result.steps_per_second = ours.steps_done / ours.train_seconds
    rng = np.random.default_rng(settings.seed + 1)
    for _ in range(settings.rounds):
        labels = correction_strokes(
            task.truth, prediction, labels, rng, n=CORRECTION_STROKES
        )
        ours.set_labels(labels)
        ours.train_until(ours.train_seconds + settings.round_seconds)
        prediction = ours.predict()
        result.ours_rounds.append(mean_iou(task.truth, prediction))
    result.predict_seconds = float(np.median(ours.predict_times))
    return (labels > 0).mean()


def run_task(name: str, settings: Settings) -> Result:
    task = make_task(name)
    rng = np.random.default_rng(settings.seed)
    labels = initial_strokes(task.truth, rng, strokes_per_class=STROKES_PER_CLASS)
    result = Result(name, float((labels > 0).mean()))
    painted_forest = run_forest(task, labels, settings, result)
    painted_ours = run_ours(task, labels, settings, result)
    result.painted_after = (float(painted_ours), float(painted_forest))
    return result


@dataclass
class MultiResult:
    """Mean IoU on the held-out image, trained on the first ``images`` images."""

    images: str  # e.g. "A" or "A + B"
    painted: int  # painted pixels over the training images
    ours: list[float] = field(default_factory=list)  # at each checkpoint
    forest: float = 0.0
    forest_seconds: float = 0.0  # fit + predict of the held-out image
    steps_per_second: float = 0.0


def run_multi_image(settings: Settings) -> list[MultiResult]:
    """Train on A, then on A + B; score the held-out C (see the module docstring)."""
    *training, held_out = textures_two_scales()
    rng = np.random.default_rng(settings.seed)
    labels = [
        initial_strokes(task.truth, rng, strokes_per_class=STROKES_PER_CLASS)
        for task in training
    ]
    forests = [Forest(task, settings.seed) for task in (*training, held_out)]
    results = []
    for count in range(1, len(training) + 1):
        tasks, painted = training[:count], labels[:count]
        result = MultiResult(
            " + ".join(t.name.split(":")[0] for t in tasks),
            int(sum((p > 0).sum() for p in painted)),
        )
        prediction, result.forest_seconds = _forest_on_pairs(
            forests[:count], painted, forests[-1]
        )
        result.forest = mean_iou(held_out.truth, prediction)
        _ours_on_pairs(tasks, painted, held_out, settings, result)
        results.append(result)
    return results


def _forest_on_pairs(
    forests: list[Forest], labels: list[np.ndarray], held_out: Forest
) -> tuple[np.ndarray, float]:
    """The forest fitted on every painted pixel of the pairs, applied to held_out."""
    tick = time.perf_counter()
    features = np.concatenate(
        [f.features[p > 0] for f, p in zip(forests, labels, strict=True)]
    )
    targets = np.concatenate([p[p > 0] for p in labels])
    forest = RandomForestClassifier(
        n_estimators=50, max_depth=10, n_jobs=-1, random_state=held_out.seed
    )
    forest.fit(features, targets)
    flat = held_out.features.reshape(-1, held_out.features.shape[-1])
    prediction = forest.predict(flat).reshape(held_out.features.shape[:-1])
    return prediction, time.perf_counter() - tick


def _ours_on_pairs(
    tasks: list[Task],
    labels: list[np.ndarray],
    held_out: Task,
    settings: Settings,
    result: MultiResult,
) -> None:
    """Train on every pair (per-image normalisation), score held_out at checkpoints."""
    images = [as_channels_first(t.image, t.channel_axis) for t in tasks]
    classifier = Classifier.create(
        images[0].shape[0],
        held_out.class_names,
        Normalization.from_images(images),  # per image: the default policy
        preset=settings.preset,
        seed=settings.seed,
    )
    training_set = TrainingSet(classifier.normalization, classifier.num_classes)
    for task, image, painted in zip(tasks, images, labels, strict=True):
        training_set.add(task.name, image, painted)
    trainer = Trainer.from_set(
        classifier,
        training_set,
        settings.train_config(),
    )
    steps, train_seconds, done = iter_train(trainer), 0.0, 0
    target = as_channels_first(held_out.image, held_out.channel_axis)
    for seconds in settings.checkpoints:
        while train_seconds < seconds:
            tick = time.perf_counter()
            next(steps)
            train_seconds += time.perf_counter() - tick
            done += 1
        trainer.fit_class_prior()  # from A and B, as an exported model carries it
        classes, _ = labels_and_uncertainty(predict_proba(classifier, target))
        result.ours.append(mean_iou(held_out.truth, classes[0]))
    result.steps_per_second = done / train_seconds


def format_multi_table(results: list[MultiResult], settings: Settings) -> str:
    """Mean IoU on the held-out image C for each set of training images."""
    checkpoints = [f"ours {s:g} s" for s in settings.checkpoints]
    header = ["trained on", "painted px", *checkpoints, "RF", "RF fit+predict s"]
    header += ["steps/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in results:
        cells = [r.images, str(r.painted)]
        cells += [_mark(iou, r.forest) for iou in r.ours]
        cells += [f"{r.forest:.3f}", f"{r.forest_seconds:.1f}"]
        cells += [f"{r.steps_per_second:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mark(ours: float, forest: float) -> str:
    """Bold when ours is at least the forest's."""
    return f"**{ours:.3f}**" if ours >= forest else f"{ours:.3f}"


def format_table(results: list[Result], settings: Settings) -> str:
    checkpoints = [f"ours {s:g} s" for s in settings.checkpoints]
    rounds = [
        f"{who} +{r} corr."
        for r in range(1, settings.rounds + 1)
        for who in ("ours", "RF")
    ]
    header = ["task", "painted", *checkpoints, "RF", "RF s", *rounds]
    header += ["steps/s", "predict s", "RF refit s"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in results:
        cells = [r.task, f"{100 * r.painted:.2f}%"]
        cells += [_mark(iou, r.forest) for iou in r.ours]
        cells += [f"{r.forest:.3f}", f"{r.forest_seconds:.1f}"]
        for ours, forest in zip(r.ours_rounds, r.forest_rounds, strict=True):
            cells += [_mark(ours, forest), f"{forest:.3f}"]
        cells += [
            f"{r.steps_per_second:.1f}",
            f"{r.predict_seconds:.2f}",
            f"{r.refit_seconds:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """``--lr-half-life N``, ``--prior-strength S``, ``--mix M`` and
    ``--focal-gamma G``, as in ``TrainConfig``.

    A half-life of 0 keeps the rate constant; a strength of 0 keeps the painted
    classes' prior; a mix of 0 trains on unmixed crops; a gamma of 0 trains on the
    plain cross-entropy.
    """
    parser.add_argument(
        "--lr-half-life",
        type=int,
        default=TrainConfig.lr_half_life,
        help="steps on one labelling after which our rate halves; 0: constant "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--prior-strength",
        type=float,
        default=TrainConfig.prior_strength,
        help="how far our predictions move to the image's class prior, 0-1 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--mix",
        type=float,
        default=TrainConfig.mix,
        help="share of our crops that get a rectangle of another crop pasted in, "
        "0-1 (default: %(default)s)",
    )
    parser.add_argument(
        "--focal-gamma",
        type=float,
        default=TrainConfig.focal_gamma,
        help="focusing exponent of our loss, 0 or 1-10; 0: plain cross-entropy "
        "(default: %(default)s)",
    )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (~2 min)")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=[*TASKS, MULTI_IMAGE],
        default=None,
        help=f"default: all; {MULTI_IMAGE}: train on images A (+ B), score C",
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS))
    parser.add_argument(
        "--seed", type=int, nargs="+", default=[0], help="one run per seed"
    )
    parser.add_argument("--rounds", type=int, default=2, help="correction rounds")
    add_recipe_options(parser)
    parser.add_argument("--threads", type=int, default=TORCH_THREADS)
    args = parser.parse_args(argv)
    checkpoints = (3.0, 6.0, 12.0) if args.quick else (15.0, 30.0, 60.0)
    settings = Settings(
        checkpoints=checkpoints,
        rounds=args.rounds,
        round_seconds=4.0 if args.quick else 15.0,
        preset=args.preset,
        seed=args.seed[0],
        lr_half_life=args.lr_half_life or None,
        prior_strength=args.prior_strength,
        mix=args.mix,
        focal_gamma=args.focal_gamma,
    )
    return args, settings


def main(argv: list[str] | None = None) -> None:
    args, settings = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [
        run_seed(args.tasks, replace(settings, seed=seed), args.threads)
        for seed in args.seed
    ]
    if len(runs) > 1:
        print(f"\nsummary over seeds {', '.join(map(str, args.seed))}\n")
        print(format_summary(runs, settings))


def run_seed(tasks: list[str] | None, settings: Settings, threads: int) -> list[Result]:
    """Every task with one seed's scribbles; prints its tables."""
    load_before = f"{os.getloadavg()[0]:.2f}"
    results, multi = [], []
    for name in tasks or [*TASKS, MULTI_IMAGE]:
        print(f"running {name} (seed {settings.seed}) ...", file=sys.stderr, flush=True)
        if name == MULTI_IMAGE:
            multi = run_multi_image(settings)
        else:
            results.append(run_task(name, settings))
    print(
        f"torch {torch.__version__}, {threads} threads, preset "
        f"{settings.preset}, seed {settings.seed}, lr half-life "
        f"{settings.lr_half_life or 'none'}, class-prior strength "
        f"{settings.prior_strength:g}, mix {settings.mix:g}, focal gamma "
        f"{settings.focal_gamma:g}; corrections: "
        f"{CORRECTION_STROKES} strokes per round, ours warm-starts "
        f"{settings.round_seconds:g} s per round, RF refits; 1-min load average "
        f"{load_before} before, {os.getloadavg()[0]:.2f} after\n"
    )
    if results:
        print(format_table(results, settings))
    if multi:
        print(
            f"\n{MULTI_IMAGE}: mean IoU on the held-out image C (textures at scales "
            "1 and 2); A shows scale 1, B scale 2; same strokes for both methods\n"
        )
        print(format_multi_table(multi, settings))
    print()
    return results


def format_summary(runs: list[list[Result]], settings: Settings) -> str:
    """Per task: mean IoU over seeds and the seeds on which ours >= the forest."""
    at = settings.checkpoints.index(30.0) if 30.0 in settings.checkpoints else 1
    label = f"{settings.checkpoints[at]:g} s"
    header = ["task", f"ours {label}", "RF", f"ours >= RF at {label}"]
    header += [f"ours +{settings.rounds} corr.", f"RF +{settings.rounds} corr."]
    header += ["ours >= RF after corr."]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for index, first in enumerate(runs[0]):
        per_seed = [results[index] for results in runs]
        ours = [r.ours[at] for r in per_seed]
        forest = [r.forest for r in per_seed]
        cells = [first.task, f"{np.mean(ours):.3f}", f"{np.mean(forest):.3f}"]
        cells.append(_wins(ours, forest))
        if settings.rounds:
            ours_after = [r.ours_rounds[-1] for r in per_seed]
            forest_after = [r.forest_rounds[-1] for r in per_seed]
            cells += [f"{np.mean(ours_after):.3f}", f"{np.mean(forest_after):.3f}"]
            cells.append(_wins(ours_after, forest_after))
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _wins(ours: list[float], forest: list[float]) -> str:
    """``2 of 3 (-0.011 .. +0.008)``: seeds won and the range of differences."""
    differences = np.subtract(ours, forest)
    won = int((differences >= 0).sum())
    return (
        f"{won} of {len(differences)} ({differences.min():+.3f} .. "
        f"{differences.max():+.3f})"
    )


if __name__ == "__main__":
    main()
