"""Prediction at any image size: lazy reading, memory-bounded tiles, incremental writes.

An input file is opened as a dask array (TIFF and BigTIFF through tifffile's zarr
store, .npy memory-mapped, zarr and OME-Zarr as they are chunked; only .png is read
whole), so a tile reads just the pixels it needs. Tiles are sized from a memory
budget, predicted exactly with their halos (:func:`napari_dsparse.predict.predict_box`)
and written as they come into a zarr store under a temporary name; a .tif output is
then streamed from it tile by tile. Only a finished result is renamed to the output
name: an error or Ctrl-C leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import tifffile
import torch
from torch import nn

from napari_dsparse.data import InputError, Normalization, as_channels_first
from napari_dsparse.export import (
    WriteError,
    check_output_folder,
    os_error_message,
    write_atomically,
)
from napari_dsparse.files import (
    PICTURE_SUFFIXES,
    channel_axis_of,
    check_not_overwriting,
    is_zarr,
    read_picture,
    tiff_axes,
    zarr_image,
)
from napari_dsparse.interrupts import interrupts_between_steps, stop_if_interrupted
from napari_dsparse.model import Classifier
from napari_dsparse.predict import (
    _check_compatible,
    class_dtype,
    iter_tiles,
    labels_and_uncertainty,
    predict_box,
)

__all__ = [
    "DEFAULT_MEMORY",
    "LAZY_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "MergedPlanes",
    "Outputs",
    "TiffRegions",
    "open_lazy",
    "parse_memory",
    "predict_file",
    "resolve_channel_axis",
    "result_paths",
    "smallest_tile_memory",
    "tile_for_memory",
]

DEFAULT_MEMORY = 2**30  # bytes for one tile's activations and buffers (1 GB)
LAZY_SUFFIXES = (".tif", ".tiff", ".npy", *PICTURE_SUFFIXES, ".zarr")
OUTPUT_SUFFIXES = (".tif", ".tiff", ".zarr")
TILE_MULTIPLE = 16  # TIFF tiles must be multiples of 16 pixels
MAX_TILE = 4096  # larger tiles gain no speed and make progress coarse
STOPPING = "stopping after this tile (Ctrl-C again to stop at once)"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Outputs:
    """Which results to write besides the classes (1..K)."""

    probabilities: bool = False
    uncertainty: bool = False

    def names(self) -> tuple[str, ...]:
        return (
            ("classes",)
            + ("probabilities",) * self.probabilities
            + ("uncertainty",) * self.uncertainty
        )


def parse_memory(text: str) -> int:
    """``"1GB"``, ``"512M"``, ``"2e9"`` -> bytes; ``InputError`` if unreadable."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in units else ""
    try:
        amount = float(value[: len(value) - len(unit)])
    except ValueError:
        raise InputError(f"cannot read the memory size {text!r} (e.g. 1GB)") from None
    if amount <= 0:
        raise InputError(f"the memory size must be positive, not {text!r}")
    return int(amount * units[unit])


# -- reading ----------------------------------------------------------------------


def open_lazy(path: str | Path) -> da.Array:
    """The image at ``path`` as a dask array that reads only what is sliced."""
    path = Path(path)
    zarr_store = is_zarr(path) or path.name.lower().endswith(".zarr")
    suffix = ".zarr" if zarr_store else path.suffix.lower()
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if suffix not in LAZY_SUFFIXES:
        raise InputError(
            f"{path}: unsupported file type {suffix!r} (use {', '.join(LAZY_SUFFIXES)})"
        )
    try:
        if suffix in (".tif", ".tiff"):
            return _open_tif(path)
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return da.from_array(array, chunks=_row_chunks(array), asarray=True)
        if suffix == ".zarr":
            return _open_zarr(path)
        return da.from_array(read_picture(path))
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"cannot read {path}: {error}") from error


def _open_tif(path: Path) -> da.Array:
    array = TiffRegions(path)
    return da.from_array(array, chunks=array.chunks)


