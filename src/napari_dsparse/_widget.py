"""The dock widget: layer pickers, settings and buttons, wired to the core.

Only wiring lives here. Training and prediction run in napari ``thread_worker``s over
the Qt-free generators of :mod:`napari_dsparse.live`; this module copies layer data
into snapshots, and writes the yielded tiles into the output layers on the GUI thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Generator, Iterator
from functools import partial
from pathlib import Path

import napari
import numpy as np
import torch
from magicgui.widgets import (
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from napari.layers import Layer
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog

from napari_dsparse.data import (
    MAX_CLASSES,
    InputError,
    as_planes,
    class_counts,
    painted_slices,
)
from napari_dsparse.export import frozen_copy, load_classifier, save_classifier
from napari_dsparse.faults import Checkpoint, predict_fitting
from napari_dsparse.live import (
    LiveSession,
    Mailbox,
    Notice,
    PredictionUpdate,
    TrainingPaused,
    Waiting,
    cpu_threads_for_live_training,
    iter_live,
)
from napari_dsparse.model import Classifier, pick_device
from napari_dsparse.nets import DEFAULT_PRESET, PRESETS
from napari_dsparse.predict import (
    DEFAULT_TILE,
    Box,
    class_dtype,
    iter_tiles,
    labels_and_uncertainty,
)
from napari_dsparse.samples import CLASS_NAMES
from napari_dsparse.session import (
    SESSION_SUFFIX,
    SavedSession,
    load_session,
    missing_pairs,
    restore_session,
    save_session,
)
from napari_dsparse.train import TrainConfig, TrainStatus, import_optimizer_early

UPDATE_ONCE_SECONDS = 2.0
MAX_CHANNELS = 16  # a 3D layer with at most this many planes may be channels
REFRESH_MS = 100  # the most often the output layers are redrawn
REFRESH_MS_3D = 1000  # the same in 3D, where a redraw uploads the whole volume
PREDICTION_SUFFIX = " prediction"
OUTPUT_MARK = "napari-dsparse output"  # metadata of the layers the widget writes
EMPTY_SET_TEXT = "training set: the image above only"
UNCERTAINTY_SUFFIX = " uncertainty"
AUTOSAVE_PATH = Path.home() / ".napari-dsparse" / f"autosave{SESSION_SUFFIX}"
_ZEROS_LISTED = 3  # classes without strokes named in the status; more are counted


def _check_pair(
    image: napari.layers.Image | None, scribbles: napari.layers.Labels | None
) -> bool:
    """``InputError`` unless the scribbles fit the image; returns ``multichannel``."""
    if image is None or scribbles is None:
        raise InputError("pick an image and a scribble layer first")
    multichannel = _is_multichannel(image, scribbles)
    spatial = _spatial_shape(image, multichannel)
    if tuple(scribbles.data.shape) != spatial:
        raise InputError(
            f"the scribble layer's shape {scribbles.data.shape} differs from the "
            f"image's {spatial}; 'Add scribble layer' makes one that fits"
        )
    return multichannel


def _is_multichannel(image: napari.layers.Image, scribbles) -> bool:
    """A layer whose first axis holds channels: the scribbles cover the other axes."""
    return scribbles is not None and _channels_first_for(image, scribbles.data.shape)


def _channels_first_for(image: napari.layers.Image, scribble_shape) -> bool:
    return (
        not image.rgb
        and image.ndim >= 3
        and tuple(scribble_shape) == tuple(image.data.shape[1:])
        and image.data.shape[0] <= MAX_CHANNELS
    )


def _spatial_shape(
    image: napari.layers.Image, multichannel: bool = False
) -> tuple[int, ...]:
    shape = tuple(image.data.shape)
    return shape[:-1] if image.rgb else shape[1:] if multichannel else shape


def _layer_geometry(image: napari.layers.Image, ndim: int) -> dict:
    """Scale and translate of the last ``ndim`` axes, for layers over ``image``."""
    return {"scale": image.scale[-ndim:], "translate": image.translate[-ndim:]}


def _largest(scribbles: napari.layers.Labels) -> int:
    """The largest class id the scribble layer's type can hold (at most 1000)."""
    dtype = np.dtype(scribbles.data.dtype)
    if not np.issubdtype(dtype, np.integer):
        return MAX_CLASSES
    return min(int(np.iinfo(dtype).max), MAX_CLASSES)


def _scribble_layer_like(image: napari.layers.Image) -> napari.layers.Labels:
    """An empty Labels layer covering ``image`` (same shape, scale and translate)."""
    shape = _spatial_shape(image)
    return napari.layers.Labels(
        np.zeros(shape, dtype=np.uint8),
        name=f"{image.name} scribbles",
        metadata={"class_names": list(CLASS_NAMES)},
        **_layer_geometry(image, len(shape)),
    )


def image_array(image: napari.layers.Image, multichannel: bool = False) -> np.ndarray:
    """The layer's pixels as ``(C, Z, Y, X)``: RGB and multichannel as channels,
    every plane of 3D stacks and 4D/5D time series as a slice of its own."""
    data = _pixels(image)
    if image.rgb:
        return as_planes(np.moveaxis(data[..., :3], -1, 0))
    return as_planes(data if multichannel else data[None])


def _pixels(image: napari.layers.Image):
    """NumPy pixels as they are; dask, zarr and other arrays stay lazy (dask)."""
    data = image.data[0] if image.multiscale else image.data
    if isinstance(data, np.ndarray):
        return data
    import dask.array as da  # a napari dependency

    return data if isinstance(data, da.Array) else da.from_array(data)


