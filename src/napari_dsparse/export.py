"""Model files: one ``torch.save`` of plain data, loaded with ``weights_only=True``.

The file holds the format version, the architecture (the preset's fields, so a model
rebuilds identically even if presets change later), class names, normalisation,
receptive field, training provenance and the ``state_dict``. Nothing is pickled.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from napari_dsparse import __version__
from napari_dsparse.data import InputError, Normalization
from napari_dsparse.model import Classifier
from napari_dsparse.nets import ClassPrior, Preset, build_patch_net

__all__ = [
    "FORMAT_VERSION",
    "ModelFileError",
    "WriteError",
    "check_output_folder",
    "classifier_from_dict",
    "classifier_to_dict",
    "frozen_copy",
    "load_classifier",
    "save_classifier",
]

FORMAT = "napari-dsparse model"
FORMAT_VERSION = 1


class ModelFileError(InputError):
    """A model file that is missing, damaged or from a newer version."""


class WriteError(InputError):
    """The system refused to write an output (full disk, a folder in the way...).

    One line like every ``InputError``; the command line exits with 1, not 2.
    """


def classifier_to_dict(
    classifier: Classifier, snapshot: WeightsSnapshot | None = None
) -> dict[str, Any]:
    """Everything needed to rebuild ``classifier``, as plain data and tensors.

    ``snapshot`` (weights copied between two training steps, and their step count)
    replaces the live weights, which a training thread may be updating.
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "preset": asdict(classifier.preset),
        "in_channels": classifier.in_channels,
        "class_names": list(classifier.class_names),
        "class_colors": [list(color) for color in classifier.colors()],
        "normalization": classifier.normalization.to_dict(),
        "patch_size": classifier.patch_size,
        "receptive_field": classifier.patch_size,
        "halo": classifier.halo,
        "provenance": _provenance(classifier),
        "state_dict": {
            k: v.detach().cpu() for k, v in classifier.patch_net.state_dict().items()
        },
    }
    if snapshot is not None:
        _check_snapshot(payload["state_dict"], snapshot.model_state)
        payload["state_dict"] = dict(snapshot.model_state)
        payload["provenance"] = {**payload["provenance"], "steps": snapshot.steps_done}
    return payload


def _check_snapshot(
    live: dict[str, torch.Tensor], snapshot: dict[str, torch.Tensor]
) -> None:
    """``InputError`` if the snapshot is of another architecture (a class added in
    between, by the training thread)."""
    shapes = {name: tuple(value.shape) for name, value in snapshot.items()}
    if shapes != {name: tuple(value.shape) for name, value in live.items()}:
        raise InputError("the model gained a class meanwhile; try again")


class WeightsSnapshot(Protocol):
    """What :func:`classifier_to_dict` takes from a ``faults.Checkpoint``."""

    model_state: dict[str, torch.Tensor]
    steps_done: int


def _provenance(classifier: Classifier) -> dict[str, Any]:
    """Training provenance; steps, seed and package version are always present."""
    return {
        "steps": 0,
        "seed": None,
        **classifier.provenance,
        "package_version": classifier.provenance.get("package_version", __version__),
        "saved_by": __version__,
    }


def save_classifier(
    classifier: Classifier,
    path: str | os.PathLike,
    snapshot: WeightsSnapshot | None = None,
) -> Path:
    """Write ``classifier`` to ``path`` atomically (temporary file, then rename).

    While another thread trains it, pass ``snapshot`` (a ``faults.Checkpoint``
    taken between steps): the file then holds one step's weights, not a mix.
    """
    path = Path(path)
    payload = classifier_to_dict(classifier, snapshot)
    save_torch_atomically(path, payload)
    return path


