"""Reading images and labels, writing results: .tif/.tiff, .npy and .png; finding
the image in a zarr store."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from napari_dsparse.data import InputError
from napari_dsparse.export import write_atomically

if TYPE_CHECKING:
    import zarr

__all__ = [
    "IMAGE_SUFFIXES",
    "PICTURE_SUFFIXES",
    "channel_axis_of",
    "check_not_overwriting",
    "check_pairs_distinct",
    "is_zarr",
    "other_tiff_series",
    "read_array",
    "read_labels",
    "read_picture",
    "write_tif",
    "zarr_image",
]

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")  # read whole, by scikit-image
IMAGE_SUFFIXES = (".tif", ".tiff", ".npy", *PICTURE_SUFFIXES)


def read_array(path: str | Path) -> np.ndarray:
    """Read an image or label file, or a zarr store's image (:func:`zarr_image`),
    into memory; ``InputError`` says why if impossible."""
    path = Path(path)
    if is_zarr(path):
        return _read_zarr(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(
            f"{path}: unsupported file type {suffix!r} "
            f"(use {', '.join(IMAGE_SUFFIXES)} or a .zarr store)"
        )
    try:
        if suffix in (".tif", ".tiff"):
            return tifffile.imread(path)
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return read_picture(path)
    except Exception as error:
        raise InputError(f"cannot read {path}: {error}") from error


def _read_zarr(path: Path) -> np.ndarray:
    try:
        return np.asarray(zarr_image(path)[0])
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"cannot read {path}: {error}") from error


def read_picture(path: str | Path) -> np.ndarray:
    """A PNG's or JPEG's pixels; grey with alpha gives the grey (alpha ignored, as
    for RGBA)."""
    from PIL import Image
    from skimage.io import imread

    with Image.open(path):  # a clear "cannot identify image file" if it is none
        pass
    image = imread(path)
    if image.ndim == 3 and image.shape[-1] == 2:  # (Y, X, grey + alpha)
        return image[..., 0]
    return image


def channel_axis_of(path: str | Path, given: int | None = None) -> int | None:
    """``given``, else the channel axis the file's own metadata names, else ``None``.

    ImageJ hyperstacks and OME-TIFFs name their axes (``TZCYX``), OME-Zarr stores
    type theirs; a ``C`` (or ``channel``) axis is the channels, and so are a TIFF's
    samples (``YXS``) unless there are 3 or 4 of them: those are RGB(A), which
    ``data.as_channels_first`` infers (alpha ignored).
    """
    if given is not None:
        return given
    path = Path(path)
    try:
        if _is_tiff(path):
            axes, shape = _tiff_series(path)
            if "C" in axes:
                return axes.index("C")
            if "S" in axes and shape[axes.index("S")] not in (3, 4):  # not RGB(A)
                return axes.index("S")
            return None
        if is_zarr(path):
            return _zarr_channel_axis(path)
    except Exception:  # unreadable: the reader that follows says why
        return None
    return None


def tiff_axes(path: str | Path) -> str:
    """The axes a TIFF's first series names (``TZCYX``...; tifffile's letters), or
    ``""`` for other files and unreadable ones."""
    path = Path(path)
    try:
        return _tiff_series(path)[0] if _is_tiff(path) else ""
    except Exception:  # unreadable: the reader says why
        return ""


def other_tiff_series(path: str | Path) -> list[str]:
    """The series of a TIFF after the first, which the readers here skip, each as
    its name (or number) and shape; ``[]`` for other files and unreadable ones."""
    path = Path(path)
    try:
        if not _is_tiff(path):
            return []
        with tifffile.TiffFile(path) as tif:
            return [
                f"{series.name or f'series {index}'} "
                f"({' x '.join(map(str, series.shape))})"
                for index, series in enumerate(tif.series)
                if index > 0
            ]
    except Exception:  # unreadable: the reader says why
        return []


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff") and path.is_file()


def _tiff_series(path: Path) -> tuple[str, tuple[int, ...]]:
    """Axes and shape of a TIFF's first series (``("", ())`` if it has none)."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0] if tif.series else None
        return (series.axes, tuple(series.shape)) if series else ("", ())


def is_zarr(path: Path) -> bool:
    """A zarr store (a folder named ``*.zarr``) or a group or array inside one
    (``plate.zarr/raw``)."""
    return path.is_dir() and any(part.lower().endswith(".zarr") for part in path.parts)


def zarr_image(path: str | Path) -> tuple[zarr.Array, list]:
    """The full-resolution array of the zarr store at ``path``, with the axes its
    multiscales metadata names (``[]`` if none).

    An array is itself; an OME-Zarr (or other) group with ``multiscales`` gives its
    first dataset; a group with one array, that array; a bioformats2raw store (or a
    group holding one group and no array), its first series. A group holding several
    arrays (or groups) and no multiscales is an ``InputError`` that names them: pass
    one as ``store.zarr/name``.
    """
    import zarr

    path = Path(path)
    _check_not_in_chunks(path)
    node = zarr.open(str(path), mode="r")
    while isinstance(node, zarr.Group):
        multiscales = _multiscales(node.attrs)
        if multiscales:
            level = multiscales[0]["datasets"][0]["path"]
            if level not in node:
                raise InputError(
                    f"{path}: its multiscales metadata names the dataset {level!r}, "
                    "which the store does not hold"
                )
            return node[level], multiscales[0].get("axes", [])
        child = _zarr_child(node, path)
        node, path = node[child], path / child
    return node, []


