"""A training set: named (image, scribbles) pairs that training draws its crops from.

Images may differ in size; their channels must agree. Each painted slice of a pair (a
2D image has one; every slice or time point of a stack or time series with paint is
one) is a *unit*. A crop is drawn by picking a painted class uniformly, then a unit
that has that class uniformly, then a painted pixel of that class in that unit, so
classes and images weigh the same however much of each is painted. Images are never
copied; labels are copied once, when they are handed in (the user's layers may
change under a running trainer).

Each image is normalised with the map that the model's normalisation policy gives it
(:meth:`napari_dsparse.data.Normalization.for_image`): by default its own percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_dsparse.data import (
    InputError,
    Normalization,
    check_labels,
    check_layout,
    painted_slices,
)

__all__ = ["Crop", "Pair", "TrainingSet"]


@dataclass(frozen=True)
class Pair:
    """One image ``(C, Z, Y, X)`` (not copied) and its labels ``(Z, Y, X)``."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    normalization: Normalization  # resolved for this image

    @property
    def painted_slices(self) -> np.ndarray:
        """Indices of the slices (time points) with at least one painted pixel."""
        return painted_slices(self.labels)


@dataclass(frozen=True)
class Crop:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of slice ``z`` of pair ``pair``."""

    pair: Pair
    z: int
    rows: tuple[int, int]
    cols: tuple[int, int]


@dataclass(frozen=True)
class _Unit:
    """The painted pixels ``(row, col)`` of one class in one slice of one pair."""

    pair: Pair
    z: int
    pixels: np.ndarray  # (n, 2)


@dataclass(frozen=True)
class _Index:
    """One pair's paint: counts per class, painted slices, units per class."""

    counts: np.ndarray  # (K,)
    painted: list[tuple[Pair, int]]
    units: list[list[_Unit]]  # [class k - 1] -> units


def _index(pair: Pair, num_classes: int) -> _Index:
    units: list[list[_Unit]] = [[] for _ in range(num_classes)]
    painted = []
    for z in pair.painted_slices:
        painted.append((pair, int(z)))
        plane = pair.labels[z]
        for k in np.unique(plane[plane > 0]):
            units[k - 1].append(_Unit(pair, int(z), np.argwhere(plane == k)))
    counts = np.array([sum(len(unit.pixels) for unit in k) for k in units], np.int64)
    return _Index(counts, painted, units)


class TrainingSet:
    """Named (image, labels) pairs with class- and image-balanced crop sampling.

    ``normalization`` is the model's: its policy resolves each image's map when the
    image is added. Adding a pair under an existing name replaces it; with the same
    image only the labels change (its normalisation is kept).
    """

    def __init__(self, normalization: Normalization, num_classes: int) -> None:
        self.normalization = normalization
        self.num_classes = num_classes
        self._pairs: dict[str, Pair] = {}
        self._indexes: dict[str, _Index] = {}  # per pair, so a change costs one pair
        self._refresh()

    # -- the pairs ----------------------------------------------------------------

    def add(self, name: str, image: np.ndarray, labels: np.ndarray) -> Pair:
        """Add (or replace) the pair ``name``: ``image`` ``(C, Z, Y, X)``, labels."""
        check_layout(image)
        others = {p.image.shape[0] for n, p in self._pairs.items() if n != name}
        if others and image.shape[0] not in others:
            raise InputError(
                f"{name!r} has {image.shape[0]} channel(s) but the training set's "
                f"images have {others.pop()}: all images must have the same channels"
            )
        checked = check_labels(labels, image.shape[1:])  # int64: a copy unless it was
        if np.may_share_memory(checked, labels):  # copy once: the layer may change
            checked = checked.copy()
        labels = checked
        if labels.max(initial=0) > self.num_classes:
            raise InputError(
                f"labels of {name!r} use class {labels.max()} but the model has "
                f"{self.num_classes} classes"
            )
        old = self._pairs.get(name)
        if old is not None and old.image is image:
            normalization = old.normalization
        else:
            normalization = self.normalization.for_image(image)
        pair = Pair(name, image, labels, normalization)
        self._pairs[name] = pair
        self._indexes[name] = _index(pair, self.num_classes)
        self._refresh()
        return pair

    def set_labels(self, name: str, labels: np.ndarray) -> None:
        """New labels for the existing pair ``name`` (copied)."""
        if name not in self._pairs:
            raise KeyError(f"no pair named {name!r} in the training set")
        self.add(name, self._pairs[name].image, labels)

    def remove(self, name: str) -> None:
        """Drop the pair ``name`` (nothing happens if there is none)."""
        if self._pairs.pop(name, None) is not None:
            del self._indexes[name]
            self._refresh()

    def __contains__(self, name: object) -> bool:
        return name in self._pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, name: str) -> Pair:
        return self._pairs[name]

    def get(self, name: str) -> Pair | None:
        return self._pairs.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._pairs)

    @property
    def pairs(self) -> list[Pair]:
        return list(self._pairs.values())

    @property
    def channels(self) -> int | None:
        """Channels of the set's images (``None`` while it is empty)."""
        first = next(iter(self._pairs.values()), None)
        return None if first is None else first.image.shape[0]

    # -- sampling -------------------------------------------------------------------

    def _refresh(self) -> None:
        """Gather the pairs' counts, painted slices and units."""
        self.counts = np.zeros(self.num_classes, dtype=np.int64)
        self._units: list[list[_Unit]] = [[] for _ in range(self.num_classes)]
        self._painted: list[tuple[Pair, int]] = []
        for index in self._indexes.values():
            self.counts += index.counts
            self._painted += index.painted
            for units, more in zip(self._units, index.units, strict=True):
                units += more

    @property
    def painted_units(self) -> list[tuple[Pair, int]]:
        """Every painted slice as ``(pair, z)``."""
        return list(self._painted)

    @property
    def largest_slice(self) -> tuple[int, int]:
        """The largest height and width among painted slices."""
        if not self._painted:
            return 0, 0
        return (
            max(pair.image.shape[-2] for pair, _ in self._painted),
            max(pair.image.shape[-1] for pair, _ in self._painted),
        )

    def sample_crop(self, rng: np.random.Generator, crop_size: int) -> Crop:
        """A crop of at most ``crop_size`` square around a painted pixel.

        Class uniformly among painted classes, then a unit with that class
        uniformly, then a pixel of that class in it, then the crop's offset.
        """
        classes = [units for units in self._units if units]
        if not classes:
            raise InputError("no painted pixels: paint a few strokes of each class")
        units = classes[rng.integers(len(classes))]
        unit = units[rng.integers(len(units))] if len(units) > 1 else units[0]
        row, col = unit.pixels[rng.integers(len(unit.pixels))]
        height, width = unit.pair.image.shape[-2:]
        crop_h, crop_w = min(crop_size, height), min(crop_size, width)
        r0 = int(np.clip(row - rng.integers(crop_h), 0, height - crop_h))
        c0 = int(np.clip(col - rng.integers(crop_w), 0, width - crop_w))
        return Crop(unit.pair, unit.z, (r0, r0 + crop_h), (c0, c0 + crop_w))
