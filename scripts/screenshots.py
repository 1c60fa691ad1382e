"""Screenshots of live training for the docs (run under Xvfb).

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python scripts/screenshots.py

Writes docs/images/live-2d.png, live-rgb.png, live-3d.png and training-set.png: the
viewer with the widget docked after a few seconds of live training on each kind of
image, and on a training set of two images. Optional arguments: the seconds, then
the names of the shots to take (``2d``, ``rgb``, ``3d``, ``training-set``;
default: all), e.g. ``20 training-set``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication
from skimage import data, filters

from napari_dsparse._demo import PLUGIN, WIDGET, open_demo_viewer
from napari_dsparse.samples import coins_sample
from napari_dsparse.scribbles import initial_strokes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from tasks import ihc  # noqa: E402

OUT = ROOT / "docs" / "images"


def train_and_grab(viewer: napari.Viewer, widget, name: str, seconds: float) -> None:
    QApplication.processEvents()
    viewer.reset_view()
    widget.start()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)
    widget.stop()
    for _ in range(50):
        QApplication.processEvents()
        time.sleep(0.01)
    viewer.window._qt_window.grab().save(str(OUT / name))
    print("wrote", OUT / name)
    viewer.close()


def new_viewer() -> napari.Viewer:
    viewer = napari.Viewer(title="napari-dsparse")
    viewer.window._qt_window.resize(1400, 850)
    return viewer


def shot_2d(seconds: float) -> None:
    viewer = new_viewer()
    widget = open_demo_viewer(viewer)
    train_and_grab(viewer, widget, "live-2d.png", seconds)


def shot_rgb(seconds: float) -> None:
    task = ihc()
    viewer = new_viewer()
    viewer.add_image(task.image, name="ihc", rgb=True)
    labels = initial_strokes(task.truth, np.random.default_rng(0))
    viewer.add_labels(labels, name="ihc scribbles")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.class_names.value = ", ".join(task.class_names)
    train_and_grab(viewer, widget, "live-rgb.png", seconds)


def shot_3d(seconds: float) -> None:
    rng = np.random.default_rng(0)
    blobs = data.binary_blobs(192, blob_size_fraction=0.15, n_dim=3, rng=2)[:24]
    volume = filters.gaussian(blobs.astype(float), 1) + rng.normal(0, 0.25, blobs.shape)
    viewer = new_viewer()
    viewer.add_image(volume.astype(np.float32), name="volume")
    labels = np.zeros(blobs.shape, np.uint8)
    labels[12] = initial_strokes(blobs[12].astype(np.uint8) + 1, rng)
    viewer.add_labels(labels, name="volume scribbles")
    viewer.dims.set_current_step(0, 12)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.class_names.value = "outside, blob"
    train_and_grab(viewer, widget, "live-3d.png", seconds)


def shot_training_set(seconds: float) -> None:
    """Two parts of the coins image, of different sizes, in one training set."""
    image, labels = coins_sample()
    viewer = new_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    parts = {"coins top": slice(0, 170), "coins bottom": slice(150, None)}
    for name, rows in parts.items():
        layer = viewer.add_image(image[rows], name=name)
        scribbles = viewer.add_labels(labels[rows], name=f"{name} scribbles")
        widget.reset_choices()
        widget.add_pair(layer, scribbles)
    viewer.layers["coins top"].visible = False
    viewer.layers["coins top scribbles"].visible = False
    widget.image_picker.value = viewer.layers["coins bottom"]
    widget.scribble_picker.value = viewer.layers["coins bottom scribbles"]
    train_and_grab(viewer, widget, "training-set.png", seconds)


SHOTS = {
    "2d": shot_2d,
    "rgb": shot_rgb,
    "3d": shot_3d,
    "training-set": shot_training_set,
}

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    names = sys.argv[2:] or list(SHOTS)  # e.g. `screenshots.py 20 training-set`
    unknown = [name for name in names if name not in SHOTS]
    if unknown:
        sys.exit(f"unknown shot {', '.join(unknown)}: choose from {', '.join(SHOTS)}")
    for name in names:
        SHOTS[name](seconds)