def _plane_index(shape: tuple[int, ...], z: int) -> tuple[int, ...]:
    """Index of slice ``z`` of :func:`image_array` in a layer of ``shape``."""
    if len(shape) <= 2:
        return ()
    return tuple(int(i) for i in np.unravel_index(z, shape[:-2]))


def _device_choices() -> list[str]:
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices.append("cuda")
    if torch.backends.mps.is_available():
        choices.append("mps")
    return choices


class DsparseWidget(Container):
    """Pick an image and a scribble layer, name the classes, train live."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._alive = True  # False once Qt has deleted the widget
        self._session: LiveSession | None = None
        self._session_image: napari.layers.Image | None = None  # the session's layer
        self._multichannel = False  # whether its first axis holds channels
        self._mailbox = Mailbox()
        self._worker: GeneratorWorker | None = None
        self._worker_started = False
        # The worker advances its generator holding this lock, and never again once
        # the event is set: see _halted.
        self._step_lock = threading.Lock()
        self._halt = threading.Event()
        self._watched: napari.layers.Labels | None = None
        # the training set: image name -> (image layer, scribble layer, its array)
        self._pairs: dict[str, tuple[napari.layers.Image, napari.layers.Labels]] = {}
        self._pair_arrays: dict[str, np.ndarray] = {}
        self._watched_image: napari.layers.Image | None = None
        self._image_replaced = False  # the session image's data changed since
        self.session_path: Path | None = None  # where Save session wrote last
        self._autosave_timer = QTimer()
        self._autosave_timer.timeout.connect(self.autosave)
        # napari emits ``paint`` before writing the last change: snapshot a moment
        # later, once per burst of events.
        self._snapshot_timer = _single_shot(0, self._post_labels)
        # Redrawing a large layer costs tens of ms: redraw at most every 100 ms.
        self._refresh_timer = _single_shot(REFRESH_MS, self._refresh_outputs)
        self._build_controls()
        super().__init__(widgets=self._controls())
        self._connect()
        self._select_defaults()
        import_optimizer_early()  # so that the first Train does not wait for it

    # -- construction ---------------------------------------------------------

    def _build_controls(self) -> None:
        self.image_picker = ComboBox(label="image", choices=self._image_layers)
        self.scribble_picker = ComboBox(label="scribbles", choices=self._label_layers)
        self.add_scribbles_button = PushButton(text="Add scribble layer")
        self.class_names = LineEdit(label="classes", value=", ".join(CLASS_NAMES))
        self.preset = ComboBox(label="network", choices=list(PRESETS))
        self.preset.value = DEFAULT_PRESET
        self.device = ComboBox(label="device", choices=_device_choices())
        self.learning_rate = FloatSpinBox(
            label="learning rate", value=1e-3, min=1e-5, max=0.1, step=1e-4
        )
        self.prior_strength = FloatSpinBox(
            label="class prior",
            value=TrainConfig.prior_strength,
            min=0.0,
            max=1.0,
            step=0.1,
            tooltip="How far predictions move from the painted classes' shares to "
            "the shares estimated in the image: 0 not at all, 1 fully. Takes effect "
            "at the end of the next training round.",
        )
        self.train_button = PushButton(text="Train")
        self.update_button = PushButton(text="Update once")
        self.reset_button = PushButton(text="Reset model")
        self.predict_all_button = PushButton(text="Predict all slices")
        self.export_button = PushButton(text="Export model…")
        self.load_button = PushButton(text="Load model…")
        self.apply_picker = ComboBox(label="apply to", choices=self._image_layers)
        self.apply_button = PushButton(text="Apply to layer…")
        self.save_session_button = PushButton(text="Save session…")
        self.restore_session_button = PushButton(text="Restore session…")
        self.autosave_minutes = SpinBox(
            label="autosave (min)", value=0, min=0, max=120, tooltip="0: off"
        )
        self.status = Label(value="Paint a few strokes per class, then Train.")
        self.add_pair_button = PushButton(text="Add image + scribbles to training set")
        self.pair_list = Container(labels=False)
        self.pair_list.margins = (0, 0, 0, 0)
        self.pair_header = Label(value=EMPTY_SET_TEXT)

    def _controls(self) -> list:
        return [
            self.image_picker,
            self.scribble_picker,
            self.add_scribbles_button,
            self.class_names,
            self.add_pair_button,
            self.pair_header,
            self.pair_list,
            self.preset,
            self.device,
            self.learning_rate,
            self.prior_strength,
            Container(
                widgets=[self.train_button, self.update_button, self.reset_button],
                layout="horizontal",
                labels=False,
            ),
            self.predict_all_button,
            Container(
                widgets=[self.export_button, self.load_button],
                layout="horizontal",
                labels=False,
            ),
            self.apply_picker,
            self.apply_button,
            Container(
                widgets=[self.save_session_button, self.restore_session_button],
                layout="horizontal",
                labels=False,
            ),
            self.autosave_minutes,
            self.status,
        ]

    def _connect(self) -> None:
        self.add_scribbles_button.changed.connect(self._add_scribble_layer)
        self.add_pair_button.changed.connect(self._add_current_pair)
        self.train_button.changed.connect(self._toggle_training)
        self.update_button.changed.connect(self._update_once)
        self.reset_button.changed.connect(self._reset_model)
        self.predict_all_button.changed.connect(self._predict_all_slices)
        self.export_button.changed.connect(self._ask_export)
        self.load_button.changed.connect(self._ask_load)
        self.apply_button.changed.connect(self._apply_to_picked_layer)
        self.image_picker.changed.connect(self._on_image_changed)
        self.scribble_picker.changed.connect(self._on_image_changed)
        self.class_names.changed.connect(self._on_class_names_changed)
        self.preset.changed.connect(self._on_network_changed)
        self.device.changed.connect(self._on_network_changed)
        self.prior_strength.changed.connect(self._on_prior_strength_changed)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        getattr(self._viewer, "scene", self._viewer).camera.events.connect(
            self._post_view
        )
        self._viewer.dims.events.current_step.connect(self._post_view)
        self._viewer.dims.events.ndisplay.connect(self._post_view)
        self.native.destroyed.connect(self._on_destroyed)
        self.save_session_button.changed.connect(self._ask_save_session)
        self.restore_session_button.changed.connect(self._ask_restore_session)
        self.autosave_minutes.changed.connect(self._on_autosave_changed)

    def _image_layers(self, _widget: ComboBox) -> list[tuple[str, napari.layers.Image]]:
        return [
            (lyr.name, lyr)
            for lyr in self._viewer.layers
            if isinstance(lyr, napari.layers.Image)
            and not lyr.name.endswith(UNCERTAINTY_SUFFIX)
        ]

    def _label_layers(
        self, _widget: ComboBox
    ) -> list[tuple[str, napari.layers.Labels]]:
        return [
            (lyr.name, lyr)
            for lyr in self._viewer.layers
            if isinstance(lyr, napari.layers.Labels)
            and not lyr.name.endswith(PREDICTION_SUFFIX)
        ]

    def _select_defaults(self) -> None:
        self.reset_choices()
        if self.scribble_picker.choices:
            self.scribble_picker.value = self.scribble_picker.choices[0]
        names = getattr(self.scribble_picker.value, "metadata", {}).get("class_names")
        if names:
            self.class_names.value = ", ".join(names)

    def _add_scribble_layer(self) -> None:
        image = self.image_picker.value
        if image is None:
            show_warning("Open or pick an image first.")
            return
        layer = self._viewer.add_layer(_scribble_layer_like(image))
        self.reset_choices()
        self.scribble_picker.value = layer

    # -- state ------------------------------------------------------------------

    @property
    def training(self) -> bool:
        """A worker was started (its thread may not run yet) and not asked to stop."""
        return self._worker_running and not self._worker.abort_requested

    @property
    def _worker_running(self) -> bool:
        """A worker was started and has not finished (it may be ending its last
        step): the weights may change."""
        return self._worker is not None and (
            self._worker.is_running or self._worker_started
        )

    def names(self) -> tuple[str, ...]:
        names = tuple(n.strip() for n in self.class_names.value.split(",") if n.strip())
        return names if len(names) >= 2 else CLASS_NAMES

    def _ensure_session(self) -> LiveSession:
        image = self.image_picker.value
        scribbles = self.scribble_picker.value
        multichannel = _check_pair(image, scribbles)
        if self._image_replaced and self._session_image is image and self._session:
            self._take_new_pixels(image, multichannel)
        if (
            self._session is not None
            and self._session_image is not image
            and self._pairs
            and image_array(image, multichannel).shape[0]
            == self._session.image.shape[0]
        ):  # another image in view: same model, same training set
            self._multichannel = multichannel
            self._session = self._session.for_image(
                image.name, image_array(image, multichannel)
            )
            self._session_image = image
        if self._session is None or self._session_image is not image:
            self._multichannel = multichannel
            self._session = LiveSession(
                image_array(image, multichannel),
                self.names(),
                preset=self.preset.value,
                config=TrainConfig(
                    learning_rate=self.learning_rate.value,
                    prior_strength=self.prior_strength.value,
                ),
                device=self.device.value,
                name=image.name,
            )
            self._session_image = image
        return self._session

    # -- training ---------------------------------------------------------------

    def _toggle_training(self) -> None:
        if self.training:
            self.stop("Paused.")
        else:
            self.start()

    def _update_once(self) -> None:
        if not self.training:
            self.start(rounds=1, round_seconds=UPDATE_ONCE_SECONDS)

    def start(self, rounds: int | None = None, round_seconds: float = 0.4) -> None:
        """Start the training worker (forever, or for ``rounds`` rounds)."""
        try:
            with self._step_lock:  # a stopped worker may still end a step on it
                session = self._ensure_session()
        except InputError as error:
            show_warning(str(error))
            return
        session.set_learning_rate(self.learning_rate.value)
        if pick_device(session.device).type == "cpu":
            torch.set_num_threads(cpu_threads_for_live_training())
        self._watch(self.scribble_picker.value)
        self._post_pairs()
        self._watch_image(self._session_image)
        self._post_labels()
        self._post_view()
        self._halt = threading.Event()
        steps = iter_live(
            session, self._mailbox, round_seconds=round_seconds, rounds=rounds
        )
        self._worker = create_worker(
            _reraising,
            _one_step_at_a_time(steps, self._step_lock, self._halt),
            _start_thread=False,
            _connect={"errored": self._on_error},  # shown once, not re-raised
        )
        self._worker.yielded.connect(partial(self._on_event, session))
        self._worker.finished.connect(partial(self._on_finished, self._worker))
        self._worker_started = True  # until it has finished
        self.train_button.text = "Pause" if rounds is None else "Train"
        self._worker.start()

    def stop(self, message: str | None = None) -> None:
        """Ask the worker to stop after its current step or tile."""
        self._halt.set()
        _quit_worker(self._worker)
        self.train_button.text = "Train"
        if message:
            self.status.value = message

    @contextlib.contextmanager
    def _halted(self) -> Iterator[None]:
        """Stop training and keep it stopped while the block changes the session:
        the worker ends the step or tile under way, then never resumes."""
        self.stop()
        with self._step_lock:
            yield

    @contextlib.contextmanager
    def _between_steps(self) -> Iterator[Checkpoint | None]:
        """Hold the worker between two steps (no class added meanwhile); yields the
        last round's checkpoint while a worker trains, whose live weights change,
        else ``None`` (the live weights are the model)."""
        with self._step_lock:
            session = self._session
            yield session.last_good if session and self._worker_running else None

    def _on_destroyed(self, *_args) -> None:
        self._alive = False
        self._autosave_timer.stop()
        _quit_worker(self._worker)

    def _on_finished(self, worker: GeneratorWorker) -> None:
        if worker is not self._worker:  # one that a newer worker replaced
            return
        self._worker_started = False
        if self._alive:
            self.train_button.text = "Train"

    def _on_error(self, error: Exception) -> None:
        if not self._alive:
            return
        self.train_button.text = "Train"
        message = (
            str(error)
            if isinstance(error, InputError | WorkerError | MemoryError)
            else repr(error)
        )
        show_error(f"Training stopped: {message}")
        self.status.value = f"Stopped: {message}"

    def _on_event(
        self,
        session: LiveSession,
        event: TrainStatus | PredictionUpdate | Waiting | Notice | TrainingPaused,
    ) -> None:
        if session is not self._session or not self._alive:
            return  # queued from a session that was stopped and dropped since
        stopping = self._worker is not None and self._worker.abort_requested
        if isinstance(event, TrainStatus | Waiting) and stopping:
            return  # queued before a pause: keep the pause's message
        if isinstance(event, TrainStatus):
            self.status.value = _status_text(session, event)
        elif isinstance(event, PredictionUpdate):
            self._show_update(event)
        elif isinstance(event, Notice):
            show_warning(event.message)
        elif isinstance(event, TrainingPaused):
            self.train_button.text = "Train"
            self.status.value = f"Paused at step {event.step}: diverged."
            show_warning(event.message[0].upper() + event.message[1:] + ".")
        else:
            self.status.value = f"Waiting: {event.reason}."

    # -- scribbles and view -----------------------------------------------------

    def _watch(self, scribbles: napari.layers.Labels) -> None:
        if self._watched is scribbles:
            return
        self._unwatch()
        scribbles.events.paint.connect(self._snapshot_soon)
        scribbles.events.data.connect(self._snapshot_soon)
        self._watched = scribbles

    def _unwatch(self) -> None:
        if self._watched is not None:
            self._watched.events.paint.disconnect(self._snapshot_soon)
            self._watched.events.data.disconnect(self._snapshot_soon)
            self._watched = None

    def _snapshot_soon(self, *_event) -> None:
        self._snapshot_timer.start()

    def _post_labels(self, *_event) -> None:
        if self._watched is not None:
            labels = self._watched.data  # time series: one slice per plane
            self._mailbox.post_labels(
                labels if labels.ndim <= 3 else labels.reshape(-1, *labels.shape[-2:])
            )
            for name, (_image, scribbles) in self._pairs.items():
                if scribbles is self._watched:
                    self._show_pair_counts(name)

    # -- training set -------------------------------------------------------------

    def _add_current_pair(self) -> None:
        image, scribbles = self.image_picker.value, self.scribble_picker.value
        try:
            self.add_pair(image, scribbles)
        except InputError as error:
            show_error(str(error))

    def add_pair(
        self, image: napari.layers.Image, scribbles: napari.layers.Labels
    ) -> None:
        """Train on ``image`` and its ``scribbles`` too (``InputError`` if unfit).

        Every slice or time point of a stack with strokes counts as one pair of the
        set; the image is not copied.
        """
        multichannel = _check_pair(image, scribbles)
        array = image_array(image, multichannel)
        others = {a.shape[0] for n, a in self._pair_arrays.items() if n != image.name}
        if self._session is not None and self._session.classifier is not None:
            others.add(self._session.classifier.in_channels)
        if others and array.shape[0] not in others:
            raise InputError(
                f"{image.name!r} has {array.shape[0]} channel(s) but the training "
                f"set's images have {others.pop()}: channels must agree"
            )
        self._pairs[image.name] = (image, scribbles)
        self._pair_arrays[image.name] = array
        self._mailbox.post_pair(image.name, array, scribbles.data)
        self._show_pairs()

    def remove_pair(self, name: str) -> None:
        """Stop training on the pair of the image ``name``."""
        self._pairs.pop(name, None)
        self._pair_arrays.pop(name, None)
        self._mailbox.post_pair_removal(name)
        self._show_pairs()

    def _post_pairs(self) -> None:
        for name, (_image, scribbles) in self._pairs.items():
            self._mailbox.post_pair(name, self._pair_arrays[name], scribbles.data)

    def pair_rows(self) -> list[str]:
        """The text of each row of the training set list, in order."""
        return [row[0].value for row in self.pair_list]

    def _show_pairs(self) -> None:
        self.pair_list.clear()
        for name in self._pairs:
            remove = PushButton(text="Remove")
            remove.changed.connect(partial(self._on_remove_clicked, name))
            row = Container(
                widgets=[Label(value=self._pair_text(name)), remove],
                layout="horizontal",
                labels=False,
            )
            row.name = name
            row.margins = (0, 0, 0, 0)
            self.pair_list.append(row)
        self.pair_header.value = (
            f"training set: {len(self._pairs)} image(s)"
            if self._pairs
            else EMPTY_SET_TEXT
        )

    def _on_remove_clicked(self, name: str, *_args) -> None:
        self.remove_pair(name)

    def _show_pair_counts(self, name: str) -> None:
        for row in self.pair_list:
            if row.name == name:
                row[0].value = self._pair_text(name)

    def _pair_text(self, name: str) -> str:
        """``name: class a 120, class b 45`` (and the painted slices of a stack)."""
        _image, scribbles = self._pairs[name]
        labels = np.asarray(scribbles.data)
        num_classes = max(len(self.names()), int(labels.max(initial=0)))
        counts = class_counts(labels, num_classes)  # reads painted slices only
        names = list(self.names()) + [
            f"class {k}" for k in range(len(self.names()) + 1, len(counts) + 1)
        ]
        text = f"{name}: " + ", ".join(
            f"{label} {count}" for label, count in zip(names, counts, strict=False)
        )
        if labels.ndim == 3:
            painted = len(painted_slices(labels))
            text += f" ({painted} of {labels.shape[0]} slices)"
        return text

    def _post_view(self, *_event) -> None:
        image = self.image_picker.value
        if image is None:
            return
        corners = np.asarray(image.corner_pixels)  # (2, ndim): no RGB axis
        (r0, c0), (r1, c1) = corners[0, -2:], corners[1, -2:]
        view = Box(0, int(r0), int(r1) + 1, int(c0), int(c1) + 1) if r1 > r0 else None
        spatial = _spatial_shape(image, self._multichannel)
        z, volume = 0, None
        if len(spatial) > 2:
            point = np.rint(image.world_to_data(self._viewer.dims.point))
            leading = point[-len(spatial) : -2].astype(int)
            leading = np.clip(leading, 0, np.asarray(spatial[:-2]) - 1)
            z = int(np.ravel_multi_index(tuple(leading), spatial[:-2]))
            if self._viewer.dims.ndisplay == 3:  # the stack of this time point
                first = z - z % spatial[-3]
                volume = range(first, first + spatial[-3])
        self._mailbox.post_view(view, z, volume)

    # -- output layers ----------------------------------------------------------

    def _output_layers(self) -> tuple[napari.layers.Labels, napari.layers.Image]:
        """The prediction and uncertainty layers, created below the scribbles once.

        Only layers this widget made are written (a user's layer that happens to
        bear the name is left alone); their data follow the image's size.
        """
        image = self._session_image
        shape = _spatial_shape(image, self._multichannel)
        geometry = _layer_geometry(image, len(shape))
        scribbles = self._watched
        if scribbles is not None:
            largest = _largest(scribbles)
        else:  # the classes of the model there is
            classifier = self._session.classifier if self._session else None
            largest = classifier.num_classes if classifier else MAX_CLASSES
        name = f"{image.name}{PREDICTION_SUFFIX}"
        uname = f"{image.name}{UNCERTAINTY_SUFFIX}"
        prediction = self._own_output(name, shape, class_dtype(largest))
        uncertainty = self._own_output(uname, shape, np.float32)
        if prediction is not None and uncertainty is not None:
            return prediction, uncertainty
        if prediction is None:
            prediction = self._viewer.add_labels(
                np.zeros(shape, class_dtype(largest)),
                name=name,
                opacity=0.5,
                metadata={OUTPUT_MARK: True},
                **geometry,
            )
            if scribbles is not None:
                prediction.colormap = scribbles.colormap
        if uncertainty is None:
            uncertainty = self._viewer.add_image(
                np.zeros(shape, np.float32),
                name=uname,
                colormap="magma",
                contrast_limits=(0, 1),
                visible=False,
                metadata={OUTPUT_MARK: True},
                **geometry,
            )
        if scribbles is not None and scribbles in self._viewer.layers:
            self._keep_painting_on(scribbles, (uncertainty, prediction))
        return prediction, uncertainty

    def _own_output(self, name: str, shape: tuple[int, ...], dtype) -> Layer | None:
        """The output layer ``name`` this widget made, if still in the viewer; its
        data become zeros of ``shape`` and ``dtype`` if it has another shape or a
        type that cannot hold ``dtype``'s values."""
        layer = self._marked_output(name)
        if layer is None:
            return None
        if layer.data.shape != shape or not np.can_cast(dtype, layer.data.dtype):
            layer.data = np.zeros(shape, dtype)  # the image got another size
        return layer

    def _marked_output(self, name: str) -> Layer | None:
        """The viewer's layer ``name`` if this widget made it (``OUTPUT_MARK``)."""
        return next(
            (
                layer
                for layer in self._viewer.layers
                if layer.name == name and layer.metadata.get(OUTPUT_MARK)
            ),
            None,
        )

    def _keep_painting_on(self, scribbles: napari.layers.Labels, outputs) -> None:
        """Put output layers under the scribbles and keep the scribbles selected."""
        layers = self._viewer.layers
        for layer in outputs:
            layers.move(layers.index(layer), layers.index(scribbles))
        layers.selection.active = scribbles

    def _show_update(self, update: PredictionUpdate) -> None:
        prediction, uncertainty = self._output_layers()
        box = update.box
        index = (slice(box.r0, box.r1), slice(box.c0, box.c1))
        index = (*_plane_index(prediction.data.shape, box.z), *index)
        prediction.data[index] = update.classes
        uncertainty.data[index] = update.uncertainty
        if not self._refresh_timer.isActive():
            volume = self._viewer.dims.ndisplay == 3
            self._refresh_timer.start(REFRESH_MS_3D if volume else REFRESH_MS)

    def _refresh_outputs(self) -> None:
        if not self._alive or self._session_image is None:
            return
        image = self._session_image.name
        for suffix in (PREDICTION_SUFFIX, UNCERTAINTY_SUFFIX):
            layer = self._marked_output(f"{image}{suffix}")
            if layer is not None:
                layer.refresh()

    # -- layer and setting changes ----------------------------------------------

    def _on_image_changed(self, *_args) -> None:
        if self.training:
            self.stop("Paused: the image or scribble layer changed.")
            show_info("The image or scribble layer changed: press Train to continue.")
        if self.image_picker.value is not self._session_image and not (
            self._pairs and self._session is not None
        ):  # with a training set the model stays (see _ensure_session)
            self._drop_session()

    def _on_network_changed(self, *_args) -> None:
        if self._session is not None and self._session.classifier is not None:
            self.stop()
            show_info("Network or device changed: the next training starts afresh.")
        self._drop_session()

    def _on_prior_strength_changed(self, strength: float) -> None:
        if self._session is not None:
            self._session.set_prior_strength(strength)

    def _drop_session(self) -> None:
        self._session, self._session_image = None, None

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        for name, pair in list(self._pairs.items()):
            if layer in pair:
                self.remove_pair(name)
        if layer is self._session_image or layer is self._watched:
            self.stop(f"Stopped: layer {layer.name!r} was removed.")
            show_info(f"Training stopped: layer {layer.name!r} was removed.")
            self._unwatch()
            self._drop_session()
        self.reset_choices()

    def _on_class_names_changed(self, *_args) -> None:
        if self._session is not None and len(self.names()) >= len(
            self._session.class_names
        ):
            self._session.class_names = self.names()

    def _reset_model(self) -> None:
        with self._halted():
            if self._session is not None:
                self._session.reset()
        self.status.value = "Model reset: the next training starts from scratch."

    # -- files and other images ---------------------------------------------------

    def _ask_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self.native, "Export model", "model.dsparse.pt", "Model (*.pt)"
        )
        if path:
            self.export_model(path)

    def export_model(self, path: str | Path) -> None:
        """Write the current model to ``path``."""
        if self._session is None or self._session.classifier is None:
            show_warning("Train a model before exporting it.")
            return
        self._session.classifier.class_names = self._session.class_names
        self._record_channel_axis(self._session.classifier)
        if self._watched is not None:  # the colours the user painted with
            count = len(self._session.class_names)
            colors = self._watched.colormap.map(np.arange(1, count + 1))
            self._session.classifier.class_colors = tuple(map(tuple, colors.tolist()))
        try:
            with self._between_steps() as checkpoint:
                save_classifier(self._session.classifier, path, checkpoint)
        except (InputError, OSError) as error:
            show_error(f"Export failed: {error}")
            return
        show_info(f"Model written to {path}")

    def _record_channel_axis(self, classifier: Classifier) -> None:
        """Channels first, as in the layer, for ``predict`` on files laid out alike
        (a multichannel layer; RGB files are read as RGB without it)."""
        image = self._session_image
        if self._multichannel and image is not None:
            classifier.provenance["channel_axis"] = {"ndim": image.ndim, "axis": 0}
        else:
            classifier.provenance.pop("channel_axis", None)

    def _ask_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self.native, "Load model", "", "Model (*.pt)"
        )
        if path:
            self.load_model(path)

    def load_model(self, path: str | Path) -> None:
        """Use the model in ``path`` for training and prediction from now on."""
        try:
            classifier = load_classifier(path)
            session = self._ensure_session()
        except InputError as error:
            show_error(str(error))
            return
        if classifier.in_channels != session.image.shape[0]:
            show_error(
                f"The model expects {classifier.in_channels} channel(s); "
                f"{self.image_picker.value.name!r} has {session.image.shape[0]}."
            )
            return
        with self._halted():
            session.reset()
            session.classifier = classifier.to(pick_device(session.device))
            session.class_names = classifier.class_names
        self.class_names.value = ", ".join(classifier.class_names)
        self.status.value = f"Loaded {Path(path).name}."

    def _apply_to_picked_layer(self) -> None:
        target = self.apply_picker.value
        if target is not None:
            self.apply_to_layer(target)

    def apply_to_layer(self, target: napari.layers.Image) -> GeneratorWorker | None:
        """Predict every slice of ``target`` with the current model, with progress."""
        classifier = self._model_for_prediction()
        if classifier is None:
            show_warning("Train or load a model first.")
            return None
        multichannel = (  # (C, Y, X), (C, Z, Y, X)...: a single channel cannot fit
            not target.rgb
            and target.ndim >= 3
            and target.data.shape[0] == classifier.in_channels > 1
        )
        try:
            image = image_array(target, multichannel)
        except InputError as error:
            show_error(str(error))
            return None
        if image.shape[0] != classifier.in_channels:
            show_error(
                f"The model expects {classifier.in_channels} channel(s); "
                f"{target.name!r} has {image.shape[0]}."
            )
            return None
        shape = _spatial_shape(target, multichannel)
        layer = self._viewer.add_labels(
            np.zeros(shape, class_dtype(classifier.num_classes)),
            name=f"{target.name}{PREDICTION_SUFFIX}",
            **_layer_geometry(target, len(shape)),
        )
        return self._run_prediction(classifier, image, layer)

    def _predict_all_slices(self) -> None:
        if self._session is None or self._session.classifier is None:
            show_warning("Train or load a model first.")
            return
        prediction, _ = self._output_layers()
        self._run_prediction(
            self._model_for_prediction(), self._session.image, prediction
        )

    def _model_for_prediction(self) -> Classifier | None:
        """A copy of the model: one model for every tile, not weights that training
        changes under the prediction (now, or once Train is pressed)."""
        session = self._session
        if session is None or session.classifier is None:
            return None
        with self._step_lock:  # between two steps: the weights of one step
            return frozen_copy(session.classifier)

    def _run_prediction(
        self, classifier: Classifier, image: np.ndarray, layer: napari.layers.Labels
    ) -> GeneratorWorker:
        boxes = list(iter_tiles(image.shape[1:], DEFAULT_TILE))

        def write(update: tuple[Box, np.ndarray, list[str]]) -> None:
            box, classes, messages = update
            for message in messages:
                show_warning(message)
            index = (slice(box.r0, box.r1), slice(box.c0, box.c1))
            layer.data[(*_plane_index(layer.data.shape, box.z), *index)] = classes
            layer.refresh()

        worker = create_worker(
            _reraising,
            _predict_boxes(classifier, image, boxes),
            _progress={"total": len(boxes), "desc": f"Predicting {layer.name}"},
            _start_thread=False,
            _connect={"errored": _show_prediction_error},  # shown once, not re-raised
        )
        worker.yielded.connect(write)
        worker.start()
        return worker

    # -- replaced pixels, sessions on disk, autosave ---------------------------

    def _watch_image(self, image: napari.layers.Image) -> None:
        """Follow ``image.data`` being replaced (``layer.data = ...``)."""
        if self._watched_image is image:
            return
        if self._watched_image is not None:
            self._watched_image.events.data.disconnect(self._on_image_data_replaced)
        image.events.data.connect(self._on_image_data_replaced)
        self._watched_image = image

    def _on_image_data_replaced(self, *_event) -> None:
        """Pause: the worker holds the old pixels; Train picks up the new ones."""
        self._image_replaced = True
        if self.training:
            self.stop("Paused: the image's pixels were replaced.")
        show_info("The image's pixels were replaced: press Train to train on them.")

    def _take_new_pixels(self, image: napari.layers.Image, multichannel: bool) -> None:
        """Give the session the layer's new pixels; keep the model when they fit."""
        if self._session.replace_image(image_array(image, multichannel)):
            if image.name in self._pairs:  # its pair in the set: the new pixels
                self._pair_arrays[image.name] = self._session.image
            show_info("Training goes on with the new pixels and the same model.")
        else:
            if image.name in self._pairs:  # its scribbles no longer fit
                self.remove_pair(image.name)
            show_warning("The new image has another size: the model starts afresh.")
        self._image_replaced = False

    def session_settings(self) -> dict:
        """The widget's settings saved with a session (plain values)."""
        return {
            "learning_rate": float(self.learning_rate.value),
            "autosave_minutes": int(self.autosave_minutes.value),
            "device": str(self.device.value),
            "image": self.image_picker.value.name if self.image_picker.value else "",
        }

    def save_session_to(self, path: str | Path, quiet: bool = False) -> bool:
        """Write scribbles, classes, settings and model to ``path``; success?"""
        scribbles = self.scribble_picker.value
        try:
            session = self._ensure_session()
            session.class_names = self.names()
            pairs = {
                name: (self._pair_arrays[name].shape, np.asarray(layer.data))
                for name, (_image, layer) in self._pairs.items()
            }
            with self._between_steps() as checkpoint:
                save_session(
                    path,
                    session,
                    scribbles.data,
                    self.session_settings(),
                    checkpoint,
                    pairs,
                )
        except (InputError, OSError) as error:
            show_error(f"Saving the session failed: {error}")
            return False
        self.session_path = Path(path)
        if not quiet:
            show_info(f"Session written to {path}")
        return True

    def restore_session_from(self, path: str | Path) -> bool:
        """Restore a saved session onto the picked image, scribbles in a new layer."""
        image = self.image_picker.value
        if image is None:
            show_warning("Open or pick the session's image first.")
            return False
        try:
            saved = load_session(path)
            multichannel = _channels_first_for(image, saved.scribbles.shape)
            pair_layers = self._pair_layers(saved)
            pair_images = {name: array for name, (_layer, array) in pair_layers.items()}
            restored = restore_session(
                saved,
                image_array(image, multichannel),
                self.device.value,
                pair_images,
                name=image.name,
            )
        except InputError as error:
            show_error(f"Restoring the session failed: {error}")
            return False
        self.stop()
        self.preset.value = saved.preset  # (settings first: they drop the session)
        self.learning_rate.value = saved.settings.get("learning_rate", 1e-3)
        self.autosave_minutes.value = saved.settings.get("autosave_minutes", 0)
        self.class_names.value = ", ".join(saved.class_names)
        shape = tuple(saved.scribbles.shape)
        layer = self._viewer.add_labels(
            saved.scribbles,
            name=f"{image.name} scribbles (restored)",
            metadata={"class_names": list(saved.class_names)},
            **_layer_geometry(image, len(shape)),
        )
        self.reset_choices()
        self.scribble_picker.value = layer
        self._session, self._session_image = restored, image
        self._multichannel, self._image_replaced = multichannel, False
        self.prior_strength.value = restored.config.prior_strength
        self._restore_pairs(saved, image, layer, pair_layers)
        steps = restored.trainer.steps_done if restored.trainer else 0
        self.status.value = f"Restored {Path(path).name} at step {steps}."
        return True

    def _pair_layers(
        self, saved: SavedSession
    ) -> dict[str, tuple[napari.layers.Image, np.ndarray]]:
        """The open image layers of the saved training set's other pairs, by name."""
        found = {}
        for pair in saved.pairs:
            layer = next(
                (each for each in self._viewer.layers if each.name == pair.name), None
            )
            if isinstance(layer, napari.layers.Image):
                multichannel = _channels_first_for(layer, pair.scribbles.shape)
                found[pair.name] = (layer, image_array(layer, multichannel))
        return found

    def _restore_pairs(
        self,
        saved: SavedSession,
        image: napari.layers.Image,
        scribbles: napari.layers.Labels,
        pair_layers: dict[str, tuple[napari.layers.Image, np.ndarray]],
    ) -> None:
        """The restored training set in the list, each pair's scribbles a new layer."""
        self._pairs.clear()
        self._pair_arrays.clear()
        self._mailbox.take_pair_changes()  # the old set's, not applied
        arrays = {name: array for name, (_layer, array) in pair_layers.items()}
        if saved.in_set:
            self._pairs[image.name] = (image, scribbles)
            self._pair_arrays[image.name] = self._session.image
        for pair in saved.pairs:
            if pair.name in missing_pairs(saved, arrays):
                continue
            layer, array = pair_layers[pair.name]
            labels = self._viewer.add_labels(
                pair.scribbles,
                name=f"{pair.name} scribbles (restored)",
                metadata={"class_names": list(saved.class_names)},
                **_layer_geometry(layer, pair.scribbles.ndim),
            )
            self._pairs[pair.name] = (layer, labels)
            self._pair_arrays[pair.name] = array
        self._show_pairs()
        missing = missing_pairs(saved, arrays)
        if missing:
            show_warning(
                "Not restored (open these images to train on them again): "
                + ", ".join(missing)
            )

    def autosave(self) -> None:
        """Save the session to the last session file, or to the autosave file."""
        if self._session is None or self.scribble_picker.value is None:
            return
        path = self.session_path or AUTOSAVE_PATH
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.save_session_to(path, quiet=True):
            self.status.value = f"Autosaved to {path.name} at {time.strftime('%H:%M')}."

    def _on_autosave_changed(self, *_args) -> None:
        minutes = int(self.autosave_minutes.value)
        if minutes > 0:
            self._autosave_timer.start(minutes * 60_000)
        else:
            self._autosave_timer.stop()

    def _ask_save_session(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self.native,
            "Save session",
            f"session{SESSION_SUFFIX}",
            f"Session (*{SESSION_SUFFIX})",
        )
        if path:
            self.save_session_to(path)

    def _ask_restore_session(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self.native, "Restore session", "", f"Session (*{SESSION_SUFFIX})"
        )
        if path:
            self.restore_session_from(path)


