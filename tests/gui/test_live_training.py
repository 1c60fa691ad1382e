"""Live training in a real viewer: strokes in, prediction layers out, clean stops."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

import napari_dsparse._widget as widget_module
from napari_dsparse._demo import PLUGIN, WIDGET
from napari_dsparse.cli import main
from napari_dsparse.data import as_channels_first
from napari_dsparse.export import frozen_copy, load_classifier
from napari_dsparse.faults import Checkpoint
from napari_dsparse.predict import labels_and_uncertainty, predict_proba

pytestmark = pytest.mark.gui


def _disc_image(size: int = 96) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    disc = (rows - size // 2) ** 2 + (cols - size // 2) ** 2 < (size // 4) ** 2
    noise = np.random.default_rng(0).normal(0, 0.1, (size, size))
    return (disc + noise).astype(np.float32)


def _paint_line(layer, row: int, cols: range, label: int) -> None:
    for col in cols:
        layer.paint((row, col), label, refresh=False)
    layer.refresh()


@pytest.fixture
def trained_viewer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(_disc_image(), name="disc")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.add_scribbles_button.clicked.emit()
    scribbles = widget.scribble_picker.value
    scribbles.brush_size = 3
    _paint_line(scribbles, 5, range(5, 40), 1)
    _paint_line(scribbles, 48, range(40, 56), 2)
    widget.train_button.clicked.emit()
    qtbot.waitUntil(lambda: "disc prediction" in viewer.layers, timeout=20_000)
    yield viewer, widget, scribbles
    widget.stop()
    if widget._worker is not None:
        qtbot.waitUntil(lambda: not widget._worker.is_running, timeout=5_000)


def test_prediction_layers_appear_and_follow_training(trained_viewer, qtbot) -> None:
    viewer, widget, scribbles = trained_viewer
    prediction = viewer.layers["disc prediction"]
    uncertainty = viewer.layers["disc uncertainty"]
    assert prediction.data.shape == scribbles.data.shape
    assert uncertainty.data.shape == scribbles.data.shape
    qtbot.waitUntil(lambda: prediction.data[48, 48] == 2, timeout=30_000)
    qtbot.waitUntil(lambda: prediction.data[5, 20] == 1, timeout=30_000)
    assert widget.training and widget.train_button.text == "Pause"
    assert "step" in widget.status.value and " rate " in widget.status.value


def test_a_new_class_reaches_the_trainer(trained_viewer, qtbot) -> None:
    _viewer, widget, scribbles = trained_viewer
    _paint_line(scribbles, 90, range(10, 30), 3)
    expected = int((scribbles.data == 3).sum())
    qtbot.waitUntil(
        lambda: f"class 3 {expected}" in widget.status.value, timeout=20_000
    )


def test_a_far_class_id_is_counted_not_listed(trained_viewer, qtbot) -> None:
    _viewer, widget, scribbles = trained_viewer
    _paint_line(scribbles, 90, range(10, 30), 40)  # classes 3-39 stay unpainted
    expected = int((scribbles.data == 40).sum())
    qtbot.waitUntil(
        lambda: f"class 40 {expected}" in widget.status.value, timeout=20_000
    )
    assert "(37 classes without strokes)" in widget.status.value
    assert "class 3 " not in widget.status.value


def test_training_never_writes_into_the_scribbles(trained_viewer, qtbot) -> None:
    _viewer, widget, scribbles = trained_viewer
    before = scribbles.data.copy()
    steps = widget._session.trainer.steps_done
    qtbot.waitUntil(
        lambda: widget._session.trainer.steps_done > steps + 5, timeout=20_000
    )
    np.testing.assert_array_equal(scribbles.data, before)


def test_pause_stops_within_a_second(trained_viewer, qtbot) -> None:
    _viewer, widget, _ = trained_viewer
    widget.train_button.clicked.emit()  # Pause
    qtbot.waitUntil(lambda: not widget._worker.is_running, timeout=1_000)
    assert widget.train_button.text == "Train"
    steps = widget._session.trainer.steps_done
    qtbot.wait(300)
    assert widget._session.trainer.steps_done == steps


def test_removing_the_scribble_layer_stops_training(trained_viewer, qtbot) -> None:
    viewer, widget, scribbles = trained_viewer
    worker = widget._worker
    viewer.layers.remove(scribbles)
    qtbot.waitUntil(lambda: not worker.is_running, timeout=2_000)
    assert "removed" in widget.status.value


def test_closing_the_viewer_stops_the_worker(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "coins")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.train_button.clicked.emit()
    worker = widget._worker
    qtbot.waitUntil(lambda: "coins prediction" in viewer.layers, timeout=30_000)
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=3_000)


def test_update_once_trains_briefly_and_stops(
    make_napari_viewer, qtbot, update_once_and_wait
) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "coins")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    update_once_and_wait(widget)
    prediction = viewer.layers["coins prediction"].data
    assert prediction.min() >= 1 and prediction.max() <= 2  # every tile predicted
    assert widget._session.trainer.steps_done > 0


def test_export_then_apply_to_another_layer(
    trained_viewer, qtbot, tmp_path, apply_and_wait
) -> None:
    viewer, widget, scribbles = trained_viewer
    widget.export_model(tmp_path / "model.pt")
    colors = load_classifier(tmp_path / "model.pt").colors()  # the painted colours
    np.testing.assert_allclose(
        colors, scribbles.colormap.map(np.arange(1, len(colors) + 1)), atol=1e-6
    )
    other = viewer.add_image(_disc_image(64), name="other")
    apply_and_wait(widget, other, timeout=20_000)
    result = viewer.layers["other prediction"].data
    assert result.shape == (64, 64) and set(np.unique(result)) <= {1, 2, 3}


def test_a_model_exported_while_training_is_one_steps_model(
    trained_viewer, qtbot, tmp_path, monkeypatch
) -> None:
    """Exported mid-training: the weights of one checkpoint the loop took, with its
    step count, not the live weights that the worker is updating."""
    _viewer, widget, _ = trained_viewer
    taken: dict[int, Checkpoint] = {}
    take = Checkpoint.of.__func__

    def recording(cls, trainer):
        checkpoint = take(cls, trainer)
        taken[checkpoint.steps_done] = checkpoint
        return checkpoint

    monkeypatch.setattr(Checkpoint, "of", classmethod(recording))
    qtbot.waitUntil(lambda: len(taken) >= 2, timeout=20_000)
    assert widget.training
    widget.export_model(tmp_path / "model.pt")
    exported = load_classifier(tmp_path / "model.pt")
    steps = exported.provenance["steps"]
    assert steps in taken
    state = exported.patch_net.state_dict()
    for name, value in taken[steps].model_state.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)


def test_apply_while_training_predicts_every_tile_with_one_model(
    trained_viewer, qtbot, monkeypatch, apply_and_wait
) -> None:
    viewer, widget, _ = trained_viewer
    copies = []

    def recording(classifier, snapshot=None):
        copies.append(frozen_copy(classifier, snapshot))
        return copies[-1]

    monkeypatch.setattr(widget_module, "frozen_copy", recording)
    assert widget.training
    other = viewer.add_image(_disc_image(64), name="other")
    apply_and_wait(widget, other, timeout=20_000)
    assert len(copies) == 1  # the live model was not used
    assert widget.training
    image = as_channels_first(other.data)
    expected, _ = labels_and_uncertainty(predict_proba(copies[0], image))
    np.testing.assert_array_equal(viewer.layers["other prediction"].data, expected[0])


def test_reset_and_load_while_training_wait_for_the_step_under_way(
    trained_viewer, qtbot, tmp_path, monkeypatch
) -> None:
    """Both change the session the worker trains: before, the worker's step ended on
    a reset session ("Training stopped: AttributeError ...")."""
    errors = []
    monkeypatch.setattr(widget_module, "show_error", errors.append)
    _viewer, widget, _ = trained_viewer
    qtbot.waitUntil(lambda: widget._session.trainer is not None, timeout=20_000)
    widget.export_model(tmp_path / "model.pt")
    for _ in range(3):
        assert widget.training
        widget.reset_button.changed.emit(None)
        assert widget._session.trainer is None  # reset, and nothing trains it
        qtbot.waitUntil(lambda: not widget._worker.is_running, timeout=5_000)
        widget.train_button.clicked.emit()
        qtbot.waitUntil(lambda: widget._session.trainer is not None, timeout=20_000)
        widget.load_model(tmp_path / "model.pt")
        assert widget._session.trainer is None and not widget.training
        widget.train_button.clicked.emit()
        qtbot.waitUntil(lambda: widget._session.trainer is not None, timeout=20_000)
        widget.train_button.clicked.emit()  # Pause, then at once Train again:
        widget.train_button.clicked.emit()  # not swallowed by the ending worker
        assert widget.training and widget.train_button.text == "Pause"
    qtbot.wait(500)
    assert errors == [] and widget.training and widget.train_button.text == "Pause"


def test_output_layers_sit_below_the_scribbles(trained_viewer) -> None:
    viewer, _widget, scribbles = trained_viewer
    names = [layer.name for layer in viewer.layers]
    assert names.index("disc prediction") < names.index(scribbles.name)
    assert names.index("disc uncertainty") < names.index(scribbles.name)
    assert viewer.layers.selection.active is scribbles


def test_the_layer_the_user_selects_stays_selected(trained_viewer, qtbot) -> None:
    viewer, widget, scribbles = trained_viewer
    image = viewer.layers["disc"]
    viewer.layers.selection.active = image  # e.g. to change its contrast
    before = widget._session.labels_version
    _paint_line(scribbles, 60, range(10, 30), 1)  # brings a new preview
    qtbot.waitUntil(lambda: widget._session.labels_version > before, timeout=10_000)
    qtbot.wait(1500)  # several previews drawn
    assert viewer.layers.selection.active is image


@pytest.mark.parametrize(
    ("make_image", "rgb", "channels"),
    [
        (lambda d: np.stack([d, 1 - d, d * 0.5], axis=-1), True, 3),
        (lambda d: np.stack([d, 1 - d]), False, 2),
    ],
    ids=["rgb", "multichannel"],
)
def test_rgb_and_multichannel_layers_train(
    make_napari_viewer,
    qtbot,
    make_image,
    rgb,
    channels,
    apply_and_wait,
    update_once_and_wait,
    tmp_path,
) -> None:
    viewer = make_napari_viewer()
    viewer.add_image(make_image(_disc_image(64)), name="multi", rgb=rgb)
    scribbles = viewer.add_labels(np.zeros((64, 64), np.uint8), name="strokes")
    _paint_line(scribbles, 3, range(3, 30), 1)
    _paint_line(scribbles, 32, range(25, 40), 2)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.image_picker.value = viewer.layers["multi"]
    widget.scribble_picker.value = scribbles
    update_once_and_wait(widget)
    assert widget._session.image.shape == (channels, 1, 64, 64)
    assert viewer.layers["multi prediction"].data.shape == (64, 64)
    assert viewer.layers["multi prediction"].data.min() >= 1
    if not rgb:  # the model meets a (C, Z, Y, X) stack of the same channels
        stack = viewer.add_image(np.stack([make_image(_disc_image(64))] * 3, axis=1))
        apply_and_wait(widget, stack, timeout=20_000)
        result = viewer.layers[f"{stack.name} prediction"].data
        assert result.shape == (3, 64, 64) and result.min() >= 1
    # Exported, the model reads files laid out as the layer was without options.
    widget.export_model(tmp_path / "model.pt")
    layout = load_classifier(tmp_path / "model.pt").provenance.get("channel_axis")
    assert layout == (None if rgb else {"ndim": 3, "axis": 0})
    np.save(tmp_path / "multi.npy", viewer.layers["multi"].data)
    argv = ["predict", tmp_path / "model.pt", tmp_path / "multi.npy", "-q"]
    assert main([*map(str, argv), "-o", str(tmp_path / "out.tif")]) == 0
    assert tifffile.imread(tmp_path / "out.tif").shape == (64, 64)
