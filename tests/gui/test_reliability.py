"""Bad input and faults in a real viewer: notifications, never a crash or lost work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_dsparse._widget as widget_module
import napari_dsparse.faults as faults
from napari_dsparse._demo import PLUGIN, WIDGET
from napari_dsparse.live import LiveSession

pytestmark = pytest.mark.gui


def _disc_image(size: int = 64) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    disc = (rows - size // 2) ** 2 + (cols - size // 2) ** 2 < (size // 4) ** 2
    noise = np.random.default_rng(0).normal(0, 0.1, (size, size))
    return (disc + noise).astype(np.float32)


def _strokes(shape: tuple[int, ...]) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    size = shape[-1]
    labels[..., 3:5, 3 : size // 2] = 1
    labels[..., size // 2, size // 2 - 5 : size // 2 + 5] = 2
    return labels


@pytest.fixture
def shown(monkeypatch) -> list[tuple[str, str]]:
    """Every notification the widget shows, as (kind, message)."""
    messages: list[tuple[str, str]] = []
    for kind in ("info", "warning", "error"):
        monkeypatch.setattr(
            widget_module,
            f"show_{kind}",
            lambda message, _kind=kind: messages.append((_kind, message)),
        )
    return messages


def _viewer_with(make_napari_viewer, image, scribbles=None, **image_kwargs):
    viewer = make_napari_viewer()
    layer = viewer.add_image(image, name="img", **image_kwargs)
    if scribbles is None:
        scribbles = _strokes(layer.data.shape[:-1] if layer.rgb else layer.data.shape)
    labels = viewer.add_labels(scribbles, name="strokes")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.image_picker.value = layer
    widget.scribble_picker.value = labels
    return viewer, widget, labels


@pytest.mark.parametrize(
    ("image", "scribbles", "message"),
    [
        (np.full((32, 32), 3.0, np.float32), None, "nothing to tell classes apart"),
        (np.where(np.eye(32) > 0, np.nan, 1.0), None, "NaN or infinite"),
        (_disc_image(), np.zeros((60, 64), np.uint8), "'Add scribble layer' makes"),
    ],
    ids=["constant", "nan", "shape"],
)
def test_bad_images_and_scribbles_are_notified_not_trained(
    make_napari_viewer, shown, image, scribbles, message
) -> None:
    _viewer, widget, _ = _viewer_with(make_napari_viewer, image, scribbles)
    widget.train_button.clicked.emit()
    assert widget._worker is None
    assert any(kind == "warning" and message in text for kind, text in shown)


@pytest.mark.parametrize(
    ("scribbles", "message"),
    [
        (np.full((64, 64), -1, np.int32), "negative"),
        (_strokes((64, 64)) * 0, None),
        (
            np.where(_strokes((64, 64)) == 2, np.uint16(65535), _strokes((64, 64))),
            "'ignore'",
        ),
    ],
    ids=["negative", "unpainted", "class 65535"],
)
def test_unusable_scribbles_stop_or_wait_with_a_message(
    make_napari_viewer, qtbot, shown, scribbles, message
) -> None:
    _viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image(), scribbles)
    widget.train_button.clicked.emit()
    if message is None:  # nothing painted: waits, says what to do
        qtbot.waitUntil(lambda: "Waiting" in widget.status.value, timeout=10_000)
        widget.stop()
        qtbot.waitUntil(lambda: not widget._worker.is_running, timeout=5_000)
    else:
        qtbot.waitUntil(
            lambda: widget.status.value.startswith("Stopped"), timeout=10_000
        )
        assert any(kind == "error" and message in text for kind, text in shown)
        assert widget.train_button.text == "Train"


def test_class_ids_above_255_are_shown_as_themselves(make_napari_viewer, qtbot):
    strokes = _strokes((64, 64)).astype(np.uint16)
    strokes[strokes == 2] = 300  # the disc: class 300 (2-299 unpainted)
    viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image(), strokes)
    widget.train_button.clicked.emit()
    qtbot.waitUntil(lambda: "img prediction" in viewer.layers, timeout=20_000)
    prediction = viewer.layers["img prediction"]
    qtbot.waitUntil(lambda: prediction.data[32, 32] == 300, timeout=30_000)
    widget.stop()
    qtbot.waitUntil(lambda: not widget._worker.is_running, timeout=5_000)
    assert set(np.unique(prediction.data)) <= {1, 300}


def test_a_time_series_trains_per_time_point(
    make_napari_viewer, qtbot, update_once_and_wait
) -> None:
    series = np.stack([_disc_image(48), _disc_image(48)[::-1]])[:, None]  # (T, Z, ..)
    strokes = np.zeros(series.shape, np.uint8)
    strokes[1, 0] = _strokes((48, 48))
    viewer, widget, _ = _viewer_with(make_napari_viewer, series, strokes)
    viewer.dims.set_current_step(0, 1)
    update_once_and_wait(widget, timeout=60_000)
    assert widget._session.image.shape == (1, 2, 48, 48)
    prediction = viewer.layers["img prediction"].data
    assert prediction.shape == series.shape
    assert prediction[1, 0].min() >= 1  # the time point on screen is predicted


def test_the_3d_display_shows_the_whole_stack_of_the_time_point(
    make_napari_viewer, qtbot, update_once_and_wait
) -> None:
    """Rotated in 3D, a stack must not show its one current plane predicted."""
    stack = np.stack([_disc_image(48)] * 3)
    series = np.stack([stack, stack[:, ::-1]])  # (T, Z, Y, X)
    strokes = np.zeros(series.shape, np.uint8)
    strokes[1, 1] = _strokes((48, 48))
    viewer, widget, _ = _viewer_with(make_napari_viewer, series, strokes)
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(1, 1)
    viewer.dims.ndisplay = 3
    update_once_and_wait(widget, timeout=60_000)
    prediction = viewer.layers["img prediction"].data
    assert prediction[1].min() >= 1  # every plane of the time point on screen
    assert not prediction[0].any()  # not the other time point
    viewer.dims.ndisplay = 2
    prediction[:] = 0
    update_once_and_wait(widget, timeout=60_000)
    assert prediction[1, 1].min() >= 1 and not prediction[1, [0, 2]].any()


@pytest.mark.parametrize("backend", ["dask", "zarr"])
def test_dask_and_zarr_backed_layers_train_lazily(
    make_napari_viewer, qtbot, backend, update_once_and_wait
) -> None:
    da = pytest.importorskip("dask.array")
    if backend == "zarr":
        zarr = pytest.importorskip("zarr")
        lazy = zarr.create_array(
            store={}, shape=(64, 64), chunks=(32, 32), dtype="float32"
        )
        lazy[:] = _disc_image()
    else:
        lazy = da.from_array(_disc_image(), chunks=32)
    _viewer, widget, _ = _viewer_with(make_napari_viewer, lazy)
    update_once_and_wait(widget, timeout=60_000)
    assert isinstance(widget._session.image, da.Array)
    assert widget._session.trainer.steps_done > 0


def test_a_grayscale_model_refuses_an_rgb_layer(
    make_napari_viewer, qtbot, shown, tmp_path, update_once_and_wait
) -> None:
    viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image())
    update_once_and_wait(widget, timeout=60_000)
    widget.export_model(tmp_path / "gray.pt")
    rgb = viewer.add_image(np.stack([_disc_image()] * 3, -1), name="rgb", rgb=True)
    assert widget.apply_to_layer(rgb) is None
    widget.image_picker.value = rgb
    widget.load_model(tmp_path / "gray.pt")
    errors = [text for kind, text in shown if kind == "error"]
    assert len(errors) == 2 and all("expects 1 channel" in e for e in errors)


def test_export_to_an_unwritable_path_is_notified(
    make_napari_viewer, qtbot, shown, tmp_path, update_once_and_wait
) -> None:
    _viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image())
    update_once_and_wait(widget, timeout=60_000)
    widget.export_model(tmp_path / "missing" / "model.pt")
    (tmp_path / "folder.pt").mkdir()
    widget.export_model(tmp_path / "folder.pt")  # a folder in the way
    errors = [text for kind, text in shown if kind == "error"]
    assert len(errors) == 2 and all(e.startswith("Export failed") for e in errors)
    assert [p.name for p in tmp_path.iterdir()] == ["folder.pt"]


def test_divergence_pauses_with_a_warning_and_rolls_back(
    make_napari_viewer, qtbot, shown, update_once_and_wait
) -> None:
    _viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image())
    # `fast` turns NaN on its first step at this rate; `pixel` can fit the two
    # strokes with huge but finite weights for a round or more, which is no
    # divergence, so when it would pause is up to chance.
    widget.preset.value = "fast"
    update_once_and_wait(widget, timeout=60_000)
    assert widget._session.classifier.preset.name == "fast"
    good = widget._session.last_good
    widget.learning_rate.max = 1e12
    widget.learning_rate.value = 1e9
    widget.train_button.clicked.emit()
    qtbot.waitUntil(lambda: "diverged" in widget.status.value, timeout=30_000)
    assert any(k == "warning" and "Lower the learning rate" in t for k, t in shown)
    assert widget.train_button.text == "Train" and "diverged" in widget.status.value
    assert widget._session.trainer.steps_done == good.steps_done
    net = widget._session.classifier.patch_net
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_an_error_in_the_worker_is_shown_and_train_works_again(
    make_napari_viewer, qtbot, shown, monkeypatch, update_once_and_wait
) -> None:
    _viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image())
    original = LiveSession.predict
    monkeypatch.setattr(
        LiveSession, "predict", lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    widget.train_button.clicked.emit()
    qtbot.waitUntil(
        lambda: ("error", "Training stopped: boom") in shown, timeout=30_000
    )
    assert widget.train_button.text == "Train"
    monkeypatch.setattr(LiveSession, "predict", original)
    # not is_running: the thread clears it before ``finished`` reaches the widget,
    # which counts the worker as training (Update once does nothing) until then
    qtbot.waitUntil(lambda: not widget.training, timeout=5_000)
    update_once_and_wait(widget, timeout=60_000)
    assert widget.status.value.startswith("step")  # trained, not "Stopped: ..."
    assert widget._viewer.layers["img prediction"].data.min() >= 1


def test_removing_the_image_during_training_stops_cleanly(
    make_napari_viewer, qtbot, shown
) -> None:
    viewer, widget, scribbles = _viewer_with(make_napari_viewer, _disc_image())
    before = scribbles.data.copy()
    widget.train_button.clicked.emit()
    qtbot.waitUntil(lambda: "img prediction" in viewer.layers, timeout=30_000)
    worker = widget._worker
    viewer.layers.remove("img")
    qtbot.waitUntil(lambda: not worker.is_running, timeout=3_000)
    assert "removed" in widget.status.value and widget._session is None
    np.testing.assert_array_equal(scribbles.data, before)


def test_replacing_the_image_pixels_pauses_then_trains_on_them(
    make_napari_viewer, qtbot, shown, update_once_and_wait
) -> None:
    viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image())
    widget.train_button.clicked.emit()
    qtbot.waitUntil(lambda: "img prediction" in viewer.layers, timeout=30_000)
    classifier = widget._session.classifier
    viewer.layers["img"].data = 1 - _disc_image()
    qtbot.waitUntil(lambda: not widget._worker.is_running, timeout=3_000)
    assert "replaced" in widget.status.value
    update_once_and_wait(widget, timeout=60_000)
    assert widget._session.classifier is classifier  # the model was kept
    np.testing.assert_array_equal(widget._session.image[0, 0], 1 - _disc_image())
    assert ("info", "Training goes on with the new pixels and the same model.") in (
        shown
    )


def test_an_image_of_another_size_gets_output_layers_of_its_size(
    make_napari_viewer, qtbot, shown, update_once_and_wait
) -> None:
    viewer, widget, scribbles = _viewer_with(make_napari_viewer, _disc_image())
    update_once_and_wait(widget, timeout=60_000)
    viewer.layers["img"].data = _disc_image(96)
    scribbles.data = _strokes((96, 96))
    # fails on an exception in the update slot
    update_once_and_wait(widget, timeout=60_000)
    prediction = viewer.layers["img prediction"]
    assert prediction.data.shape == viewer.layers["img uncertainty"].data.shape
    assert prediction.data.shape == (96, 96) and prediction.data.min() >= 1
    assert not [text for kind, text in shown if kind == "error"]


def test_a_user_layer_named_like_an_output_is_never_written(
    make_napari_viewer, qtbot, update_once_and_wait
) -> None:
    viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image())
    theirs = viewer.add_labels(np.full((64, 64), 7, np.uint8), name="img prediction")
    update_once_and_wait(widget, timeout=60_000)
    assert (theirs.data == 7).all()
    ours = [
        layer
        for layer in viewer.layers
        if layer.name.startswith("img prediction") and layer is not theirs
    ]
    assert len(ours) == 1 and ours[0].data.min() >= 1


def test_a_session_saved_in_the_widget_restores_into_a_new_layer(
    make_napari_viewer, qtbot, shown, tmp_path, update_once_and_wait
) -> None:
    viewer, widget, scribbles = _viewer_with(make_napari_viewer, _disc_image())
    widget.class_names.value = "outside, disc"
    widget.learning_rate.value = 2e-3
    widget.prior_strength.value = 0.3
    widget.train_button.clicked.emit()
    qtbot.waitUntil(
        lambda: getattr(widget._session.last_good, "steps_done", 0) > 3, timeout=30_000
    )
    assert widget.save_session_to(tmp_path / "s.pt")  # while training
    widget.stop()
    qtbot.waitUntil(lambda: not widget._worker.is_running, timeout=5_000)
    saved_steps = torch.load(tmp_path / "s.pt", weights_only=True)["provenance"]
    before = scribbles.data.copy()
    widget.class_names.value = "a, b"
    widget.learning_rate.value = 1e-3
    widget.prior_strength.value = 1.0
    assert widget.restore_session_from(tmp_path / "s.pt")
    restored = viewer.layers["img scribbles (restored)"]
    np.testing.assert_array_equal(restored.data, before)
    np.testing.assert_array_equal(scribbles.data, before)  # the user's layer kept
    assert widget.class_names.value == "outside, disc"
    assert widget.learning_rate.value == pytest.approx(2e-3)
    assert widget.prior_strength.value == pytest.approx(0.3)
    assert widget._session.config.prior_strength == pytest.approx(0.3)
    assert widget._session.trainer.steps_done == saved_steps["steps"]
    update_once_and_wait(widget, timeout=60_000)
    assert widget._session.trainer.steps_done > saved_steps["steps"]


def test_the_class_prior_control_reaches_the_training(
    make_napari_viewer, qtbot, shown, update_once_and_wait
) -> None:
    _viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image())
    update_once_and_wait(widget, timeout=60_000)
    prior = widget._session.classifier.class_prior()
    assert prior.log_ratio.any()  # the default strength, 0.5
    widget.prior_strength.value = 0.0
    assert widget._session.trainer.config.prior_strength == 0.0
    update_once_and_wait(widget, timeout=60_000)
    assert not prior.log_ratio.any()


def test_autosave_writes_the_session_file(
    make_napari_viewer, qtbot, shown, tmp_path, update_once_and_wait
) -> None:
    _viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image())
    update_once_and_wait(widget, timeout=60_000)
    widget.autosave_minutes.value = 5
    assert widget._autosave_timer.isActive()
    assert widget._autosave_timer.interval() == 5 * 60_000
    widget.session_path = tmp_path / "auto.pt"
    widget._autosave_timer.timeout.emit()
    assert (tmp_path / "auto.pt").is_file() and "Autosaved" in widget.status.value
    widget.autosave_minutes.value = 0
    assert not widget._autosave_timer.isActive()


def test_out_of_memory_while_applying_uses_smaller_tiles(
    make_napari_viewer, qtbot, shown, monkeypatch, apply_and_wait, update_once_and_wait
) -> None:
    viewer, widget, _ = _viewer_with(make_napari_viewer, _disc_image())
    update_once_and_wait(widget, timeout=60_000)
    other = viewer.add_image(_disc_image(80), name="other")
    apply_and_wait(widget, other, timeout=30_000)
    expected = viewer.layers["other prediction"].data.copy()
    viewer.layers.remove("other prediction")
    original = faults.predict_box

    def small_tiles_only(classifier, image, box, normalization=None):
        if (box.r1 - box.r0) * (box.c1 - box.c0) > 40 * 40:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(classifier, image, box, normalization)

    monkeypatch.setattr(faults, "predict_box", small_tiles_only)
    apply_and_wait(widget, other, timeout=30_000)
    np.testing.assert_array_equal(viewer.layers["other prediction"].data, expected)
    assert (
        shown.count(("warning", "out of GPU memory: predicting in smaller tiles")) == 1
    )