def save_torch_atomically(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` of ``payload`` into ``path`` through :func:`write_atomically`.

    Serialised in memory first: torch's file writer reports a full disk as a
    ``RuntimeError`` with no reason, where a plain write raises ``OSError``
    (``ENOSPC``), which becomes a one-line ``WriteError``.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomically(
        path, lambda temporary: Path(temporary).write_bytes(buffer.getbuffer())
    )


def check_output_folder(path: Path, writable: bool = True) -> None:
    """``InputError`` unless the folder ``path`` goes into exists (and is writable).

    Run before long work, so that a typo in an output's folder costs nothing.
    """
    folder = path.parent
    if not folder.is_dir():
        reason = "is a file" if folder.exists() else "does not exist"
        raise InputError(f"cannot write {path}: folder {folder} {reason}")
    if writable and not os.access(folder, os.W_OK):
        raise InputError(f"cannot write {path}: folder {folder} is not writable")


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)`` next to ``path``, then rename it to ``path``.

    The file gets the permissions a plain write would give it: those of the file it
    replaces, else the umask's (not the owner-only mode of a temporary file).
    """
    check_output_folder(path, writable=False)  # mkstemp's error says why not
    try:
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".part"
        )
    except OSError as error:
        raise WriteError(f"cannot write {path}: {error.strerror}") from error
    os.close(handle)
    try:
        mode = _mode_for(path)
        write(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise WriteError(os_error_message(path, error)) from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave ``path`` with."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask: from /proc on Linux, else by setting it and back."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:"))[6:], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # other threads' new files may get 0o022 meanwhile
        os.umask(mask)
        return mask


def os_error_message(path: Path, error: OSError) -> str:
    """A one-line reason why ``path`` could not be written."""
    if error.errno == errno.ENOSPC:
        return f"cannot write {path}: the disk is full (nothing was left behind)"
    return f"cannot write {path}: {error.strerror or error}"


def load_classifier(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> Classifier:
    """Read a model file written by :func:`save_classifier`."""
    payload = _read_payload(Path(path))
    try:
        return classifier_from_dict(payload).to(device)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = f"no {error}" if isinstance(error, KeyError) else _first_lines(error)
        raise ModelFileError(f"{path} is not a valid model file ({reason})") from error


def _first_lines(error: Exception) -> str:
    """The first line of ``error``'s message, with the next where it ends in a colon
    (torch's "Error(s) in loading state_dict for ...:" then the first mismatch)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def classifier_from_dict(payload: dict[str, Any]) -> Classifier:
    """The classifier :func:`classifier_to_dict` described, on the CPU."""
    spec = payload["preset"]
    preset = Preset(
        **{
            **spec,
            "filter_scales": tuple(spec["filter_scales"]),
            "context_widths": tuple(spec["context_widths"]),
            # files from before the feature standardisation have none
            "standardize": spec.get("standardize", False),
        }
    )
    net = build_patch_net(preset, payload["in_channels"], len(payload["class_names"]))
    net.load_state_dict(_with_class_prior(net, payload["state_dict"]), strict=True)
    return Classifier(
        preset,
        int(payload["in_channels"]),
        tuple(payload["class_names"]),
        Normalization.from_dict(payload["normalization"]),
        net,
        provenance=dict(payload["provenance"]),
        class_colors=tuple(
            tuple(map(float, color)) for color in payload.get("class_colors", [])
        ),
    )


def frozen_copy(
    classifier: Classifier, snapshot: WeightsSnapshot | None = None
) -> Classifier:
    """A separate classifier with ``snapshot``'s weights (default: the current ones),
    on ``classifier``'s device.

    For predicting with one step's model while another thread trains ``classifier``
    (or may start to: ``snapshot=None`` only while no thread trains it).
    """
    payload = classifier_to_dict(classifier, snapshot)
    return classifier_from_dict(payload).to(classifier.device)


def _with_class_prior(net: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with a zero prior change where the file has none (older files)."""
    state = dict(state)
    for name, module in net.named_modules():
        if isinstance(module, ClassPrior):
            state.setdefault(f"{name}.log_ratio", torch.zeros_like(module.log_ratio))
    return state


def _read_payload(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelFileError(
            f"{path} is not a readable model file (truncated or corrupt?)"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a napari-dsparse model file")
    version = payload.get("format_version")
    if not isinstance(version, int):
        raise ModelFileError(f"{path} has no valid model format version")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer napari-dsparse (model format "
            f"{payload['format_version']}, this version reads up to {FORMAT_VERSION}); "
            "upgrade napari-dsparse"
        )
    return payload
