"""Images, labels and crops: everything between user arrays and network tensors.

Conventions: an image is held as ``(C, Z, Y, X)`` (``Z = 1`` for 2D) in its own dtype
and normalised window by window, so large images never need a float copy; labels are
``(Z, Y, X)`` integers, 0 = unpainted, 1..K = classes. Volumes are handled slice by
slice: the networks are 2D, each slice is predicted with its own 2D patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "MAX_CLASSES",
    "NORMALIZATION_POLICIES",
    "NORMALIZED_LIMIT",
    "InputError",
    "Normalization",
    "NormalizationPolicy",
    "as_channels_first",
    "as_planes",
    "check_image",
    "check_labels",
    "check_layout",
    "check_trainable_image",
    "class_counts",
    "class_id_ranges",
    "class_weights",
    "missing_classes",
    "painted_classes",
    "painted_slices",
    "painted_values",
    "read_window",
    "small_image_warning",
]


MAX_CLASSES = 1000  # a model's output channels; 65535 ones would not fit in memory
# Normalised pixels (the 1st-99.8th percentiles map to 0-1) are clipped to this.
NORMALIZED_LIMIT = 1e4
_FLOAT32_SAFE = 1e30  # a low or a scale beyond it: normalised in float64


class InputError(ValueError):
    """Input the user must fix (wrong shape, no paint, NaN pixels, ...)."""


def as_channels_first(image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """View ``image`` as ``(C, Z, Y, X)`` without copying.

    With ``channel_axis=None`` the layout is inferred as napari does for RGB: a 3D
    array whose last axis has 3 or 4 entries is ``(Y, X, RGB[A])`` (alpha ignored),
    one whose last axis has 1 entry is ``(Y, X, 1)``; any other 2D or 3D array is
    one channel (``(Y, X)`` or ``(Z, Y, X)``). Arrays of
    4 or more dimensions need an explicit ``channel_axis``; the others are then
    ``Z, Y, X`` or, for time series, ``T, Z, Y, X`` merged into slices.
    """
    if image.ndim < 2:
        raise InputError(
            f"an image needs 2 or more dimensions, not shape {image.shape}"
        )
    if image.ndim == 3 and channel_axis is None and image.shape[-1] in (3, 4):
        return np.moveaxis(image[..., :3], -1, 0)[:, None]  # RGB; alpha ignored
    if image.ndim == 3 and channel_axis is None and image.shape[-1] == 1:
        return np.moveaxis(image, -1, 0)[:, None]  # (Y, X, 1): one channel
    if channel_axis is None:
        if image.ndim not in (2, 3):
            raise InputError(
                f"cannot tell channels from space in an image of shape {image.shape}: "
                "give the channel axis"
            )
        return image.reshape((1,) * (5 - image.ndim) + image.shape)[0]
    if not -image.ndim <= channel_axis < image.ndim:
        raise InputError(
            f"channel axis {channel_axis} does not exist in an image of shape "
            f"{image.shape} (axes 0 to {image.ndim - 1}, or -1 for the last)"
        )
    if image.ndim == 2:
        raise InputError(
            f"an image of shape {image.shape} has no axis to spare for channels "
            "(a channel axis needs channels, Y and X): give none"
        )
    moved = np.moveaxis(image, channel_axis, 0)
    if moved.ndim == 3:
        return moved[:, None]
    return as_planes(moved)  # volumes; time series of planes or volumes as slices


def check_layout(image: np.ndarray) -> None:
    """``InputError`` unless ``image`` has the core's layout, ``(C, Z, Y, X)``."""
    if np.ndim(image) != 4:
        raise InputError(
            f"expected a (C, Z, Y, X) array, got shape {tuple(np.shape(image))}; "
            "napari_dsparse.data.as_channels_first(image) gives that view"
        )


