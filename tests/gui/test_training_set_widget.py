"""The widget's training set: add image + scribble pairs, list them, train on all."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dsparse._demo import PLUGIN, WIDGET
from napari_dsparse.data import InputError

pytestmark = pytest.mark.gui


def _disc_image(size: int, seed: int) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    disc = (rows - size // 2) ** 2 + (cols - size // 2) ** 2 < (size // 4) ** 2
    noise = np.random.default_rng(seed).normal(0, 0.1, (size, size))
    return (disc + noise).astype(np.float32)


def _scribbles(viewer, widget, image_name: str, size: int):
    widget.image_picker.value = viewer.layers[image_name]
    widget.add_scribbles_button.clicked.emit()
    layer = widget.scribble_picker.value
    layer.data[3:5, 3 : size // 2] = 1
    layer.data[size // 2, size // 2 - 5 : size // 2 + 5] = 2
    layer.refresh()
    return layer


@pytest.fixture
def two_images(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(_disc_image(96, 0), name="left")
    viewer.add_image(_disc_image(64, 1), name="right")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    left = _scribbles(viewer, widget, "left", 96)
    widget.add_pair_button.clicked.emit()
    right = _scribbles(viewer, widget, "right", 64)
    widget.add_pair_button.clicked.emit()
    return viewer, widget, left, right


def test_the_list_shows_each_pair_with_its_painted_pixels(two_images) -> None:
    _viewer, widget, left, right = two_images
    rows = widget.pair_rows()
    assert len(rows) == 2 and widget.pair_header.value.startswith("training set: 2")
    for row, layer, name in zip(rows, (left, right), ("left", "right"), strict=True):
        counts = np.bincount(layer.data.ravel(), minlength=3)
        assert row == f"{name}: background {counts[1]}, coin {counts[2]}"


def test_counts_follow_new_strokes(two_images, qtbot) -> None:
    _viewer, widget, _left, right = two_images
    widget._watch(right)
    right.paint((40, 40), 2)  # the brush adds class 2 pixels
    expected = int((right.data == 2).sum())
    qtbot.waitUntil(lambda: widget.pair_rows()[1].endswith(f"coin {expected}"))


def test_channel_mismatch_is_refused(two_images) -> None:
    viewer, widget, _left, _right = two_images
    rgb = viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="rgb", rgb=True)
    scribbles = viewer.add_labels(np.ones((64, 64), np.uint8), name="rgb scribbles")
    with pytest.raises(InputError, match="channels must agree"):
        widget.add_pair(rgb, scribbles)
    assert len(widget.pair_rows()) == 2


def test_live_training_uses_every_pair_and_shows_the_image_in_view(
    two_images, qtbot
) -> None:
    viewer, widget, _left, _right = two_images
    widget.train_button.clicked.emit()  # "right" is the image in view
    qtbot.waitUntil(lambda: "right prediction" in viewer.layers, timeout=30_000)
    qtbot.waitUntil(
        lambda: sorted(widget._session.trainer.training_set.names) == ["left", "right"],
        timeout=10_000,
    )
    assert "left prediction" not in viewer.layers
    assert viewer.layers["right prediction"].data.shape == (64, 64)

    row = widget.pair_list[0]  # "left": its Remove button
    row[1].clicked.emit()
    assert [r.split(":")[0] for r in widget.pair_rows()] == ["right"]
    qtbot.waitUntil(
        lambda: widget._session.trainer.training_set.names == ["right"],
        timeout=10_000,
    )
    widget.stop()
    qtbot.waitUntil(lambda: not widget._worker.is_running, timeout=5_000)


def test_switching_the_image_keeps_the_model(
    two_images, qtbot, update_once_and_wait
) -> None:
    viewer, widget, left, _right = two_images
    update_once_and_wait(widget)
    classifier = widget._session.classifier
    widget.image_picker.value = viewer.layers["left"]
    widget.scribble_picker.value = left
    update_once_and_wait(widget)
    assert widget._session.classifier is classifier
    assert widget._session.name == "left"
    assert "left prediction" in viewer.layers


def test_a_time_series_lists_its_painted_time_points(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    series = np.stack([_disc_image(64, seed) for seed in range(4)])  # (T, Y, X)
    layer = viewer.add_image(series, name="series")
    labels = np.zeros(series.shape, np.uint8)
    labels[0, 3:5, 3:30], labels[2, 32, 27:37] = 1, 2
    scribbles = viewer.add_labels(labels, name="series scribbles")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.add_pair(layer, scribbles)
    assert widget.pair_rows() == ["series: background 54, coin 10 (2 of 4 slices)"]
    assert np.shares_memory(widget._pair_arrays["series"], layer.data)  # no copy


def test_a_saved_session_restores_the_training_set(
    two_images, qtbot, tmp_path, update_once_and_wait
) -> None:
    viewer, widget, left, _right = two_images
    update_once_and_wait(widget)  # "right" in view; both pairs in the set
    assert widget.save_session_to(tmp_path / "s.pt")
    left_strokes = left.data.copy()
    widget.remove_pair("left")
    widget.remove_pair("right")
    assert widget.pair_rows() == []
    assert widget.restore_session_from(tmp_path / "s.pt")
    assert [row.split(":")[0] for row in widget.pair_rows()] == ["right", "left"]
    restored = viewer.layers["left scribbles (restored)"]
    np.testing.assert_array_equal(restored.data, left_strokes)
    assert sorted(widget._session.trainer.training_set.names) == ["left", "right"]
