"""The plugin in a real napari viewer: sample data and the docked widget."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dsparse._demo import PLUGIN, open_demo_viewer
from napari_dsparse._widget import DsparseWidget

pytestmark = pytest.mark.gui


def test_sample_opens_image_and_two_class_scribbles(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "coins")
    image, scribbles = viewer.layers
    assert image.data.shape == scribbles.data.shape
    assert set(np.unique(scribbles.data)) == {0, 1, 2}


def test_widget_docks_through_the_plugin_api_and_picks_the_sample(
    make_napari_viewer,
) -> None:
    viewer = make_napari_viewer()
    widget = open_demo_viewer(viewer)
    assert isinstance(widget, DsparseWidget)
    assert widget.image_picker.value is viewer.layers["coins"]
    assert widget.scribble_picker.value is viewer.layers["scribbles"]


def test_add_scribble_layer_matches_the_image_geometry(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((20, 30, 3), np.uint8), rgb=True, scale=(2, 3))
    image.translate = (5, 7)
    _dock, widget = viewer.window.add_plugin_dock_widget(
        PLUGIN, "Live pixel classifier"
    )
    widget.add_scribbles_button.clicked.emit()
    scribbles = widget.scribble_picker.value
    assert scribbles.data.shape == (20, 30)
    np.testing.assert_array_equal(scribbles.scale, (2, 3))
    np.testing.assert_array_equal(scribbles.translate, (5, 7))


def test_the_demo_starts_live_training(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    widget = open_demo_viewer(viewer, train=True)
    qtbot.waitUntil(lambda: "coins prediction" in viewer.layers, timeout=30_000)
    assert widget.training
    widget.stop()
    qtbot.waitUntil(lambda: not widget._worker.is_running, timeout=2_000)


def test_the_widget_starts_the_optimizer_import_as_it_opens(
    make_napari_viewer, monkeypatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(
        "napari_dsparse._widget.import_optimizer_early", lambda: calls.append("import")
    )
    DsparseWidget(make_napari_viewer())
    assert calls == ["import"]