def check_image(image: np.ndarray) -> None:
    """Raise ``InputError`` for NaN/Inf pixels, non-real data or empty images."""
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise InputError(f"the image has non-numeric dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.complexfloating):
        raise InputError(
            f"the image is complex ({image.dtype}); give its magnitude or its real "
            "and imaginary parts as channels"
        )
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise InputError(
            "the image contains NaN or infinite pixels; replace them first"
        )
    height, width = image.shape[-2:]
    if min(height, width) < 1:
        raise InputError(
            f"the image is {height} x {width} pixels: it has no pixels to classify"
        )
    if np.ndim(image) == 4 and 0 in image.shape[:2]:  # (C, Z, Y, X)
        what = "channels" if image.shape[0] == 0 else "planes"
        raise InputError(f"the image has 0 {what}: it has no pixels to classify")


def check_trainable_image(image: np.ndarray) -> None:
    """:func:`check_image`, and refuse an image whose pixels all have one value.

    Prediction accepts a constant image (an empty frame is legitimate input); training
    on one cannot tell classes apart, whatever is painted.
    """
    check_image(image)
    if image.size and bool(image.min() == image.max()):
        raise InputError(
            f"every pixel of the image has the value {np.asarray(image.min()).item()}: "
            "there is nothing to tell classes apart"
        )


def small_image_warning(spatial_shape: tuple[int, ...], patch_size: int) -> str | None:
    """A warning when slices are smaller than the receptive field, else ``None``.

    Such images still work: the missing context is mirrored, as at every border.
    """
    height, width = spatial_shape[-2:]
    if min(height, width) >= patch_size:
        return None
    return (
        f"the image ({height} x {width}) is smaller than the network's receptive "
        f"field ({patch_size} x {patch_size}): its context is mirrored, predictions "
        "may be poor"
    )


def as_planes(image: np.ndarray) -> np.ndarray:
    """Merge every axis between channels and ``(Y, X)`` into one slice axis.

    ``(C, T, Z, Y, X)`` (a time series of volumes) becomes ``(C, T * Z, Y, X)``: the
    networks are 2D, so each time point and plane is a slice of its own.
    """
    return image.reshape((image.shape[0], -1, *image.shape[-2:]))


def painted_classes(labels: np.ndarray) -> np.ndarray:
    """The class ids 1..K with at least one painted pixel, sorted.

    ``labels`` are validated (non-negative integers, see :func:`check_labels`).
    """
    present = np.flatnonzero(np.bincount(painted_values(labels)))
    return present[present > 0]


def painted_values(labels: np.ndarray) -> np.ndarray:
    """The painted (non-zero) entries of validated ``labels``, flat.

    Only the slices (first axis) that hold paint are read past a quick maximum: a
    volume painted on a few slices costs little more than those slices.
    """
    if labels.size == 0:
        return np.zeros(0, dtype=labels.dtype)
    rows = labels.reshape(labels.shape[0], -1) if labels.ndim > 1 else labels[None]
    painted = rows[painted_slices(rows)]
    return painted[painted > 0]


def painted_slices(labels: np.ndarray) -> np.ndarray:
    """Indices along the first axis of the slices with a painted (non-zero) pixel."""
    return np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1))


def missing_classes(labels: np.ndarray) -> list[int]:
    """Class ids between 1 and the largest painted one without any stroke (gaps)."""
    present = painted_classes(labels)
    if not present.size:
        return []
    return sorted(set(range(1, int(present[-1]) + 1)) - set(present.tolist()))


def class_id_ranges(ids: Sequence[int], names: Sequence[str] = ()) -> str:
    """Sorted class ids for a message: runs of three or more as ``"3-39"``.

    Other ids stand alone, with their name where ``names`` (of classes 1..) has one:
    ``[2, 5, 6, 7]`` with names ``("a", "b")`` gives ``"2 ('b'), 5-7"``.
    """
    runs: list[list[int]] = []
    for k in ids:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    parts = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"{run[0]}-{run[-1]}")
        else:
            parts.extend(_named(k, names) for k in run)
    return ", ".join(parts)


def _named(class_id: int, names: Sequence[str]) -> str:
    if class_id <= len(names):
        return f"{class_id} ({names[class_id - 1]!r})"
    return str(class_id)


