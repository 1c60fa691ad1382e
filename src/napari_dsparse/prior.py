"""The image's class prior, and the change of prior that the predictions use.

Scribbles paint the classes in other shares than the image holds them (a thin
membrane class gets a third of the strokes and covers 4 % of the image), and the
label-histogram equalisation then weighs the painted classes about equally. The
network therefore learns posteriors under the prior of its training batches; where
classes overlap it calls too many pixels the rare class, and more so the longer it
trains. Adding ``log(image prior / training prior)`` to the logits gives posteriors
under the image's prior (Saerens, Latinne & Decaestecker, Neural Computation 14,
2002).

The image prior is estimated as the mean posterior over the image's pixels
("probabilistic classify and count"). Where classes overlap this lies between the
training prior and the true shares (nearer the former for the softer posteriors of
the focal loss, ``TrainConfig.focal_gamma``), so it errs on the side of no change; EM
iterations (Saerens et al.) go further and, on a network trained for a few
hundred steps, wiped out a rare class (docs/benchmarks.md). Plain NumPy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MIN_PRIOR", "estimate_image_prior", "log_prior_ratio"]

MIN_PRIOR = 1e-4  # a class keeps at least this share, so its log stays finite


def estimate_image_prior(proba: np.ndarray, train_prior: np.ndarray) -> np.ndarray:
    """The class shares of the pixels behind ``proba``: their mean posterior.

    Parameters
    ----------
    proba
        ``(K, N)`` class probabilities of N pixels, from a model trained under
        ``train_prior``.
    train_prior
        ``(K,)`` class shares the model was trained with; classes with share 0
        (never painted) get 0.

    Returns
    -------
    ``(K,)`` shares that sum to 1; each trained class keeps at least
    :data:`MIN_PRIOR`.
    """
    proba = np.asarray(proba, np.float64)
    train_prior = np.asarray(train_prior, np.float64)
    if proba.ndim != 2 or proba.shape[0] != train_prior.shape[0]:
        raise ValueError(
            f"expected (K, N) probabilities for K = {train_prior.shape[0]} classes, "
            f"got shape {proba.shape}"
        )
    trained = train_prior > 0
    if proba.shape[1] == 0:
        return train_prior / max(train_prior.sum(), 1e-12)
    p = proba[trained]
    p = p / np.maximum(p.sum(0, keepdims=True), 1e-300)
    shares = np.maximum(p.mean(1), MIN_PRIOR)
    out = np.zeros_like(train_prior)
    out[trained] = shares / shares.sum()
    return out


def log_prior_ratio(
    image_prior: np.ndarray, train_prior: np.ndarray, strength: float = 1.0
) -> np.ndarray:
    """``strength * log(image_prior / train_prior)`` per class; 0 where untrained.

    ``strength`` 1 gives posteriors under the image prior (the fewest wrong
    pixels), 0 leaves them under the training prior, and values between under
    their normalised geometric interpolation.
    """
    image_prior = np.asarray(image_prior, np.float64)
    train_prior = np.asarray(train_prior, np.float64)
    trained = (train_prior > 0) & (image_prior > 0)
    ratio = np.zeros_like(train_prior)
    base = train_prior[trained] / train_prior[trained].sum()
    ratio[trained] = strength * (np.log(image_prior[trained]) - np.log(base))
    return ratio
