"""napari sample-data contribution: an image plus starter scribbles of two classes."""

from __future__ import annotations

from napari.types import LayerDataTuple

from napari_dsparse.samples import CLASS_NAMES, coins_sample

SCRIBBLES_NAME = "scribbles"


def coins_with_scribbles() -> list[LayerDataTuple]:
    """Coins image and a Labels layer with a few strokes per class."""
    image, scribbles = coins_sample()
    return [
        (image, {"name": "coins"}, "image"),
        (
            scribbles,
            {"name": SCRIBBLES_NAME, "metadata": {"class_names": list(CLASS_NAMES)}},
            "labels",
        ),
    ]