class TiffRegions:
    """A TIFF's first series (full resolution), read region by region.

    tifffile's zarr store reads only the tiles or strips a region touches. The store
    holds an open file and a lock, so this wrapper pickles as its path and reopens
    the file in each process (dask workers).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._array = None
        array = self._open()
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.chunks: tuple[int, ...] = tuple(array.chunks)
        self.ndim = len(self.shape)

    def _open(self):
        if self._array is None:
            import zarr

            node = zarr.open(tifffile.imread(self.path, aszarr=True), mode="r")
            # A pyramid is a group whose level "0" is the full resolution.
            self._array = node["0"] if isinstance(node, zarr.Group) else node
        return self._array

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self._open()[key])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def _open_zarr(path: Path) -> da.Array:
    """The full-resolution array of a zarr store (:func:`files.zarr_image`)."""
    return da.from_zarr(zarr_image(path)[0])


def _row_chunks(array: np.ndarray) -> tuple[int, ...]:
    """Chunks of about 64 MB along the first axis (memory-mapped arrays)."""
    row_bytes = max(1, array.nbytes // max(1, array.shape[0]))
    return (max(1, 2**26 // row_bytes), *array.shape[1:])


# -- tiles from a memory budget ---------------------------------------------------


def activation_bytes_per_pixel(classifier: Classifier) -> int:
    """Bytes a tile holds per window pixel: float32 maps plus the tile's buffers.

    Counts the output of every layer of the network (activation functions too:
    they stand for the temporaries of the pixel-wise feature layers and the
    layout copies, though ReLU itself runs in place), three copies of the input
    (read, normalised, padded) and four per class and output (logits,
    probabilities, their NumPy copy, the encoded store chunk). Measured peaks of
    ``napari-dsparse predict`` tiles are about 0.75 of this for the ``pixel``
    preset and 0.3 for ``fast`` (8192², docs/benchmarks.md); counting the layers
    that change channels only let a ``pixel`` tile use about twice its share.
    """
    channels: list[int] = []

    def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
        if not isinstance(module, nn.Flatten):
            channels.append(int(output.shape[1]))

    leaves = [m for m in classifier.patch_net.modules() if not list(m.children())]
    hooks = [module.register_forward_hook(record) for module in leaves]
    size = classifier.patch_size
    patch = torch.zeros(1, classifier.in_channels, size, size)
    try:
        with torch.inference_mode():
            classifier.patch_net(patch.to(classifier.device))
    finally:
        for hook in hooks:
            hook.remove()
    buffers = 3 * classifier.in_channels + 4 * (classifier.num_classes + 2)
    return 4 * (sum(channels) + buffers)


def smallest_tile_memory(classifier: Classifier) -> int:
    """Bytes the smallest tile (``TILE_MULTIPLE`` px and its halo) takes; a budget
    below it is exceeded, as :func:`tile_for_memory` goes no smaller."""
    window = TILE_MULTIPLE + 2 * classifier.halo
    return activation_bytes_per_pixel(classifier) * window**2


def tile_for_memory(classifier: Classifier, memory: int) -> int:
    """Output tile side whose window (tile + 2 halo) fits ``memory`` bytes."""
    window = int(np.sqrt(memory / activation_bytes_per_pixel(classifier)))
    tile = (window - 2 * classifier.halo) // TILE_MULTIPLE * TILE_MULTIPLE
    return int(np.clip(tile, TILE_MULTIPLE, MAX_TILE))


# -- predicting into a zarr store -------------------------------------------------


def _check_channels(
    classifier: Classifier, image: da.Array, channel_axis: int | None
) -> None:
    """:func:`_check_compatible`, hinting at ``--channel-axis`` where it fits."""
    try:
        _check_compatible(classifier, image)
    except InputError as error:
        hint = (
            None if channel_axis is not None else _channel_axis_hint(classifier, image)
        )
        if hint is None:
            raise
        raise InputError(f"{error}; if its {hint}") from None


def _channel_axis_hint(classifier: Classifier, image: da.Array) -> str | None:
    """How to read a one-channel ``(1, Z, Y, X)`` image's first or last axis as the
    model's channels, where that axis has as many entries; else ``None``."""
    channels = classifier.in_channels
    if channels < 2 or image.shape[0] != 1:
        return None
    if image.shape[1] == channels:
        return (
            f"first axis ({channels} planes) holds the channels, pass --channel-axis 0"
        )
    if image.shape[-1] == channels:
        return (
            f"last axis ({channels} entries) holds the channels, pass --channel-axis -1"
        )
    return None


def resolve_channel_axis(
    classifier: Classifier,
    image_path: str | Path,
    shape: tuple[int, ...],
    given: int | None = None,
) -> int | None:
    """``given``, else the axis the file's metadata names, else the one the model
    was trained with (:func:`_trained_channel_axis`), else ``None`` (inferred)."""
    axis = channel_axis_of(image_path, given)
    return axis if axis is not None else _trained_channel_axis(classifier, shape)


def _trained_channel_axis(classifier: Classifier, shape: tuple[int, ...]) -> int | None:
    """The channel axis of the model's training images (``train --channel-axis``)
    for an image of ``shape`` laid out like them: as many dimensions, and as many
    entries on that axis as the model has channels. Else ``None``."""
    layout = classifier.provenance.get("channel_axis")
    if not isinstance(layout, dict) or layout.get("ndim") != len(shape):
        return None  # none recorded (or not as this package writes it)
    axis = layout.get("axis")
    if not isinstance(axis, int) or not 0 <= axis < len(shape):
        return None
    return axis if shape[axis] == classifier.in_channels else None


