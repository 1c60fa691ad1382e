"""The dock widget: layer pickers, settings and buttons, wired to the core.

Only wiring lives here; computation is in the Qt-free core modules.
"""

from __future__ import annotations

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton

from napari_dsparse.samples import CLASS_NAMES


def _scribble_layer_like(image: napari.layers.Image) -> napari.layers.Labels:
    """An empty Labels layer covering ``image`` (same shape, scale and translate)."""
    shape = image.data.shape[:-1] if image.rgb else image.data.shape
    return napari.layers.Labels(
        np.zeros(shape, dtype=np.uint8),
        name=f"{image.name} scribbles",
        scale=image.scale[: len(shape)],
        translate=image.translate[: len(shape)],
        metadata={"class_names": list(CLASS_NAMES)},
    )


class DsparseWidget(Container):
    """Pick an image and a scribble layer, name the classes, train live."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self.image_picker = ComboBox(label="image", choices=self._image_layers)
        self.scribble_picker = ComboBox(label="scribbles", choices=self._label_layers)
        self.add_scribbles_button = PushButton(text="Add scribble layer")
        self.class_names = LineEdit(label="classes", value=", ".join(CLASS_NAMES))
        self.status = Label(value="Paint a few strokes per class.")
        super().__init__(
            widgets=[
                self.image_picker,
                self.scribble_picker,
                self.add_scribbles_button,
                self.class_names,
                self.status,
            ]
        )
        self.add_scribbles_button.changed.connect(self._add_scribble_layer)
        self._select_defaults()

    def _image_layers(self, _widget: ComboBox) -> list[tuple[str, napari.layers.Image]]:
        return [(lyr.name, lyr) for lyr in self._viewer.layers if _is_image(lyr)]

    def _label_layers(
        self, _widget: ComboBox
    ) -> list[tuple[str, napari.layers.Labels]]:
        return [(lyr.name, lyr) for lyr in self._viewer.layers if _is_labels(lyr)]

    def _select_defaults(self) -> None:
        self.reset_choices()
        if self.scribble_picker.choices:
            self.scribble_picker.value = self.scribble_picker.choices[0]

    def _add_scribble_layer(self) -> None:
        image = self.image_picker.value
        if image is None:
            napari.utils.notifications.show_warning("Open or pick an image first.")
            return
        layer = self._viewer.add_layer(_scribble_layer_like(image))
        self.reset_choices()
        self.scribble_picker.value = layer


def _is_image(layer: napari.layers.Layer) -> bool:
    return isinstance(layer, napari.layers.Image)


def _is_labels(layer: napari.layers.Layer) -> bool:
    return isinstance(layer, napari.layers.Labels)
