"""Simulated painting: strokes stay in their class, corrections land on errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_dsparse.scribbles import correction_strokes, initial_strokes


def _three_regions() -> np.ndarray:
    """A 200 x 200 truth: two wide regions (1, 2) and thin 1-px lines (3)."""
    truth = np.ones((200, 200), np.int32)
    truth[:, 100:] = 2
    truth[40::40, :] = 3  # horizontal lines one pixel wide
    return truth


def test_initial_strokes_lie_inside_their_class() -> None:
    truth = _three_regions()
    labels = initial_strokes(truth, np.random.default_rng(0))
    painted = labels > 0
    assert np.array_equal(labels[painted], truth[painted])


def test_initial_strokes_keep_off_class_boundaries_where_there_is_room() -> None:
    truth = _three_regions()
    labels = initial_strokes(truth, np.random.default_rng(1))
    for k in (1, 2):
        distance = ndi.distance_transform_edt(np.pad(truth == k, 1, mode="edge"))
        assert distance[1:-1, 1:-1][labels == k].min() > 1


def test_initial_strokes_paint_every_class_including_thin_ones() -> None:
    truth = _three_regions()
    labels = initial_strokes(truth, np.random.default_rng(2), strokes_per_class=3)
    counts = np.bincount(labels.ravel(), minlength=4)[1:]
    assert (counts >= 20).all(), counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_initial_strokes_paint_about_one_percent(seed: int) -> None:
    truth = np.where(np.add.outer(np.arange(256), np.arange(256)) < 256, 1, 2)
    labels = initial_strokes(truth, np.random.default_rng(seed))
    assert 0.005 <= (labels > 0).mean() <= 0.02


def test_initial_strokes_are_seeded() -> None:
    truth = _three_regions()
    first = initial_strokes(truth, np.random.default_rng(5))
    assert np.array_equal(first, initial_strokes(truth, np.random.default_rng(5)))
    assert not np.array_equal(first, initial_strokes(truth, np.random.default_rng(6)))


def test_strokes_are_strokes_not_scattered_dots() -> None:
    truth = np.ones((128, 128), np.int32)
    truth[:, 64:] = 2
    labels = initial_strokes(truth, np.random.default_rng(3), strokes_per_class=2)
    for k in (1, 2):
        _, pieces = ndi.label(labels == k, np.ones((3, 3)))
        assert pieces <= 2


def _wrong_prediction(truth: np.ndarray) -> np.ndarray:
    prediction = truth.copy()
    prediction[10:60, 10:60] = 2  # a big block of class 1 predicted as 2
    prediction[150:160, 150:190] = 1  # a smaller block of class 2 predicted as 1
    return prediction


def test_corrections_land_on_wrong_pixels_with_the_true_class() -> None:
    truth = _three_regions()
    prediction = _wrong_prediction(truth)
    labels = initial_strokes(truth, np.random.default_rng(0))
    corrected = correction_strokes(
        truth, prediction, labels, np.random.default_rng(0), n=4
    )
    new = corrected != labels
    assert new.sum() > 20
    assert set(np.unique(corrected[new])) == {1, 2, 3}  # 4 regions, 3 true classes
    assert (prediction[new] != truth[new]).all()
    assert np.array_equal(corrected[new], truth[new])
    assert np.array_equal(corrected[labels > 0], labels[labels > 0])


def test_corrections_go_to_the_largest_wrong_region_first() -> None:
    truth = _three_regions()
    prediction = _wrong_prediction(truth)
    labels = np.zeros_like(truth, dtype=np.uint8)
    corrected = correction_strokes(
        truth, prediction, labels, np.random.default_rng(0), n=1
    )
    rows, cols = np.nonzero(corrected)
    assert rows.size and rows.max() < 60 and cols.max() < 60


def test_corrections_leave_their_inputs_untouched() -> None:
    truth = _three_regions()
    prediction = _wrong_prediction(truth)
    labels = initial_strokes(truth, np.random.default_rng(0))
    copies = truth.copy(), prediction.copy(), labels.copy()
    corrected = correction_strokes(truth, prediction, labels, np.random.default_rng(0))
    assert corrected is not labels
    for before, after in zip(copies, (truth, prediction, labels), strict=True):
        assert np.array_equal(before, after)


def test_no_corrections_when_the_prediction_is_right() -> None:
    truth = _three_regions()
    labels = np.zeros_like(truth, dtype=np.uint8)
    corrected = correction_strokes(truth, truth, labels, np.random.default_rng(0))
    assert not corrected.any()


def test_rejects_mismatched_shapes() -> None:
    truth = _three_regions()
    with pytest.raises(ValueError, match="same shape"):
        correction_strokes(
            truth, truth[:-1], np.zeros_like(truth), np.random.default_rng(0)
        )
