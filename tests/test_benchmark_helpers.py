"""Helpers the benchmarks' diagnostics rely on, checked against their definitions."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from bench_training import dihedral_mean
from napari_dsparse.predict import predict_proba


def test_the_average_over_all_eight_transforms_turns_with_the_image(
    make_classifier, gray_image
) -> None:
    """Each transform mapped back to the image's frame makes the 8-fold mean
    equivariant: turning or flipping the image turns or flips the mean alike."""
    classifier = make_classifier(gray_image)
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights than at start: outputs that vary
        for parameter in classifier.patch_net.parameters():
            parameter.normal_(0.0, 0.5)
    square = np.ascontiguousarray(gray_image[..., :44, :44])
    mean = dihedral_mean(classifier, square, 8)
    turned = dihedral_mean(
        classifier, np.ascontiguousarray(np.rot90(square, 1, (-2, -1))), 8
    )
    flipped = dihedral_mean(classifier, np.ascontiguousarray(np.flip(square, -2)), 8)
    np.testing.assert_allclose(turned, np.rot90(mean, 1, (-2, -1)), atol=1e-6)
    np.testing.assert_allclose(flipped, np.flip(mean, -2), atol=1e-6)
    plain = predict_proba(classifier, square)
    np.testing.assert_array_equal(dihedral_mean(classifier, square, 1), plain)
    assert not np.allclose(mean, plain, atol=1e-3)  # the transforms do differ