def predict_file(
    classifier: Classifier,
    image_path: str | Path,
    output: str | Path,
    outputs: Outputs = Outputs(),
    memory: int = DEFAULT_MEMORY,
    channel_axis: int | None = None,
    progress: Progress | None = None,
    scheduler: str | None = None,
) -> list[Path]:
    """Predict the image at ``image_path`` tile by tile; write .tif or .zarr results.

    A .tif ``output`` holds the classes; probabilities and uncertainty go to
    ``<stem>_probabilities.tif`` and ``<stem>_uncertainty.tif``. A .zarr ``output`` is
    a group with the arrays ``classes``, ``probabilities`` and ``uncertainty``.
    ``scheduler`` (``"local"`` or a dask scheduler address) runs the tiles on a
    dask cluster instead of this process. Returns the paths written.
    """
    output = Path(output)
    targets = _targets(output, outputs)
    check_not_overwriting(targets.values(), [Path(image_path)])
    raw = open_lazy(image_path)
    channel_axis = resolve_channel_axis(classifier, image_path, raw.shape, channel_axis)
    image = as_channels_first(raw, channel_axis)  # (C, Z, Y, X)
    _check_channels(classifier, image, channel_axis)
    # The model's policy, resolved once for the whole image (per image: one pass
    # over a subsample of its pixels), never per tile or chunk.
    normalization = classifier.normalization.for_image(image)
    tile = tile_for_memory(classifier, memory)
    scratch = _scratch_path(output)
    # In this process Ctrl-C stops between tiles, once every write has landed; a
    # cluster's workers write on their own, so there it stops the wait at once.
    held = (
        interrupts_between_steps(STOPPING)
        if scheduler is None
        else contextlib.nullcontext()
    )
    try:
        with held:
            spatial = _spatial_shape(raw.shape, channel_axis, image.shape)
            small = _results_bytes(classifier, spatial, outputs) <= memory // 16
            to_tif = not output.name.lower().endswith(".zarr")
            if small and to_tif and scheduler is None:
                store = _results_in_memory(classifier, spatial, outputs)
            else:
                store = _create_store(scratch, classifier, spatial, tile, outputs)
            if scheduler is None:
                _predict_into(classifier, image, store, tile, progress, normalization)
            else:
                from napari_dsparse.cluster import predict_into_with_dask

                predict_into_with_dask(
                    classifier, image, store, tile, scheduler, progress, normalization
                )
            if not to_tif:
                _finish_zarr(scratch, output)
            else:
                axes = _result_axes(image_path, raw.shape, channel_axis, spatial)
                _write_tifs(store, targets, tile, axes)
    except OSError as error:
        raise WriteError(os_error_message(output, error)) from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return list(targets.values())


def _write_tifs(
    store, targets: dict[str, Path], tile: int, axes: str | None = None
) -> None:
    """Each result as a .tif, the classes last: once they exist, every result is
    complete. If one cannot be written, those written before it are removed.
    ``axes``: see :func:`_write_tif_from`."""
    written: list[Path] = []
    try:
        for name, target in reversed(targets.items()):
            _write_tif_from(store[name], target, tile, axes)
            written.append(target)
    except BaseException:
        for target in written:
            target.unlink(missing_ok=True)
        raise


def _spatial_shape(
    raw_shape: tuple[int, ...], channel_axis: int | None, image_shape: tuple[int, ...]
) -> tuple[int, ...]:
    """The file's shape without its channels: that of every result (a time series
    keeps its ``T, Z`` axes, which the ``(C, Z, Y, X)`` image merged into slices)."""
    if channel_axis is not None:
        axis = channel_axis % len(raw_shape)
        shape = raw_shape[:axis] + raw_shape[axis + 1 :]
    elif len(raw_shape) == 3 and raw_shape[-1] in (1, 3, 4):  # (Y, X, 1), RGB(A)
        shape = raw_shape[:-1]
    else:
        shape = raw_shape
    assert int(np.prod(shape)) == int(np.prod(image_shape[1:])), (shape, image_shape)
    return tuple(shape)