def check_labels(labels: np.ndarray, spatial_shape: tuple[int, ...]) -> np.ndarray:
    """Validate painted labels against the image; return them as ``(Z, Y, X)``.

    The result has the smallest unsigned type that holds the largest class (uint8
    up to 255 classes): the snapshots a live session keeps cost one byte a pixel.
    """
    image_shape = spatial_shape[1:] if spatial_shape[0] == 1 else spatial_shape
    if labels.ndim > 2 and labels.shape[-1] == 1 and labels.shape[:-1] == image_shape:
        labels = labels[..., 0]  # (Y, X, 1), as masks are often saved
    planes = int(np.prod(labels.shape[:-2]))
    if labels.ndim > 3 and (planes, *labels.shape[-2:]) == tuple(spatial_shape):
        labels = labels.reshape(spatial_shape)  # a time series: planes as slices
    if labels.shape not in (spatial_shape, image_shape):
        hint = ""
        if labels.shape[:-1] == image_shape and labels.shape[-1] in (3, 4):
            hint = "; they look like a colour picture: give one plane of class ids"
        elif len(image_shape) == 3 and labels.shape == image_shape[1:]:
            hint = (
                f"; if the image's {image_shape[0]} planes are channels, give "
                "the channel axis (--channel-axis 0 on the command line)"
            )
        elif len(image_shape) == 3 and labels.shape == image_shape[:2]:
            hint = (
                f"; if the image's last axis ({image_shape[2]} entries) holds "
                "channels, give the channel axis (--channel-axis -1 on the "
                "command line)"
            )
        shapes = f"labels shape {labels.shape} differs from the image's {image_shape}"
        raise InputError(shapes + hint)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise InputError("labels must be whole numbers (0 unpainted, 1..K classes)")
    elif not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise InputError(f"labels have non-numeric dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise InputError("labels must not be negative (0 unpainted, 1..K classes)")
    largest = int(labels.max(initial=0))
    if largest > MAX_CLASSES:
        raise InputError(
            f"the labels hold class {largest}, above {MAX_CLASSES}, the most classes "
            "a model can have (0 unpainted, 1..K classes); set pixels that mean "
            "'ignore' to 0"
        )
    out = np.asarray(labels, dtype=_label_dtype(largest))
    return out.reshape((1,) * (3 - out.ndim) + out.shape)


def _label_dtype(largest: int) -> type[np.integer]:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Painted pixels per class 1..K, shape ``(K,)``."""
    counts = np.bincount(painted_values(labels), minlength=num_classes + 1)
    return counts[1 : num_classes + 1]


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Label-histogram equalisation: every painted class weighs the same in total.

    ``w_k = N / (K_painted * n_k)`` for painted classes, 0 for unpainted ones, so the
    weighted pixel counts are equal and sum to the number of painted pixels ``N``.
    """
    painted = counts > 0
    weights = np.zeros(counts.shape, dtype=np.float64)
    weights[painted] = counts.sum() / (painted.sum() * counts[painted])
    return weights


NormalizationPolicy = Literal["per_image", "fixed"]
NORMALIZATION_POLICIES: tuple[str, ...] = ("per_image", "fixed")
DEFAULT_PERCENTILES = (1.0, 99.8)


@dataclass(frozen=True)
class Normalization:
    """Per-channel affine map of robust percentiles ``low -> 0``, ``high -> 1``.

    ``policy`` says how the map is chosen for an image the model meets
    (:meth:`for_image`): ``"per_image"`` takes that image's own ``percentiles``
    (``low``/``high`` are then those of the first training image, kept for reference
    and for readers that predate policies); ``"fixed"`` applies ``low``/``high`` to
    every image as they are. A stack or time series counts as one image.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]
    policy: NormalizationPolicy = "fixed"
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES

    def __post_init__(self) -> None:
        if self.policy not in NORMALIZATION_POLICIES:
            raise InputError(
                f"unknown normalisation policy {self.policy!r}: choose one of "
                f"{', '.join(NORMALIZATION_POLICIES)}"
            )

    @classmethod
    def from_image(
        cls,
        image: np.ndarray,
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        policy: NormalizationPolicy = "per_image",
    ) -> Normalization:
        """Percentiles of each channel of a ``(C, Z, Y, X)`` image (subsampled)."""
        return cls.from_images([image], percentiles, policy)

    @classmethod
    def from_images(
        cls,
        images: Sequence[np.ndarray],
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        policy: NormalizationPolicy = "per_image",
    ) -> Normalization:
        """Percentiles of each channel over ``(C, Z, Y, X)`` images pooled together.

        With ``policy="per_image"`` only the first image is used (the others get
        their own percentiles when the model meets them).
        """
        if not images:
            raise InputError("no images to normalise")
        for image in images:
            check_layout(image)
        if policy == "per_image":
            images = images[:1]
        channels = images[0].shape[0]
        budget = max(1, 1_000_000 // len(images))
        sample = np.concatenate(
            [
                _subsample(image, budget).astype(np.float64).reshape(channels, -1)
                for image in images
            ],
            axis=1,
        )
        low, high = np.percentile(sample, percentiles, 1)
        high = np.where(high > low, high, low + 1.0)  # a constant channel maps to 0
        return cls(
            tuple(map(float, low)),
            tuple(map(float, high)),
            policy,
            (float(percentiles[0]), float(percentiles[1])),
        )

    def for_image(self, image: np.ndarray) -> Normalization:
        """The map to use for the ``(C, Z, Y, X)`` ``image``: see ``policy``."""
        if self.policy == "fixed":
            return self
        return Normalization.from_image(image, self.percentiles, self.policy)

    def apply(self, window: np.ndarray) -> np.ndarray:
        """Normalise a ``(C, ...)`` window to float32.

        Pixels that float32 cannot hold exactly (float64, 32- and 64-bit integers)
        are normalised in float64 first: a float64 image around 1e9 or 1e300 keeps
        its contrast instead of becoming NaN. Results are clipped to
        ``±NORMALIZED_LIMIT``, so that no outlier overflows the network.
        """
        shape = (len(self.low),) + (1,) * (window.ndim - 1)
        low = np.asarray(self.low, np.float64).reshape(shape)
        scale = 1 / (np.asarray(self.high, np.float64).reshape(shape) - low)
        in_range = max(np.abs(low).max(), np.abs(scale).max()) < _FLOAT32_SAFE
        exact = in_range and np.can_cast(window.dtype, np.float32)
        work = np.float32 if exact else np.float64
        normalized = (window.astype(work) - low.astype(work)) * scale.astype(work)
        np.clip(normalized, -NORMALIZED_LIMIT, NORMALIZED_LIMIT, out=normalized)
        return normalized.astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "low": list(self.low),
            "high": list(self.high),
            "policy": self.policy,
            "percentiles": list(self.percentiles),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Normalization:
        """Read :meth:`to_dict`; files without a policy (older) are ``"fixed"``."""
        return cls(
            tuple(values["low"]),
            tuple(values["high"]),
            values.get("policy", "fixed"),
            tuple(values.get("percentiles", DEFAULT_PERCENTILES)),
        )


def _subsample(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """A regular subsample with at most ``max_pixels`` pixels per channel."""
    pixels = int(np.prod(image.shape[1:]))
    step = max(1, int(np.ceil((pixels / max_pixels) ** (1 / (image.ndim - 1)))))
    return np.asarray(
        image[(slice(None),) + (slice(None, None, step),) * (image.ndim - 1)]
    )


def read_window(
    image: np.ndarray,
    normalization: Normalization,
    z: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    halo: int,
) -> np.ndarray:
    """Normalised ``(C, h + 2 halo, w + 2 halo)`` window of slice ``z`` of ``image``.

    Pixels beyond the image border are reflected exactly as
    ``np.pad(whole_slice, halo, mode="reflect")`` would give them, so any window equals
    the same region of the reflect-padded whole image.
    """
    height, width = image.shape[-2:]
    (r0, r1), (c0, c1) = rows, cols
    ra, rb = max(0, r0 - halo), min(height, r1 + halo)
    ca, cb = max(0, c0 - halo), min(width, c1 + halo)
    window = normalization.apply(np.asarray(image[:, z, ra:rb, ca:cb]))
    pad = (
        (0, 0),
        (ra - (r0 - halo), (r1 + halo) - rb),
        (ca - (c0 - halo), (c1 + halo) - cb),
    )
    if any(before or after for before, after in pad):
        window = np.pad(window, pad, mode="reflect")
    return window
