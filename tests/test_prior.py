"""The class prior: its estimate from predictions and the change of logits it gives."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import norm

from napari_dsparse.prior import MIN_PRIOR, estimate_image_prior, log_prior_ratio


def _posteriors(x: np.ndarray, means: list[float], prior: np.ndarray) -> np.ndarray:
    """Exact ``(K, N)`` posteriors of unit-variance Gaussians under ``prior``."""
    likelihood = np.stack([norm.pdf(x, m) for m in means])
    joint = likelihood * prior[:, None]
    return joint / joint.sum(0)


def _mixture(
    rng: np.random.Generator, means: list[float], shares: list[float], n: int
) -> np.ndarray:
    classes = rng.choice(len(means), size=n, p=shares)
    return rng.normal(np.asarray(means)[classes], 1.0)


def test_separated_classes_give_their_shares(rng) -> None:
    shares = np.array([0.85, 0.1, 0.05])
    means = [0.0, 8.0, 16.0]
    x = _mixture(rng, means, list(shares), 100_000)
    train = np.array([0.2, 0.5, 0.3])
    estimate = estimate_image_prior(_posteriors(x, means, train), train)
    np.testing.assert_allclose(estimate, shares, atol=0.005)
    assert estimate.sum() == pytest.approx(1.0)


def test_overlapping_classes_move_part_of_the_way(rng) -> None:
    """The mean posterior lies between the training prior and the true shares."""
    shares = np.array([0.9, 0.1])
    means = [0.0, 1.5]
    x = _mixture(rng, means, list(shares), 100_000)
    train = np.array([0.5, 0.5])
    estimate = estimate_image_prior(_posteriors(x, means, train), train)
    assert shares[1] < estimate[1] < train[1]


def test_the_ratio_gives_the_posteriors_under_the_new_prior(rng) -> None:
    means = [0.0, 1.0, 3.0]
    x = rng.normal(1.0, 2.0, 1000)
    train, image = np.array([0.3, 0.3, 0.4]), np.array([0.7, 0.2, 0.1])
    logits = np.log(_posteriors(x, means, train))
    shifted = softmax(logits + log_prior_ratio(image, train)[:, None], axis=0)
    np.testing.assert_allclose(shifted, _posteriors(x, means, image), atol=1e-12)


def test_half_strength_gives_the_geometric_midpoint(rng) -> None:
    means = [0.0, 2.0]
    x = rng.normal(1.0, 2.0, 1000)
    train, image = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    midpoint = np.sqrt(train * image)
    midpoint /= midpoint.sum()
    logits = np.log(_posteriors(x, means, train))
    shifted = softmax(logits + log_prior_ratio(image, train, 0.5)[:, None], axis=0)
    np.testing.assert_allclose(shifted, _posteriors(x, means, midpoint), atol=1e-12)
    assert not log_prior_ratio(image, train, 0.0).any()


def test_unpainted_classes_stay_out(rng) -> None:
    """Class 2 of 3 was never painted: share 0 and no change of its logit."""
    proba = softmax(rng.normal(size=(3, 500)), axis=0)
    train = np.array([0.6, 0.0, 0.4])
    estimate = estimate_image_prior(proba, train)
    assert estimate[1] == 0 and estimate.sum() == pytest.approx(1.0)
    assert log_prior_ratio(estimate, train)[1] == 0


def test_an_absent_class_keeps_a_finite_share() -> None:
    proba = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    estimate = estimate_image_prior(proba, np.array([0.5, 0.5]))
    assert estimate[1] >= MIN_PRIOR * 0.99
    assert np.isfinite(log_prior_ratio(estimate, np.array([0.5, 0.5]))).all()


def test_probabilities_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(ValueError, match=r"expected \(K, N\) probabilities for K = 3"):
        estimate_image_prior(np.ones((2, 10)), np.ones(3) / 3)