def _predict_into(
    classifier: Classifier,
    image: da.Array,
    store,
    tile: int,
    progress: Progress | None,
    normalization: Normalization | None = None,
) -> None:
    """Fill ``store`` tile by tile in this process (dask only reads the pixels).

    ``normalization`` is the whole image's map (see :func:`predict_box`).
    """
    boxes = list(iter_tiles(image.shape[1:], tile))
    with dask.config.set(scheduler="synchronous"):
        for done, box in enumerate(boxes, start=1):
            proba = predict_box(classifier, image, box, normalization)  # (K, h, w)
            _store_tile(store, proba, box.z, (box.r0, box.r1), (box.c0, box.c1))
            stop_if_interrupted()
            if progress is not None:
                progress(done, len(boxes))


def _store_tile(store, proba: np.ndarray, z: int, rows, cols) -> None:
    """Write one tile's probabilities and what follows from them into ``store``:
    the tile of slice ``z`` (of the ``(C, Z, Y, X)`` image) goes to that slice's
    plane of the results, whose leading axes (``T, Z``, or none) ``Z`` merged."""
    region = (*_plane(z, store["classes"].shape[:-2]), slice(*rows), slice(*cols))
    classes, unsure = labels_and_uncertainty(proba)
    store["classes"][region] = classes
    if "probabilities" in store:
        store["probabilities"][(slice(None), *region)] = proba
    if "uncertainty" in store:
        store["uncertainty"][region] = unsure


def _plane(z: int, planes: tuple[int, ...]) -> tuple[int, ...]:
    """The index in the leading spatial axes ``planes`` (``()``, ``(Z,)``, ``(T, Z)``)
    of the image's slice ``z``, which ``as_channels_first`` merged them into."""
    return tuple(int(index) for index in np.unravel_index(z, planes)) if planes else ()


class MergedPlanes:
    """A result's zarr array seen as ``([K,] Z, Y, X)``, the image's slices, for
    writers that index those (``dask.array.store``); slices of ``Z`` map to planes."""

    def __init__(self, array, leading: int = 0) -> None:
        self.array, self.leading = array, leading  # leading: 1 for (K, ...)
        self.planes = tuple(array.shape[leading:-2])
        depth = int(np.prod(self.planes))
        self.shape = (*array.shape[:leading], depth, *array.shape[-2:])
        self.ndim, self.dtype = len(self.shape), array.dtype

    def __setitem__(self, region: tuple[slice, ...], values: np.ndarray) -> None:
        head, (slices, rows, cols) = region[: self.leading], region[self.leading :]
        for offset, z in enumerate(range(*slices.indices(self.shape[self.leading]))):
            plane = (*head, *_plane(z, self.planes), rows, cols)
            self.array[plane] = values[(*(slice(None) for _ in head), offset)]


def _result_layouts(
    classifier: Classifier, spatial: tuple[int, ...], outputs: Outputs
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each result ``outputs`` asks for, the classes first, for
    an image of ``spatial`` shape (without channels); the probabilities put the
    classes first."""
    layouts = {"classes": (spatial, np.dtype(class_dtype(classifier.num_classes)))}
    if outputs.probabilities:
        layouts["probabilities"] = (
            (classifier.num_classes, *spatial),
            np.dtype(np.float32),
        )
    if outputs.uncertainty:
        layouts["uncertainty"] = (spatial, np.dtype(np.float32))
    return layouts


def _results_bytes(
    classifier: Classifier, spatial: tuple[int, ...], outputs: Outputs
) -> int:
    """Bytes of every result for an image of ``spatial`` shape (without channels)."""
    layouts = _result_layouts(classifier, spatial, outputs).values()
    return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in layouts)


def _results_in_memory(
    classifier: Classifier, spatial: tuple[int, ...], outputs: Outputs
) -> dict[str, np.ndarray]:
    """:func:`_create_store`'s arrays as NumPy arrays, for results small next to the
    memory budget: a scratch zarr store costs tens of ms per file, which a folder of
    small images pays many times over."""
    layouts = _result_layouts(classifier, spatial, outputs).items()
    return {name: np.zeros(shape, dtype) for name, (shape, dtype) in layouts}


def _create_store(
    path: Path,
    classifier: Classifier,
    spatial: tuple[int, ...],
    tile: int,
    outputs: Outputs,
):
    """A zarr group with empty arrays of the image's ``spatial`` shape (its shape
    less the channels: ``(Y, X)``, ``(Z, Y, X)``, ``(T, Z, Y, X)``), chunked like the
    tiles; the probabilities have the classes first."""
    import zarr

    *planes, height, width = spatial
    group = zarr.open_group(str(path), mode="w")
    chunks = (*(1 for _ in planes), min(tile, height), min(tile, width))
    for name, (shape, dtype) in _result_layouts(classifier, spatial, outputs).items():
        leading = shape[: len(shape) - len(spatial)]  # the probabilities' classes
        group.create_array(name, shape=shape, chunks=(*leading, *chunks), dtype=dtype)
    group.attrs.update(
        class_names=list(classifier.class_names),
        class_colors=[list(color) for color in classifier.colors()],
    )
    return group


# -- writing the results ----------------------------------------------------------


def _targets(output: Path, outputs: Outputs) -> dict[str, Path]:
    """:func:`result_paths`, once the folder is checked (before any work is done)."""
    if not output.name.lower().endswith(OUTPUT_SUFFIXES):
        raise InputError(f"output {output} must end with {', '.join(OUTPUT_SUFFIXES)}")
    check_output_folder(output)
    paths = result_paths(output, outputs)
    if not output.name.lower().endswith(".zarr"):
        for path in paths.values():
            if path.is_dir():
                raise InputError(f"cannot write {path}: a folder of that name is there")
    return paths


def result_paths(output: Path, outputs: Outputs) -> dict[str, Path]:
    """The path of each result for the classes' path ``output`` (.tif or .zarr)."""
    if output.name.lower().endswith(".zarr"):
        return {"classes": output}
    return {
        kind: output
        if kind == "classes"
        else output.with_name(f"{output.stem}_{kind}{output.suffix}")
        for kind in outputs.names()
    }


