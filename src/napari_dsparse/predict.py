"""Prediction: every pixel's class probabilities, by region or tile by tile.

Each tile is read with its halo (reflected at the image border exactly as a
whole-image reflect padding would be) and run through the dense network in ``valid``
mode, so tiled, regional and whole-image results are the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from napari_dsparse.data import (
    InputError,
    Normalization,
    check_image,
    check_layout,
    read_window,
)
from napari_dsparse.model import Classifier

__all__ = [
    "Box",
    "class_dtype",
    "iter_tiles",
    "labels_and_uncertainty",
    "predict_box",
    "predict_proba",
]

DEFAULT_TILE = 512  # output pixels per tile side; about 0.3 GB of activations (fast)


@dataclass(frozen=True)
class Box:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of slice ``z``."""

    z: int
    r0: int
    r1: int
    c0: int
    c1: int


def iter_tiles(
    shape: tuple[int, int, int], tile: int, region: Box | None = None
) -> Iterator[Box]:
    """Tiles of at most ``tile x tile`` covering ``region`` (default: every slice)."""
    depth, height, width = shape
    slices = range(depth) if region is None else [region.z]
    r_start, r_stop = (0, height) if region is None else (region.r0, region.r1)
    c_start, c_stop = (0, width) if region is None else (region.c0, region.c1)
    for z in slices:
        for r0 in range(r_start, r_stop, tile):
            for c0 in range(c_start, c_stop, tile):
                yield Box(z, r0, min(r0 + tile, r_stop), c0, min(c0 + tile, c_stop))


def predict_box(
    classifier: Classifier,
    image: np.ndarray,
    box: Box,
    normalization: Normalization | None = None,
) -> np.ndarray:
    """Class probabilities ``(K, r1 - r0, c1 - c0)`` of one box of ``image``.

    ``normalization`` is the map resolved for the whole image
    (``classifier.normalization.for_image(image)``, computed once by the caller);
    without it, the classifier's stored ``low``/``high`` are used as they are.
    """
    window = read_window(
        image,
        normalization or classifier.normalization,
        box.z,
        (box.r0, box.r1),
        (box.c0, box.c1),
        classifier.halo,
    )  # (C, h + 2 halo, w + 2 halo)
    classifier.patch_net.eval()
    with torch.inference_mode():
        batch = torch.from_numpy(window[None]).to(classifier.device)
        logits = classifier.dense(batch, valid=True)  # (1, K, h, w)
        return torch.softmax(logits, dim=1)[0].float().cpu().numpy()


def predict_proba(
    classifier: Classifier,
    image: np.ndarray,
    region: Box | None = None,
    tile: int = DEFAULT_TILE,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Class probabilities of ``image`` (``(C, Z, Y, X)``), tile by tile.

    Returns ``(K, Z, Y, X)`` float32 for the whole image, or ``(K, h, w)`` for a
    ``region``. The image is normalised as the model's policy says (by default with
    the whole image's own percentiles, also when only a region is predicted).
    ``progress(done, total)`` is called after each tile.
    """
    _check_compatible(classifier, image)
    depth, height, width = image.shape[1:]
    if region is None:
        out = np.empty((classifier.num_classes, depth, height, width), np.float32)
        offset = (0, 0)
    else:
        out = np.empty(
            (classifier.num_classes, 1, region.r1 - region.r0, region.c1 - region.c0),
            np.float32,
        )
        offset = (region.r0, region.c0)
    boxes = list(iter_tiles((depth, height, width), tile, region))
    normalization = classifier.normalization.for_image(image)  # the whole image's
    for done, box in enumerate(boxes, start=1):
        z = box.z if region is None else 0
        out[
            :,
            z,
            box.r0 - offset[0] : box.r1 - offset[0],
            box.c0 - offset[1] : box.c1 - offset[1],
        ] = predict_box(classifier, image, box, normalization)
        if progress is not None:
            progress(done, len(boxes))
    return out if region is None else out[:, 0]


def class_dtype(largest_class: int) -> type[np.unsignedinteger]:
    """The type of a class map holding classes up to ``largest_class``."""
    return np.uint8 if largest_class <= np.iinfo(np.uint8).max else np.uint16


def labels_and_uncertainty(proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax classes 1..K (uint8 or uint16) and ``1 - max p`` rescaled to [0, 1]."""
    num_classes = proba.shape[0]
    labels = (proba.argmax(axis=0) + 1).astype(class_dtype(num_classes))
    uncertainty = (1 - proba.max(axis=0)) * (num_classes / max(num_classes - 1, 1))
    return labels, uncertainty.astype(np.float32)


def _check_compatible(classifier: Classifier, image: np.ndarray) -> None:
    check_layout(image)
    if image.shape[0] != classifier.in_channels:
        raise InputError(
            f"the model expects {classifier.in_channels} channel(s), "
            f"the image has {image.shape[0]}"
        )
    check_image(image)
