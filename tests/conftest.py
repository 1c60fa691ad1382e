"""Shared fixtures: small random images and classifiers, seeded per test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_dsparse.data import Normalization, as_channels_first
from napari_dsparse.model import Classifier


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


def _make_classifier(
    image: np.ndarray, num_classes: int = 2, seed: int = 0, preset: str = "fast"
) -> Classifier:
    names = tuple(f"class {k}" for k in range(1, num_classes + 1))
    return Classifier.create(
        image.shape[0], names, Normalization.from_image(image), preset, seed=seed
    )


@pytest.fixture
def make_classifier():
    """Factory: a fresh classifier (``fast`` unless told) for a (C, Z, Y, X) image."""
    return _make_classifier


@pytest.fixture
def gray_image(rng: np.random.Generator) -> np.ndarray:
    """A (1, 1, 45, 52) uint16 image: a bright disc on a noisy background."""
    rows, cols = np.mgrid[:45, :52]
    disc = (rows - 22) ** 2 + (cols - 30) ** 2 < 12**2
    image = rng.normal(1000, 100, (45, 52)) + 800 * disc
    return as_channels_first(image.clip(0, 65535).astype(np.uint16))


@pytest.fixture
def disc_labels() -> np.ndarray:
    """Strokes inside (2) and outside (1) the disc of ``gray_image``."""
    labels = np.zeros((45, 52), np.uint8)
    labels[20:23, 24:36] = 2
    labels[3:5, 3:20] = 1
    labels[38:41, 30:48] = 1
    return labels