def _scratch_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.part.zarr")


def _write_tif_from(array, target: Path, tile: int, axes: str | None = None) -> None:
    """Stream a result's zarr array into a tiled (Big)TIFF of its shape, atomically.

    With the classes' ``axes`` (``TZYX``...) the file is an OME-TIFF that names
    them, the probabilities' classes as ``C``, so Fiji (Bio-Formats) and tifffile
    see the time points and planes; without, a plain TIFF of that shape.
    """
    shape = array.shape
    if axes is not None:
        named = axes if array.ndim == len(axes) else "C" + axes
        options = {"ome": True, "metadata": {"axes": named}}
    else:
        options = {}
    tif_tile = next(t for t in (256, 128, 64, 32, 16) if tile % t == 0)
    nbytes = int(np.prod(array.shape)) * array.dtype.itemsize
    write_atomically(
        target,
        lambda temporary: tifffile.imwrite(
            temporary,
            data=_tif_tiles(array, tile, tif_tile),
            shape=shape,
            dtype=array.dtype,
            tile=(tif_tile, tif_tile),
            photometric="minisblack",
            compression="zlib",
            bigtiff=nbytes > 2**31,
            **options,
        ),
    )


def _result_axes(
    image_path: str | Path,
    raw_shape: tuple[int, ...],
    channel_axis: int | None,
    spatial: tuple[int, ...],
) -> str | None:
    """The axes of the classes: those the input TIFF names less its channels (a
    ``TYX`` time-lapse stays one), else ``YX``, ``ZYX`` or ``TZYX`` by their number;
    ``None`` for more axes than OME names."""
    named = tiff_axes(image_path)
    if len(named) == len(raw_shape) and channel_axis is not None:
        axis = channel_axis % len(raw_shape)
        named = named[:axis] + named[axis + 1 :]

    def nameable(axes: str) -> bool:  # as OME names the axes of one result
        unique = len(set(axes)) == len(axes) == len(spatial)
        return unique and set(axes) <= set("TZYX") and axes.endswith("YX")

    if not nameable(named):  # none, or tifffile's guesses ("SYX", "QYX"...)
        named = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(len(spatial), "")
    return named if nameable(named) else None


def _tif_tiles(array, band: int, tif_tile: int) -> Iterator[np.ndarray]:
    """TIFF tiles in file order (plane by plane, row-major), one band read at a time."""
    height, width = array.shape[-2:]
    for plane in np.ndindex(*array.shape[:-2]):
        for r0 in range(0, height, band):
            stop_if_interrupted()
            rows = np.asarray(array[(*plane, slice(r0, min(r0 + band, height)))])
            for t0 in range(0, rows.shape[0], tif_tile):
                for c0 in range(0, width, tif_tile):
                    yield rows[t0 : t0 + tif_tile, c0 : c0 + tif_tile]


def _finish_zarr(scratch: Path, output: Path) -> None:
    """Rename the finished store to ``output``, replacing an older one."""
    if output.exists():
        old = output.with_name(f".{output.name}.old")
        os.replace(output, old)
        os.replace(scratch, output)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(scratch, output)


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Progress | None]:
    """A terminal progress bar (tqdm, on stderr) as a ``progress(done, total)``;
    ``None`` when not ``enabled`` (so a dask cluster's bar stays off too)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="tile", leave=False)
    try:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update
    finally:
        bar.close()
