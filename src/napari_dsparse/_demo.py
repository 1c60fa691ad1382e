"""The GUI demo: napari with the sample image, its scribbles and the widget docked."""

from __future__ import annotations

import napari

from napari_dsparse._widget import DsparseWidget

PLUGIN = "napari-dsparse"
WIDGET = "Live pixel classifier"


def open_demo_viewer(
    viewer: napari.Viewer | None = None, train: bool = False
) -> DsparseWidget:
    """Open the sample and dock the widget in ``viewer`` (a new one by default).

    With ``train=True`` live training starts at once.
    """
    viewer = viewer or napari.Viewer(title="napari-dsparse demo")
    viewer.open_sample(PLUGIN, "coins")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    if train:
        widget.start()
    return widget


def run_gui_demo() -> None:
    """Open the demo viewer, start training, run napari until the window closes."""
    open_demo_viewer(train=True)
    napari.run()
