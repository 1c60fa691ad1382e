"""A whole live session in one file: scribbles, classes, settings, model, optimiser.

Once a model exists the file is a model file (see :mod:`napari_dsparse.export`) with
one more entry, ``"session"``, so it also loads wherever a model is expected. The
session entry holds the scribbles, class names, preset and training settings, the
optimiser's moments, the step count and the crop sampler's state: a restored session
predicts identically and its next steps are the ones the saved session would have
taken. Files are plain data loaded with ``weights_only=True``; writes are atomic.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_dsparse.data import InputError
from napari_dsparse.export import (
    ModelFileError,
    classifier_to_dict,
    load_classifier,
    write_atomically,
)
from napari_dsparse.faults import Checkpoint
from napari_dsparse.live import LiveSession
from napari_dsparse.model import Classifier, pick_device
from napari_dsparse.train import TrainConfig

__all__ = ["SavedSession", "load_session", "restore_session", "save_session"]

SESSION_FORMAT = "napari-dsparse session"
SESSION_VERSION = 1
SESSION_SUFFIX = ".dsparse-session.pt"
PLAIN = (str, int, float, bool, type(None))  # what weights_only loading accepts


@dataclass
class SavedSession:
    """What :func:`load_session` read; :func:`restore_session` makes it live again."""

    scribbles: np.ndarray
    class_names: tuple[str, ...]
    preset: str
    config: TrainConfig
    image_shape: tuple[int, ...]  # (C, Z, Y, X) of the image it was trained on
    settings: dict[str, Any] = field(default_factory=dict)
    classifier: Classifier | None = None
    checkpoint: Checkpoint | None = None


def save_session(
    path: str | os.PathLike,
    session: LiveSession,
    scribbles: np.ndarray,
    settings: dict[str, Any] | None = None,
    checkpoint: Checkpoint | None = None,
) -> Path:
    """Write ``session`` and the user's ``scribbles`` to ``path`` atomically.

    Parameters
    ----------
    checkpoint
        The trainer state to save; by default a copy taken now. While a worker
        trains, pass ``session.last_good`` (taken between steps) instead.
    settings
        Plain values (numbers, strings) of the GUI to restore later.
    """
    path = Path(path)
    settings = dict(settings or {})
    for key, value in settings.items():
        if not isinstance(value, PLAIN):
            raise TypeError(f"setting {key!r} is not a plain value: {value!r}")
    if checkpoint is None and session.trainer is not None:
        checkpoint = Checkpoint.of(session.trainer)
    payload = _model_payload(session, checkpoint)
    payload["session"] = {
        "format": SESSION_FORMAT,
        "format_version": SESSION_VERSION,
        "scribbles": _labels_tensor(np.asarray(scribbles)),
        "scribbles_dtype": str(np.asarray(scribbles).dtype),
        "class_names": list(session.class_names),
        "preset": session.preset,
        "config": asdict(session.config),
        "image_shape": list(session.image.shape),
        "settings": settings,
        "optimizer_state": None if checkpoint is None else checkpoint.optimizer_state,
        "steps_done": None if checkpoint is None else checkpoint.steps_done,
        "rng_state": None if checkpoint is None else checkpoint.rng_state,
    }
    write_atomically(path, lambda temporary: torch.save(payload, temporary))
    return path


def _model_payload(session: LiveSession, checkpoint: Checkpoint | None) -> dict:
    """The model file's entries (weights from ``checkpoint``), or a bare header."""
    if session.classifier is None or checkpoint is None:
        return {"format": SESSION_FORMAT}
    payload = classifier_to_dict(session.classifier)
    payload["class_names"] = list(session.class_names)[: session.classifier.num_classes]
    payload["state_dict"] = dict(checkpoint.model_state)
    payload["provenance"] = {**payload["provenance"], "steps": checkpoint.steps_done}
    return payload


def _labels_tensor(labels: np.ndarray) -> torch.Tensor:
    """uint8 stays uint8 (the usual case); other integer labels travel as int64."""
    kind = np.uint8 if labels.dtype == np.uint8 else np.int64
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=kind))


def load_session(path: str | os.PathLike) -> SavedSession:
    """Read a file written by :func:`save_session`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"session file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"{path} is not a readable session file") from error
    entry = payload.get("session") if isinstance(payload, dict) else None
    if not isinstance(entry, dict) or entry.get("format") != SESSION_FORMAT:
        raise InputError(f"{path} is not a napari-dsparse session file")
    if entry.get("format_version", 0) > SESSION_VERSION:
        raise InputError(
            f"{path} was written by a newer napari-dsparse; upgrade to restore it"
        )
    try:
        return _saved_session(path, payload, entry)
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path} is not a valid session file ({error})") from error


def _saved_session(path: Path, payload: dict, entry: dict) -> SavedSession:
    classifier = None
    if payload.get("format") != SESSION_FORMAT:  # the session has a model
        classifier = load_classifier(path)
    checkpoint = None
    if classifier is not None and entry["optimizer_state"] is not None:
        checkpoint = Checkpoint(
            dict(payload["state_dict"]),
            entry["optimizer_state"],
            int(entry["steps_done"]),
            entry["rng_state"],
        )
    return SavedSession(
        scribbles=entry["scribbles"].numpy().astype(entry["scribbles_dtype"]),
        class_names=tuple(entry["class_names"]),
        preset=str(entry["preset"]),
        config=TrainConfig(**entry["config"]),
        image_shape=tuple(entry["image_shape"]),
        settings=dict(entry["settings"]),
        classifier=classifier,
        checkpoint=checkpoint,
    )


def restore_session(
    saved: SavedSession, image: np.ndarray, device: str | None = None
) -> LiveSession:
    """A live session on ``image`` (``(C, Z, Y, X)``) that goes on where it stopped.

    The image must have the saved layout; training resumes with the saved optimiser
    moments, step count and sampler state once the scribbles are posted again.
    """
    if tuple(image.shape) != saved.image_shape:
        raise InputError(
            f"the session was saved for an image of shape {saved.image_shape} "
            f"(channels, planes, rows, columns); this one is {tuple(image.shape)}"
        )
    session = LiveSession(
        image, saved.class_names, saved.preset, saved.config, device=device
    )
    if saved.classifier is None:
        return session
    try:
        session.classifier = saved.classifier.to(pick_device(device))
    except (ValueError, RuntimeError) as error:
        raise ModelFileError(str(error)) from error
    session.set_labels(saved.scribbles.reshape(image.shape[1:]), 0)
    trainer = session.trainer
    if (
        trainer is not None
        and saved.checkpoint is not None
        and trainer.classifier is saved.classifier  # not grown by new class names
    ):
        saved.checkpoint.restore(session.trainer)
        session.keep_last_good()
    return session
