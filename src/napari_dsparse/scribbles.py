"""Simulated painting: the strokes a person would paint, from a ground truth.

Benchmarks, tests and headless demos need scribbles that look like a person's: a few
short, smooth strokes per class, well inside each class (a person keeps a pixel or so
away from edges), later followed by correction strokes in the largest regions the
prediction gets wrong. Everything here is 2D and Qt-free; ``truth`` holds classes
1..K, painted labels use 0 for unpainted pixels.

A stroke is a walk over pixels that keeps its heading with a small random turn per
step and never leaves the region it may paint; it is then widened by a disk brush
(clipped to the region). Where a class is too thin for the brush (membranes one or two
pixels wide), the brush shrinks to one pixel and the stroke follows the structure.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import measure, morphology

__all__ = ["correction_strokes", "initial_strokes", "stroke_length"]

_TURN_SIGMA = 0.05  # radians of random drift per step: gently curved strokes
_TURNS = np.deg2rad(np.arange(0, 91, 15))  # turns tried where the way is blocked
_MAX_NET_TURN = 0.75 * np.pi  # strokes bend, people do not paint loops
_MAX_MOVES_PER_PIXEL = 3  # moves that stay on one pixel do not count as progress
_STARTS_PER_STROKE = 4  # a person picks a spot with room; keep the longest try
_MIN_SAFE_SHARE = 0.2  # brush and margin must leave this share of a region paintable


def stroke_length(
    shape: tuple[int, ...], num_strokes: int, brush_radius: int, fraction: float
) -> int:
    """Steps per stroke so that ``num_strokes`` strokes paint about ``fraction``.

    A stroke of ``n`` steps with a brush of radius ``r`` covers about
    ``n * (2 r + 1)`` pixels.
    """
    pixels = fraction * float(np.prod(shape))
    return max(8, round(pixels / (max(num_strokes, 1) * (2 * brush_radius + 1))))


def initial_strokes(
    truth: np.ndarray,
    rng: np.random.Generator,
    strokes_per_class: int = 3,
    length: int | None = None,
    brush_radius: int = 1,
    fraction: float = 0.01,
) -> np.ndarray:
    """First scribbles: ``strokes_per_class`` short strokes inside every class.

    Parameters
    ----------
    truth
        ``(Y, X)`` ground truth with classes 1..K (0 pixels are never painted).
    rng
        Source of randomness; the same seed gives the same strokes.
    strokes_per_class
        Strokes painted in each class present in ``truth``.
    length
        Steps per stroke; by default chosen so that all strokes together paint
        about ``fraction`` of the image (strokes end early where a class is small).
    brush_radius
        Radius of the disk brush; shrinks where a class is too thin for it.
    fraction
        Target painted fraction when ``length`` is not given.

    Returns
    -------
    A new ``(Y, X)`` uint8/uint16 label image, 0 = unpainted, 1..K = classes.
    """
    truth = _check_truth(truth)
    classes = [int(k) for k in np.unique(truth) if k > 0]
    if length is None:
        length = stroke_length(
            truth.shape, strokes_per_class * len(classes), brush_radius, fraction
        )
    labels = np.zeros(truth.shape, _label_dtype(truth))
    for k in classes:
        region = truth == k
        for _ in range(strokes_per_class):
            stroke = _paint_stroke(region & (labels == 0), rng, length, brush_radius)
            labels[stroke] = k
    return labels


def correction_strokes(
    truth: np.ndarray,
    prediction: np.ndarray,
    current_labels: np.ndarray,
    rng: np.random.Generator,
    n: int = 4,
    length: int | None = None,
    brush_radius: int = 1,
    fraction: float = 0.003,
) -> np.ndarray:
    """Add ``n`` strokes of the true class in the largest wrongly predicted regions.

    Wrong pixels (``prediction != truth``, not yet painted) are grouped into
    connected regions of one true class; the ``n`` largest each get one stroke (the
    largest get more when there are fewer than ``n`` regions). Every new painted
    pixel is a wrong pixel, painted with its true class.

    Parameters
    ----------
    truth, prediction, current_labels
        ``(Y, X)`` arrays: classes 1..K, predicted classes 1..K, painted labels.
    rng
        Source of randomness.
    n
        Number of correction strokes.
    length, brush_radius, fraction
        As in :func:`initial_strokes`; ``fraction`` is for all ``n`` strokes.

    Returns
    -------
    A new label image: ``current_labels`` plus the strokes (inputs are not modified).
    """
    truth = _check_truth(truth)
    if prediction.shape != truth.shape or current_labels.shape != truth.shape:
        raise ValueError(
            f"truth {truth.shape}, prediction {prediction.shape} and labels "
            f"{current_labels.shape} must have the same shape"
        )
    if length is None:
        length = stroke_length(truth.shape, n, brush_radius, fraction)
    labels = np.array(current_labels, copy=True)
    wrong = (prediction != truth) & (current_labels == 0) & (truth > 0)
    regions = _largest_regions(np.where(wrong, truth, 0), n)
    for i in range(n if regions else 0):
        region = regions[i % len(regions)]
        box = region.slice
        mask = (region.image & (labels[box] == 0)).astype(bool)
        stroke = _paint_stroke(mask, rng, length, brush_radius)
        labels[box][stroke] = truth[box][stroke]
    return labels


def _check_truth(truth: np.ndarray) -> np.ndarray:
    if truth.ndim != 2:
        raise ValueError(f"expected a 2D ground truth (Y, X), got shape {truth.shape}")
    if not np.issubdtype(truth.dtype, np.integer) or truth.min(initial=0) < 0:
        raise ValueError("the ground truth must hold non-negative integer classes")
    return truth


def _label_dtype(truth: np.ndarray) -> type[np.integer]:
    return np.uint8 if truth.max(initial=0) < 256 else np.uint16


def _largest_regions(classes: np.ndarray, n: int) -> list:
    """The ``n`` largest connected regions of equal non-zero value, largest first."""
    regions = measure.regionprops(measure.label(classes, connectivity=1))
    return sorted(regions, key=lambda region: -region.area)[:n]


def _paint_stroke(
    region: np.ndarray, rng: np.random.Generator, length: int, brush_radius: int
) -> np.ndarray:
    """Boolean mask of one brush stroke inside ``region`` (empty if it is empty)."""
    if not region.any():
        return np.zeros(region.shape, bool)
    safe, radius = _safe_region(region, brush_radius)
    candidates = np.argwhere(safe)  # (N, 2)
    best: list[tuple[int, int]] = []
    for _ in range(_STARTS_PER_STROKE):
        start = candidates[rng.integers(len(candidates))]
        path = _walk(safe, (int(start[0]), int(start[1])), rng, length)
        if len(path) > len(best):
            best = path
        if len(best) >= length:
            break
    stroke = np.zeros(region.shape, bool)
    stroke[tuple(np.array(best).T)] = True
    if radius > 0:
        stroke = morphology.dilation(stroke, morphology.disk(radius))
    return stroke & region


def _safe_region(region: np.ndarray, brush_radius: int) -> tuple[np.ndarray, int]:
    """Pixels where the brush, plus a one-pixel margin, stays inside ``region``.

    A level counts only if it keeps a good part of the region (isolated safe pixels
    in a thin class give no stroke); otherwise fall back to no margin, then to
    smaller brushes, down to the region itself with a one-pixel brush.
    """
    # Pad so the image border counts as inside: a person paints up to it.
    distance = ndi.distance_transform_edt(np.pad(region, 1, mode="edge"))[1:-1, 1:-1]
    needed = _MIN_SAFE_SHARE * region.sum()
    for radius in range(brush_radius, -1, -1):
        for margin in (1, 0):
            safe = distance > radius + margin
            if safe.sum() >= needed:
                return safe, radius
    return region, 0


def _walk(
    allowed: np.ndarray,
    start: tuple[int, int],
    rng: np.random.Generator,
    length: int,
) -> list[tuple[int, int]]:
    """A smooth walk over up to ``length`` new ``allowed`` pixels, no revisits.

    The pen moves one pixel per step along a heading that drifts slowly; where the
    next pixel is not allowed it turns as little as it can (up to 90 degrees), so
    it follows thin or curved structures and stops at dead ends.
    """
    position = np.array(start, dtype=np.float64)  # (row, col) of the pen
    heading = rng.uniform(-np.pi, np.pi)
    path = [start]
    visited = {start}
    first_heading = heading
    for _ in range(_MAX_MOVES_PER_PIXEL * length):
        if len(path) >= length or abs(heading - first_heading) > _MAX_NET_TURN:
            break  # long enough, or about to paint a loop
        heading += rng.normal(0.0, _TURN_SIGMA)
        move = _next_move(allowed, position, heading, visited, rng)
        if move is None:
            break
        heading, position = move
        pixel = (round(position[0]), round(position[1]))
        if pixel not in visited:
            visited.add(pixel)
            path.append(pixel)
    return path


def _next_move(
    allowed: np.ndarray,
    position: np.ndarray,
    heading: float,
    visited: set[tuple[int, int]],
    rng: np.random.Generator,
) -> tuple[float, np.ndarray] | None:
    """The smallest turn whose unit step lands on an allowed, unvisited pixel."""
    height, width = allowed.shape
    current = (round(position[0]), round(position[1]))
    side = rng.choice((-1.0, 1.0))
    for turn in _TURNS:
        for sign in (side, -side):
            angle = heading + sign * turn
            target = position + np.array([np.sin(angle), np.cos(angle)])
            pixel = (round(target[0]), round(target[1]))
            inside = 0 <= pixel[0] < height and 0 <= pixel[1] < width
            fresh = pixel == current or pixel not in visited
            if inside and fresh and allowed[pixel]:
                return angle, target
    return None
