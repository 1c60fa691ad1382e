"""Image layouts, label checks, class balancing, normalisation and windows."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dsparse.data import (
    MAX_CLASSES,
    InputError,
    Normalization,
    as_channels_first,
    check_image,
    check_labels,
    class_counts,
    class_id_ranges,
    class_weights,
    painted_classes,
    read_window,
)


@pytest.mark.parametrize(
    ("shape", "channel_axis", "expected"),
    [
        ((30, 40), None, (1, 1, 30, 40)),
        ((30, 40, 3), None, (3, 1, 30, 40)),
        ((30, 40, 1), None, (1, 1, 30, 40)),  # not 30 planes of 40 x 1 pixels
        ((5, 30, 40), None, (1, 5, 30, 40)),
        ((2, 30, 40), 0, (2, 1, 30, 40)),
        ((5, 30, 40, 2), -1, (2, 5, 30, 40)),
    ],
)
def test_layouts_become_channels_first(shape, channel_axis, expected) -> None:
    image = np.arange(np.prod(shape)).reshape(shape)
    out = as_channels_first(image, channel_axis)
    assert out.shape == expected
    assert np.shares_memory(out, image)


def test_rgb_channels_keep_their_values() -> None:
    image = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(as_channels_first(image)[1, 0], image[..., 1])


def test_four_dimensional_images_need_a_channel_axis() -> None:
    with pytest.raises(InputError, match="channel axis"):
        as_channels_first(np.zeros((2, 3, 4, 5)))


@pytest.mark.parametrize(
    ("shape", "channel_axis", "message"),
    [
        ((5,), None, r"needs 2 or more dimensions, not shape \(5,\)"),
        ((4, 5), 0, r"shape \(4, 5\) has no axis to spare for channels"),
    ],
)
def test_too_few_dimensions_are_named(shape, channel_axis, message) -> None:
    with pytest.raises(InputError, match=message):
        as_channels_first(np.zeros(shape), channel_axis)


@pytest.mark.parametrize("channel_axis", [2, -3, 5])
def test_a_channel_axis_outside_the_image_is_named(channel_axis) -> None:
    with pytest.raises(InputError, match=f"channel axis {channel_axis} does not exist"):
        as_channels_first(np.zeros((4, 5)), channel_axis)


def test_nan_pixels_are_rejected() -> None:
    image = np.ones((1, 1, 8, 8), np.float32)
    image[0, 0, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        check_image(image)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((9, 9), np.uint8), "differs"),
        (np.full((8, 8), 0.5), "whole numbers"),
        (np.full((8, 8), -1), "negative"),
        (np.zeros((8, 8, 3), np.uint8), "colour picture: give one plane"),
        (np.full((8, 8), MAX_CLASSES + 1, np.uint16), "set pixels that mean 'ignore'"),
    ],
    ids=["shape", "fraction", "negative", "rgb", "too large"],
)
def test_bad_labels_are_rejected(labels, message) -> None:
    with pytest.raises(InputError, match=message):
        check_labels(labels, (1, 8, 8))


def test_the_largest_class_id_is_accepted() -> None:
    labels = np.full((8, 8), MAX_CLASSES, np.uint16)
    assert check_labels(labels, (1, 8, 8)).max() == MAX_CLASSES


def test_labels_with_a_trailing_axis_of_one_are_accepted() -> None:
    labels = np.zeros((8, 8, 1), np.uint8)  # (Y, X, 1), as masks are often saved
    labels[2, 3, 0] = 2
    checked = check_labels(labels, (1, 8, 8))
    assert checked.shape == (1, 8, 8) and checked[0, 2, 3] == 2


def test_float_labels_with_whole_values_are_accepted() -> None:
    labels = check_labels(np.full((8, 8), 2.0), (1, 8, 8))
    assert labels.shape == (1, 8, 8) and (labels == 2).all()


@pytest.mark.parametrize(
    ("largest", "dtype"), [(1, np.uint8), (255, np.uint8), (256, np.uint16)]
)
def test_labels_are_kept_in_the_smallest_type_that_holds_them(largest, dtype) -> None:
    painted = np.zeros((8, 8), np.int64)
    painted[0, :2] = 1, largest
    labels = check_labels(painted, (1, 8, 8))
    assert labels.dtype == dtype
    np.testing.assert_array_equal(labels[0], painted)


def test_class_weights_equalise_the_label_histogram() -> None:
    counts = class_counts(np.array([[0, 1, 1, 1], [1, 3, 0, 0]]), 3)
    np.testing.assert_array_equal(counts, [4, 0, 1])
    weights = class_weights(counts)
    weighted = weights * counts
    assert weights[1] == 0
    np.testing.assert_allclose(weighted[[0, 2]], [2.5, 2.5])
    assert weighted.sum() == pytest.approx(counts.sum())


@pytest.mark.parametrize(
    "shape, painted_slices",
    [((40, 50), [0]), ((12, 30, 20), [3, 7, 11]), ((12, 30, 20), []), ((5,), [0])],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64])
def test_counts_and_classes_equal_a_count_over_every_pixel(
    shape, painted_slices, dtype, rng
) -> None:
    """Only painted slices are read: the counts must still be those of the whole."""
    labels = np.zeros(shape, dtype)
    for z in painted_slices:
        part = labels[z] if len(shape) > 2 else labels
        part[...] = rng.choice([0, 0, 0, 1, 3, 4], size=part.shape)
    expected = [int((labels == k).sum()) for k in range(1, 5)]
    np.testing.assert_array_equal(class_counts(labels, 4), expected)
    present = [k for k in range(1, 5) if expected[k - 1]]
    np.testing.assert_array_equal(painted_classes(labels), present)


def test_normalisation_maps_percentiles_to_zero_and_one() -> None:
    image = np.linspace(0, 1000, 10_000).reshape(1, 1, 100, 100)
    norm = Normalization.from_image(image, percentiles=(10, 90))
    out = norm.apply(image)
    assert out.dtype == np.float32
    assert np.percentile(out, 10) == pytest.approx(0, abs=1e-5)
    assert np.percentile(out, 90) == pytest.approx(1, abs=1e-5)


def test_constant_channels_do_not_divide_by_zero() -> None:
    norm = Normalization.from_image(np.full((1, 1, 10, 10), 7.0))
    assert np.isfinite(norm.apply(np.full((1, 5, 5), 7.0))).all()


@pytest.mark.parametrize("halo", [0, 3, 11])
def test_windows_equal_the_reflect_padded_whole_image(rng, halo) -> None:
    image = rng.normal(size=(2, 2, 17, 23)).astype(np.float32)
    norm = Normalization((0.0, -1.0), (1.0, 2.0))
    for _ in range(20):
        z = int(rng.integers(2))
        r0, c0 = int(rng.integers(17)), int(rng.integers(23))
        r1, c1 = int(rng.integers(r0 + 1, 18)), int(rng.integers(c0 + 1, 24))
        whole = np.pad(
            norm.apply(image[:, z]), ((0, 0), (halo,) * 2, (halo,) * 2), "reflect"
        )
        expected = whole[:, r0 : r1 + 2 * halo, c0 : c1 + 2 * halo]
        window = read_window(image, norm, z, (r0, r1), (c0, c1), halo)
        np.testing.assert_array_equal(window, expected)


def test_rgba_alpha_is_ignored() -> None:
    image = np.zeros((4, 5, 4), np.uint8)
    image[..., 3] = 255
    out = as_channels_first(image)
    assert out.shape == (3, 1, 4, 5) and out.max() == 0


@pytest.mark.parametrize(
    ("ids", "names", "expected"),
    [
        ([2, 5, 6, 7], ("a", "b"), "2 ('b'), 5-7"),
        ([3, 4], (), "3, 4"),
        ([3, *range(10, 300), 301], ("a",), "3, 10-299, 301"),
    ],
)
def test_class_id_ranges_name_short_runs_and_fold_long_ones(ids, names, expected):
    assert class_id_ranges(ids, names) == expected