def _check_not_in_chunks(path: Path) -> None:
    """``InputError`` naming the array if ``path`` is a folder of its chunks
    (``raw.zarr/c/0``), which zarr would report as a missing group."""
    if _zarr_node_kind(path) is not None:
        return
    for parent in path.parents:
        if not is_zarr(parent):
            return
        kind = _zarr_node_kind(parent)
        if kind == "array":
            raise InputError(
                f"{path} is a folder of chunks of the zarr array {parent}: "
                f"give {parent} itself"
            )
        if kind is not None:
            return


def _zarr_node_kind(folder: Path) -> str | None:
    """``"array"`` or ``"group"`` for a zarr node's folder (v2 or v3), else None."""
    if (folder / ".zarray").is_file():
        return "array"
    if (folder / ".zgroup").is_file():
        return "group"
    try:
        metadata = json.loads((folder / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return metadata.get("node_type") if isinstance(metadata, dict) else None


def _zarr_child(group: zarr.Group, path: Path) -> str:
    """The one array or group to read in a group without multiscales metadata."""
    arrays = sorted(name for name, _ in group.arrays())
    if len(arrays) == 1:
        return arrays[0]
    groups = sorted(name for name, _ in group.groups())
    if not arrays:
        if "bioformats2raw.layout" in group.attrs and "0" in groups:
            return "0"  # the first series, as a TIFF's first series is read
        if len(groups) == 1:
            return groups[0]
    choices, kind = (arrays, "arrays") if arrays else (groups, "groups")
    if not choices:
        raise InputError(f"{path} is a zarr group without arrays")
    raise InputError(
        f"{path} holds {len(choices)} {kind} ({', '.join(choices)}) and no "
        f"multiscales metadata: name the one to read, such as {path / choices[0]}"
    )


def _multiscales(attrs) -> list:
    """OME-Zarr multiscales metadata (0.4 at the top, 0.5 under ``ome``), or []."""
    return attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales") or []


def _zarr_channel_axis(path: Path) -> int | None:
    """The channel axis of an OME-Zarr's multiscales (0.4: typed dicts; 0.3: names)."""
    _, axes = zarr_image(path)
    for index, axis in enumerate(axes):
        named = axis if isinstance(axis, str) else axis.get("name")
        if (isinstance(axis, dict) and axis.get("type") == "channel") or named == "c":
            return index
    return None


def read_labels(path: str | Path) -> np.ndarray:
    """:func:`read_array` for label files: a palette PNG gives its indices.

    Annotation tools save label maps as palette PNGs (index k painted in class k's
    colour); read as a picture, they would be colours, not class ids.
    """
    path = Path(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise InputError(
            f"{path}: JPEG compression changes class ids at stroke edges; save the "
            "labels as .png, .tif or .npy"
        )
    if path.suffix.lower() == ".png" and path.is_file():
        from PIL import Image

        try:
            with Image.open(path) as picture:
                if picture.mode == "P":
                    return np.asarray(picture)
        except Exception as error:
            raise InputError(f"cannot read {path}: {error}") from error
    return read_array(path)


def write_tif(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as (Big)TIFF atomically: never a partial file."""
    path = Path(path)
    write_atomically(
        path,
        lambda temporary: tifffile.imwrite(
            temporary, array, bigtiff=array.nbytes > 2**31, compression="zlib"
        ),
    )
    return path


def check_not_overwriting(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """``InputError`` if writing one of ``outputs`` would replace one of ``inputs``.

    Files are compared by identity (device and inode), so another spelling of the
    same path, a symbolic link or a hard link counts as the same file. An output
    zarr store (replaced whole) that holds an input counts too: ``predict m.pt
    s.zarr/raw -o s.zarr`` would delete ``raw``.
    """
    existing = [path for path in map(Path, inputs) if path.exists()]
    sources = {_identity(path): path for path in existing}
    for output in map(Path, outputs):
        if not output.exists():
            continue
        source = sources.get(_identity(output))
        if source is None and is_zarr(output):
            folder = output.resolve()
            inside = (p for p in existing if p.resolve().is_relative_to(folder))
            source = next(inside, None)
        if source is not None:
            raise InputError(
                f"the output {output} would overwrite the input {source}; "
                "choose another output"
            )


def check_pairs_distinct(pairs: Iterable[tuple[Path, Path]]) -> None:
    """``InputError`` if one ``(image, labels)`` pair of files is given twice.

    Training on it twice would silently double its weight. Files are compared as in
    :func:`check_not_overwriting`; files that do not exist are left to the reader.
    """
    seen: dict[tuple[tuple[int, int], tuple[int, int]], tuple[Path, Path]] = {}
    for image, labels in pairs:
        image, labels = Path(image), Path(labels)
        if not (image.exists() and labels.exists()):
            continue
        key = (_identity(image), _identity(labels))
        if key in seen:
            raise InputError(
                f"the pair {image} {labels} is given twice (also as "
                f"{seen[key][0]} {seen[key][1]}); give each pair once"
            )
        seen[key] = (image, labels)


def _identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino
