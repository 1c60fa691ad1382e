"""Bundled sample: scikit-image's ``coins`` with starter scribbles of two classes.

Qt-free so that the command line, the benchmarks and the tests share it; the napari
sample-data contribution in ``_sample_data.py`` wraps it in layers.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from scipy import ndimage as ndi
from skimage import data, draw, filters, morphology, segmentation

CLASS_NAMES = ("background", "coin")

# Polylines (row, col) painted with a 3-pixel brush, like a person would in napari.
_STROKES: dict[int, tuple[tuple[tuple[int, int], ...], ...]] = {
    1: (  # background: the gaps between the rows of coins and the right margin
        ((88, 12), (88, 120), (84, 235)),
        ((158, 12), (156, 70)),
        ((228, 120), (226, 190)),
        ((20, 378), (120, 380)),
    ),
    2: (  # coin: short strokes across a few coins
        ((50, 36), (50, 56)),
        ((125, 93), (128, 110)),
        ((190, 200), (198, 222)),
        ((258, 160), (262, 182)),
        ((118, 262), (122, 282)),
        ((45, 318), (62, 332)),
    ),
}


def paint_strokes(
    shape: tuple[int, int],
    strokes: dict[int, tuple[tuple[tuple[int, int], ...], ...]],
    brush_radius: int = 1,
) -> np.ndarray:
    """Rasterise polylines per class into a label image (0 = unpainted)."""
    labels = np.zeros(shape, dtype=np.uint8)
    footprint = morphology.disk(brush_radius)
    for class_id, polylines in strokes.items():
        mask = np.zeros(shape, dtype=bool)
        for polyline in polylines:
            for (r0, c0), (r1, c1) in pairwise(polyline):
                rr, cc = draw.line(r0, c0, r1, c1)
                mask[rr, cc] = True
        labels[morphology.dilation(mask, footprint)] = class_id
    return labels


def coins_sample() -> tuple[np.ndarray, np.ndarray]:
    """Return the coins image (uint8, 303 x 384) and its starter scribbles (uint8)."""
    image = data.coins()
    return image, paint_strokes(image.shape, _STROKES)


def coins_truth() -> np.ndarray:
    """Derived ground truth of the coins image: 1 background, 2 coin.

    scikit-image gallery's recipe: watershed of the Sobel elevation map from dark
    and bright markers, holes filled, specks removed.
    """
    image = data.coins()
    markers = np.zeros(image.shape, np.int32)
    markers[image < 30] = 1
    markers[image > 150] = 2
    coins = segmentation.watershed(filters.sobel(image), markers) == 2
    coins = ndi.binary_fill_holes(coins)
    coins = morphology.remove_small_objects(coins, max_size=20)
    return coins.astype(np.uint8) + 1
