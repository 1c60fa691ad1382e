"""A whole live session in one file: scribbles, classes, settings, model, optimiser.

Once a model exists the file is a model file (see :mod:`napari_dsparse.export`) with
one more entry, ``"session"``, so it also loads wherever a model is expected. The
session entry holds the scribbles, class names, preset and training settings, the
optimiser's moments, the step count and the crop sampler's state: a restored session
predicts identically and its next steps are the ones the saved session would have
taken. Files are plain data loaded with ``weights_only=True``; writes are atomic.

A training set of several images is saved as the name of the image in view, whether
it is one of the set, and each other pair's name, image shape and scribbles; images
are never copied into the file. :func:`restore_session` takes those images back
(by name) where they are given and says which pairs it could not restore.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
    save_torch_atomically,
)
from napari_dsparse.faults import Checkpoint
from napari_dsparse.live import LiveSession
from napari_dsparse.model import Classifier, pick_device
from napari_dsparse.train import TrainConfig

__all__ = [
    "SavedPair",
    "SavedSession",
    "load_session",
    "missing_pairs",
    "restore_session",
    "save_session",
]

SESSION_FORMAT = "napari-dsparse session"
SESSION_VERSION = 1
SESSION_SUFFIX = ".dsparse-session.pt"
PLAIN = (str, int, float, bool, type(None))  # what weights_only loading accepts


@dataclass
class SavedPair:
    """Another image of the training set: its name, shape and scribbles (no pixels)."""

    name: str
    image_shape: tuple[int, ...]  # (C, Z, Y, X)
    scribbles: np.ndarray


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
    name: str = "image"  # the training pair of the image in view
    in_set: bool = False  # whether the image in view is one of the training set
    pairs: list[SavedPair] = field(default_factory=list)  # the set's other images


def save_session(
    path: str | os.PathLike,
    session: LiveSession,
    scribbles: np.ndarray,
    settings: dict[str, Any] | None = None,
    checkpoint: Checkpoint | None = None,
    pairs: Mapping[str, tuple[tuple[int, ...], np.ndarray]] | None = None,
) -> Path:
    """Write ``session`` and the user's ``scribbles`` to ``path`` atomically.

    Parameters
    ----------
    checkpoint
        The trainer state to save; by default a copy taken now. While a worker
        trains, pass ``session.last_good`` (taken between steps) instead.
    settings
        Plain values (numbers, strings) of the GUI to restore later.
    pairs
        The training set as ``name -> (image shape (C, Z, Y, X), scribbles)``; by
        default ``session.pairs``. A pair named like the image in view marks it as
        one of the set (its scribbles are ``scribbles``).
    """
    path = Path(path)
    settings = dict(settings or {})
    for key, value in settings.items():
        if not isinstance(value, PLAIN):
            raise TypeError(f"setting {key!r} is not a plain value: {value!r}")
    if checkpoint is None and session.trainer is not None:
        checkpoint = Checkpoint.of(session.trainer)
    if pairs is None:
        pairs = {
            name: (tuple(image.shape), labels)
            for name, (image, labels) in list(session.pairs.items())
        }
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
        "steps_on_labels": None if checkpoint is None else checkpoint.steps_on_labels,
        "name": session.name,
        "in_set": session.name in pairs,
        "pairs": [
            {
                "name": name,
                "image_shape": list(shape),
                "scribbles": _labels_tensor(_compact(np.asarray(labels))),
                "scribbles_dtype": str(_compact(np.asarray(labels)).dtype),
            }
            for name, (shape, labels) in pairs.items()
            if name != session.name
        ],
    }
    save_torch_atomically(path, payload)
    return path


def _model_payload(session: LiveSession, checkpoint: Checkpoint | None) -> dict:
    """The model file's entries (weights from ``checkpoint``), or a bare header."""
    if session.classifier is None or checkpoint is None:
        return {"format": SESSION_FORMAT}
    payload = classifier_to_dict(session.classifier, checkpoint)
    payload["class_names"] = list(session.class_names)[: session.classifier.num_classes]
    return payload


def _compact(labels: np.ndarray) -> np.ndarray:
    """uint8 labels when they fit (a pair's snapshot is int64)."""
    small = labels.size and labels.min() >= 0 and labels.max() < 256
    return labels.astype(np.uint8) if small and labels.dtype != np.uint8 else labels


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
            int(entry.get("steps_on_labels") or 0),  # absent from older files
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
        name=str(entry.get("name", "image")),
        in_set=bool(entry.get("in_set", False)),
        pairs=[
            SavedPair(
                str(pair["name"]),
                tuple(pair["image_shape"]),
                pair["scribbles"].numpy().astype(pair["scribbles_dtype"]),
            )
            for pair in entry.get("pairs", [])
        ],
    )


def restore_session(
    saved: SavedSession,
    image: np.ndarray,
    device: str | None = None,
    pair_images: Mapping[str, np.ndarray] | None = None,
    name: str | None = None,
) -> LiveSession:
    """A live session on ``image`` (``(C, Z, Y, X)``) that goes on where it stopped.

    The image must have the saved layout; training resumes with the saved optimiser
    moments, step count and sampler state once the scribbles are posted again.
    ``pair_images`` gives the training set's other images by name (``(C, Z, Y, X)``);
    pairs whose image is not given or has another shape are left out (see
    :func:`missing_pairs`). ``name`` renames the image in view (default: as saved).
    """
    if tuple(image.shape) != saved.image_shape:
        raise InputError(
            f"the session was saved for an image of shape {saved.image_shape} "
            f"(channels, planes, rows, columns); this one is {tuple(image.shape)}"
        )
    session = LiveSession(
        image,
        saved.class_names,
        saved.preset,
        saved.config,
        device=device,
        name=name or saved.name,
    )
    scribbles = saved.scribbles.reshape(image.shape[1:])
    found = _found_pairs(saved, pair_images or {})
    if saved.classifier is None:
        session.pairs.update(found)
        if saved.in_set:
            session.pairs[session.name] = (image, scribbles)
        return session
    try:
        session.classifier = saved.classifier.to(pick_device(device))
    except (ValueError, RuntimeError) as error:
        raise ModelFileError(str(error)) from error
    for name, (pair_image, labels) in found.items():
        session.add_pair(name, pair_image, labels)
    session.set_labels(scribbles, 0)
    if saved.in_set:
        session.pairs[session.name] = (image, scribbles)
    trainer = session.trainer
    if (
        trainer is not None
        and saved.checkpoint is not None
        and trainer.classifier is saved.classifier  # not grown by new class names
    ):
        saved.checkpoint.restore(session.trainer)
        session.keep_last_good()
    return session


def _found_pairs(
    saved: SavedSession, images: Mapping[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        pair.name: (images[pair.name], pair.scribbles)
        for pair in saved.pairs
        if pair.name in images and tuple(images[pair.name].shape) == pair.image_shape
    }


def missing_pairs(saved: SavedSession, images: Mapping[str, np.ndarray]) -> list[str]:
    """Names of saved pairs whose image is not in ``images`` (or has another shape)."""
    found = _found_pairs(saved, images)
    return [pair.name for pair in saved.pairs if pair.name not in found]
