"""The headless demo: the live loop on the bundled sample, with simulated strokes.

The same session, mailbox and :func:`~napari_dsparse.live.iter_live` rounds that the
napari widget drives; between rounds, correction strokes are painted where the
prediction disagrees with the sample's derived ground truth, as a person would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from napari_dsparse.data import InputError, as_channels_first
from napari_dsparse.export import save_classifier
from napari_dsparse.files import write_tif
from napari_dsparse.live import (
    LiveSession,
    Mailbox,
    Notice,
    PredictionUpdate,
    TrainingPaused,
    iter_live,
)
from napari_dsparse.samples import CLASS_NAMES, coins_sample, coins_truth
from napari_dsparse.scribbles import correction_strokes
from napari_dsparse.train import TrainConfig, TrainStatus

__all__ = ["mean_iou", "run_headless_demo"]


def mean_iou(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Mean intersection over union of the classes present in ``truth``."""
    scores = []
    for k in np.unique(truth):
        union = ((truth == k) | (prediction == k)).sum()
        scores.append(((truth == k) & (prediction == k)).sum() / union)
    return float(np.mean(scores))


def run_headless_demo(
    output: str | Path,
    rounds: int = 4,
    round_seconds: float = 5.0,
    seed: int = 0,
    device: str | None = None,
    report: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Train on the coins sample in rounds, adding correction strokes in between.

    Writes ``prediction.tif``, ``uncertainty.tif``, ``scribbles.tif`` and
    ``model.pt`` into ``output``; returns their paths.
    """
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create {output}: {error}") from error
    image, scribbles = coins_sample()
    truth = coins_truth()
    session = LiveSession(
        as_channels_first(image),
        CLASS_NAMES,
        config=TrainConfig(seed=seed),
        device=device,
    )
    mailbox = Mailbox()
    rng = np.random.default_rng(seed)
    classes = np.zeros(image.shape, np.uint8)
    uncertainty = np.zeros(image.shape, np.float32)
    for round_number in range(1, rounds + 1):
        mailbox.post_labels(scribbles)
        start = time.perf_counter()
        for event in iter_live(session, mailbox, round_seconds=round_seconds, rounds=1):
            if isinstance(event, PredictionUpdate):
                box = event.box
                classes[box.r0 : box.r1, box.c0 : box.c1] = event.classes
                uncertainty[box.r0 : box.r1, box.c0 : box.c1] = event.uncertainty
            elif isinstance(event, TrainStatus):
                status = event
            elif isinstance(event, Notice | TrainingPaused):
                report(event.message)
        report(
            f"round {round_number}/{rounds}: step {status.step}, "
            f"loss {status.loss_text}, {status.steps_per_second:.1f} steps/s, "
            f"painted {list(status.painted)}, "
            f"mean IoU {mean_iou(truth, classes):.3f} "
            f"({time.perf_counter() - start:.1f} s)"
        )
        scribbles = correction_strokes(truth, classes, scribbles, rng)
    return _write_results(output, session, classes, uncertainty, scribbles, report)


def _write_results(
    output: Path,
    session: LiveSession,
    classes: np.ndarray,
    uncertainty: np.ndarray,
    scribbles: np.ndarray,
    report: Callable[[str], None],
) -> dict[str, Path]:
    assert session.classifier is not None
    paths = {
        "prediction": write_tif(output / "prediction.tif", classes),
        "uncertainty": write_tif(output / "uncertainty.tif", uncertainty),
        "scribbles": write_tif(output / "scribbles.tif", scribbles),
        "model": save_classifier(session.classifier, output / "model.pt"),
    }
    for path in paths.values():
        report(f"wrote {path}")
    return paths