def _predict_boxes(
    classifier: Classifier, image: np.ndarray, boxes: list[Box]
) -> Iterator[tuple[Box, np.ndarray, list[str]]]:
    """Classes of each box, with messages for the user said for the first time."""
    said: list[str] = []
    normalization = classifier.normalization.for_image(image)  # once per image
    for box in boxes:
        told: list[str] = []
        proba = predict_fitting(classifier, image, box, told.append, normalization)
        classes, _ = labels_and_uncertainty(proba)
        new = [message for message in dict.fromkeys(told) if message not in said]
        said.extend(new)
        yield box, classes, new


class WorkerError(Exception):
    """A ``RuntimeError`` of a worker, which superqt would only warn about."""


def _one_step_at_a_time(
    generator: Generator, lock: threading.Lock, halt: threading.Event
) -> Generator:
    """``generator``'s items, each computed holding ``lock``; none once ``halt``
    is set. Whoever holds the lock after setting ``halt`` owns the session."""
    while True:
        with lock:
            if halt.is_set():
                return None
            try:
                item = next(generator)
            except StopIteration as end:
                return end.value
        yield item


def _reraising(generator: Generator) -> Generator:
    """Run ``generator``; its RuntimeErrors reach ``errored`` as :class:`WorkerError`.

    superqt's generator workers take a RuntimeError for a deleted Qt object and turn
    it into a warning: training would stop without a word (torch raises them).
    """
    try:
        return (yield from generator)
    except RuntimeError as error:
        raise WorkerError(str(error) or repr(error)) from error


def _show_prediction_error(error: Exception) -> None:
    show_error(f"Prediction failed: {error}")


def _single_shot(interval_ms: int, slot) -> QTimer:
    timer = QTimer()
    timer.setSingleShot(True)
    timer.setInterval(interval_ms)
    timer.timeout.connect(slot)
    return timer


def _status_text(session: LiveSession, status: TrainStatus) -> str:
    counts = list(zip(session.class_names, status.painted, strict=False))
    unpainted = sum(1 for _, count in counts if not count)
    shown = [(name, n) for name, n in counts if n or unpainted <= _ZEROS_LISTED]
    painted = ", ".join(f"{name} {count}" for name, count in shown)
    if unpainted > _ZEROS_LISTED:
        painted += f" ({unpainted} classes without strokes)"
    device = session.classifier.device if session.classifier else "?"
    return (
        f"step {status.step} · loss {status.loss_text} · "
        f"{status.steps_per_second:.1f} steps/s · rate {status.learning_rate:.1e} · "
        f"{device}\npainted: {painted}"
    )


def _quit_worker(worker: GeneratorWorker | None) -> None:
    if worker is not None:
        worker.quit()
