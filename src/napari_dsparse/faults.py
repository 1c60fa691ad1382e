"""Recovering from training faults: divergence and running out of GPU memory.

A :class:`Checkpoint` is a consistent copy of everything a :class:`Trainer` changes
while it steps (network weights, optimiser moments, step count, crop sampler), taken
between steps, so that a diverged model can go back to its last good state and a
session can be saved while the worker trains.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dsparse.data import Normalization
from napari_dsparse.model import Classifier
from napari_dsparse.predict import Box, iter_tiles, predict_box
from napari_dsparse.train import TrainConfig, Trainer

__all__ = [
    "DIVERGED_LOSS",
    "Checkpoint",
    "free_accelerator_memory",
    "has_diverged",
    "is_out_of_memory",
    "move_trainer",
    "predict_fitting",
    "smaller_config",
]

# A masked cross-entropy of 100 means the painted classes get probabilities around
# e^-100: no healthy model, even one confidently wrong on new strokes, gets there.
DIVERGED_LOSS = 100.0
MIN_BATCH = 1
MIN_CROP = 16  # output pixels per crop side below which smaller crops learn nothing
MIN_OOM_TILE = 32  # tiles this small that still run out of memory need the CPU


@dataclass(frozen=True)
class Checkpoint:
    """Trainer state between two steps (copies, on the CPU)."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    steps_done: int
    rng_state: dict[str, Any]
    steps_on_labels: int = 0  # into the learning-rate half-life

    @classmethod
    def of(cls, trainer: Trainer) -> Checkpoint:
        """Copy the state of ``trainer`` (call between steps)."""
        model = trainer.classifier.patch_net.state_dict()
        return cls(
            {name: value.detach().cpu().clone() for name, value in model.items()},
            _to_cpu(copy.deepcopy(trainer.optimizer.state_dict())),
            trainer.steps_done,
            copy.deepcopy(trainer.rng.bit_generator.state),
            trainer.steps_on_labels,
        )

    def restore(self, trainer: Trainer) -> None:
        """Put ``trainer`` (weights, optimiser, steps, rate, sampler) back."""
        trainer.classifier.patch_net.load_state_dict(self.model_state, strict=True)
        # load_state_dict casts the moments to each parameter's device
        trainer.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        trainer.steps_done = self.steps_done
        trainer.steps_on_labels = self.steps_on_labels
        trainer.classifier.provenance["steps"] = self.steps_done
        trainer.rng.bit_generator.state = copy.deepcopy(self.rng_state)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    return value


def has_diverged(loss: float, net: nn.Module) -> bool:
    """Whether the loss or any weight is no longer finite, or the loss exploded."""
    if not math.isfinite(loss) or loss > DIVERGED_LOSS:
        return True
    with torch.no_grad():
        return not all(torch.isfinite(p).all() for p in net.parameters())


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an accelerator out-of-memory error."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def free_accelerator_memory() -> None:
    """Give cached blocks back after an out-of-memory error."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def smaller_config(config: TrainConfig) -> TrainConfig | None:
    """Half the batch, then half the crops; ``None`` when both are at their minimum."""
    if config.batch_size > MIN_BATCH:
        return replace(config, batch_size=max(MIN_BATCH, config.batch_size // 2))
    if config.crop_size > MIN_CROP:
        return replace(config, crop_size=max(MIN_CROP, config.crop_size // 2))
    return None


def move_trainer(trainer: Trainer, device: torch.device | str) -> None:
    """Move the network and the optimiser's moments to ``device``."""
    trainer.classifier.to(device)
    for state in trainer.optimizer.state.values():
        for key, value in state.items():
            # Adam keeps its scalar step on the CPU unless capturable/fused
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)


def predict_fitting(
    classifier: Classifier,
    image: np.ndarray,
    box: Box,
    tell: Callable[[str], None] = lambda _message: None,
    normalization: Normalization | None = None,
) -> np.ndarray:
    """:func:`predict_box`, in quarters when accelerator memory runs out.

    Tiles are exact, so the parts give the numbers of the whole box. A tile of
    ``MIN_OOM_TILE`` pixels or less that still runs out re-raises the error (the
    caller may move to the CPU). ``tell`` hears about the smaller tiles.
    ``normalization`` is the whole image's map (see :func:`predict_box`).
    """
    try:
        return predict_box(classifier, image, box, normalization)
    except Exception as error:
        height, width = box.r1 - box.r0, box.c1 - box.c0
        if not is_out_of_memory(error) or max(height, width) <= MIN_OOM_TILE:
            raise
    free_accelerator_memory()
    tell("out of GPU memory: predicting in smaller tiles")
    proba = np.empty((classifier.num_classes, height, width), np.float32)
    for part in iter_tiles(image.shape[1:], max(height, width) // 2, box):
        rows = slice(part.r0 - box.r0, part.r1 - box.r0)
        cols = slice(part.c0 - box.c0, part.c1 - box.c0)
        proba[:, rows, cols] = predict_fitting(
            classifier, image, part, tell, normalization
        )
    return proba
