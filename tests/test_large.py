"""Prediction at any size: lazy formats, memory-sized tiles, safe incremental writes."""

from __future__ import annotations

import errno
import os
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from napari_dsparse import large
from napari_dsparse.data import InputError, as_channels_first
from napari_dsparse.large import (
    Outputs,
    open_lazy,
    parse_memory,
    predict_file,
    tile_for_memory,
)
from napari_dsparse.predict import labels_and_uncertainty, predict_proba

SMALL_MEMORY = 4 * 2**20  # tiles of 32 x 32 for the fast preset: many tiles


@pytest.fixture
def picture(rng) -> np.ndarray:
    """A (70, 90) uint16 image: large enough for several small tiles."""
    rows, cols = np.mgrid[:70, :90]
    disc = (rows - 35) ** 2 + (cols - 40) ** 2 < 20**2
    return (rng.normal(1000, 150, (70, 90)) + 900 * disc).clip(0).astype(np.uint16)


@pytest.fixture
def classifier(make_classifier, picture):
    return make_classifier(as_channels_first(picture), num_classes=3, seed=2)


def _whole(classifier, image: np.ndarray):
    """Classes, probabilities and uncertainty of one untiled pass (2D results)."""
    proba = predict_proba(classifier, as_channels_first(image), tile=4096)
    classes, unsure = labels_and_uncertainty(proba)
    return classes[0], proba[:, 0], unsure[0]


def _write_input(kind: str, image: np.ndarray, folder: Path) -> Path:
    if kind == "tiled BigTIFF":
        path = folder / "image.tif"
        tifffile.imwrite(path, image, tile=(32, 32), bigtiff=True, compression="zlib")
    elif kind == "striped TIFF":
        path = folder / "image.tiff"
        tifffile.imwrite(path, image, rowsperstrip=8)
    elif kind == "npy":
        path = folder / "image.npy"
        np.save(path, image)
    elif kind == "png":
        path = folder / "image.png"
        from skimage.io import imsave

        imsave(path, image, check_contrast=False)
    elif kind == "zarr":
        path = folder / "image.zarr"
        zarr.create_array(str(path), data=image, chunks=(16, 64))
    else:  # OME-Zarr: a group whose multiscales metadata names level "0"
        path = folder / "image.ome.zarr"
        group = zarr.open_group(str(path), mode="w")
        group.create_array("0", data=image, chunks=(32, 32))
        group.create_array("1", data=image[::2, ::2], chunks=(32, 32))
        group.attrs["multiscales"] = [
            {"version": "0.4", "datasets": [{"path": "0"}, {"path": "1"}]}
        ]
    return path


@pytest.mark.parametrize(
    "kind", ["tiled BigTIFF", "striped TIFF", "npy", "png", "zarr", "OME-Zarr"]
)
def test_many_tiles_equal_one_whole_pass(kind, picture, classifier, tmp_path) -> None:
    image = (picture // 16).astype(np.uint8) if kind == "png" else picture
    path = _write_input(kind, image, tmp_path)
    written = predict_file(
        classifier,
        path,
        tmp_path / "out.tif",
        Outputs(probabilities=True, uncertainty=True),
        memory=SMALL_MEMORY,
    )
    classes, proba, unsure = _whole(classifier, image)
    assert [p.name for p in written] == [
        "out.tif",
        "out_probabilities.tif",
        "out_uncertainty.tif",
    ]
    np.testing.assert_array_equal(tifffile.imread(written[0]), classes)
    np.testing.assert_allclose(tifffile.imread(written[1]), proba, atol=1e-6)
    np.testing.assert_allclose(tifffile.imread(written[2]), unsure, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("preset", ["pixel", "fast", "wide"])
def test_tiles_stop_shrinking_at_the_smallest_tile_need(
    make_classifier, picture, preset
) -> None:
    """Below ``smallest_tile_memory`` (what ``predict --memory`` warns of) no budget
    gives a smaller tile; above it tiles grow in steps of 16 px, for every preset."""
    classifier = make_classifier(as_channels_first(picture), preset=preset)
    need = large.smallest_tile_memory(classifier)
    assert tile_for_memory(classifier, need) == large.TILE_MULTIPLE
    assert tile_for_memory(classifier, need // 10) == large.TILE_MULTIPLE
    window = 2 * large.TILE_MULTIPLE + 2 * classifier.halo
    next_need = large.activation_bytes_per_pixel(classifier) * window**2
    assert tile_for_memory(classifier, next_need - 1) == large.TILE_MULTIPLE
    assert tile_for_memory(classifier, next_need) == 2 * large.TILE_MULTIPLE


def test_the_small_budget_really_makes_many_tiles(classifier, picture) -> None:
    tile = tile_for_memory(classifier, SMALL_MEMORY)
    assert tile % 16 == 0
    assert np.ceil(70 / tile) * np.ceil(90 / tile) >= 4


def test_tiles_grow_with_the_budget_and_fit_it(classifier) -> None:
    small, default = (tile_for_memory(classifier, m) for m in (2**27, 2**30))
    assert small < default <= large.MAX_TILE
    window = default + 2 * classifier.halo
    assert window**2 * large.activation_bytes_per_pixel(classifier) <= 2**30


class PeakTensorBytes(TorchDispatchMode):
    """Most bytes held at once by the tensors that torch ops return inside the mode.

    Views share their storage, counted once; a storage is freed when the last
    tensor on it is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, list[int]] = {}  # data pointer -> [bytes, tensors]

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.storages:
                    self.storages[key] = [storage.nbytes(), 0]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.storages[key][1] += 1
                weakref.finalize(tensor, self._release, key)
        return out


@pytest.mark.parametrize("preset", ["pixel", "fast"])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_tile_estimate_covers_every_tensor_of_a_tile(
    make_classifier, rng, preset, channels
) -> None:
    tile = 128
    image = rng.random((channels, 1, tile, tile)).astype(np.float32)
    classifier = make_classifier(image, num_classes=3, preset=preset, seed=0)
    with PeakTensorBytes() as measured:
        predict_proba(classifier, image, tile=tile)
    assert measured.live == 0  # every tensor was counted out again
    window = (tile + 2 * classifier.halo) ** 2
    assert 0 < measured.peak <= window * large.activation_bytes_per_pixel(classifier)


def test_zarr_output_and_a_3d_stack(classifier, rng, tmp_path) -> None:
    stack = rng.integers(500, 3000, (3, 40, 50), dtype=np.uint16)
    tifffile.imwrite(
        tmp_path / "stack.tif", stack, tile=(16, 16), photometric="minisblack"
    )
    predict_file(
        classifier,
        tmp_path / "stack.tif",
        tmp_path / "out.zarr",
        Outputs(uncertainty=True),
        memory=SMALL_MEMORY,
    )
    result = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    proba = predict_proba(classifier, as_channels_first(stack))
    classes, unsure = labels_and_uncertainty(proba)
    np.testing.assert_array_equal(result["classes"][:], classes)
    np.testing.assert_allclose(result["uncertainty"][:], unsure, atol=1e-6)
    assert result.attrs["class_names"] == list(classifier.class_names)
    assert "probabilities" not in result


def test_a_stack_as_tif_keeps_its_shape(classifier, rng, tmp_path) -> None:
    stack = rng.integers(500, 3000, (2, 30, 40), dtype=np.uint16)
    np.save(tmp_path / "stack.npy", stack)
    [path] = predict_file(classifier, tmp_path / "stack.npy", tmp_path / "o.tif")
    assert tifffile.imread(path).shape == (2, 30, 40)


def test_an_existing_zarr_output_is_replaced(classifier, picture, tmp_path) -> None:
    np.save(tmp_path / "a.npy", picture)
    for _ in range(2):
        predict_file(classifier, tmp_path / "a.npy", tmp_path / "out.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "out.zarr"]


def test_interrupted_prediction_leaves_no_output(classifier, picture, tmp_path) -> None:
    np.save(tmp_path / "a.npy", picture)

    def interrupt(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    for output in ("out.tif", "out.zarr"):
        with pytest.raises(KeyboardInterrupt):
            predict_file(
                classifier,
                tmp_path / "a.npy",
                tmp_path / output,
                Outputs(probabilities=True),
                memory=SMALL_MEMORY,
                progress=interrupt,
            )
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


@pytest.mark.parametrize(
    ("failure", "expected", "message"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), InputError, "disk is full"),
        (KeyboardInterrupt(), KeyboardInterrupt, None),  # Ctrl-C while writing
    ],
    ids=["full disk", "Ctrl-C"],
)
def test_results_written_before_a_failure_are_removed(
    classifier, picture, tmp_path, monkeypatch, failure, expected, message
) -> None:
    """The classes go last; if they fail, no uncertainty file says otherwise."""
    np.save(tmp_path / "a.npy", picture)
    write = large.tifffile.imwrite

    def failing_for_the_classes(path, *args, **kwargs):
        if ".out.tif." in Path(path).name:  # the classes' temporary file
            raise failure
        return write(path, *args, **kwargs)

    monkeypatch.setattr(large.tifffile, "imwrite", failing_for_the_classes)
    outputs = Outputs(probabilities=True, uncertainty=True)
    with pytest.raises(expected, match=message):
        predict_file(classifier, tmp_path / "a.npy", tmp_path / "out.tif", outputs)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


@pytest.mark.parametrize("taken", ["out.tif", "out_uncertainty.tif"])
def test_a_folder_where_a_result_goes_fails_before_any_work(
    classifier, picture, tmp_path, taken
) -> None:
    np.save(tmp_path / "a.npy", picture)
    (tmp_path / taken).mkdir()
    with pytest.raises(InputError, match="a folder of that name is there"):
        predict_file(
            classifier,
            tmp_path / "a.npy",
            tmp_path / "out.tif",
            Outputs(uncertainty=True),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", taken]


def test_a_full_disk_is_a_one_line_error(
    classifier, picture, tmp_path, monkeypatch
) -> None:
    np.save(tmp_path / "a.npy", picture)

    def full_disk(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(large.tifffile, "imwrite", full_disk)
    with pytest.raises(InputError, match="disk is full"):
        predict_file(classifier, tmp_path / "a.npy", tmp_path / "out.tif")
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_a_missing_output_folder_fails_before_any_work(
    classifier, picture, tmp_path
) -> None:
    np.save(tmp_path / "a.npy", picture)
    with pytest.raises(InputError, match="does not exist"):
        predict_file(classifier, tmp_path / "a.npy", tmp_path / "no" / "out.tif")


def _hyperstack(kind: str, series: np.ndarray, folder: Path) -> Path:
    """``series`` (T, Z, C, Y, X) in a file whose metadata names the channel axis."""
    if kind == "ImageJ TIFF":
        path = folder / "series.tif"
        tifffile.imwrite(path, series, imagej=True, metadata={"axes": "TZCYX"})
    elif kind == "OME-TIFF":
        path = folder / "series.ome.tif"
        tifffile.imwrite(path, series, metadata={"axes": "TZCYX"})
    else:  # OME-Zarr 0.4: typed axes; bioformats2raw: as its series "0"
        path = folder / "series.ome.zarr"
        group = zarr.open_group(str(path), mode="w")
        if kind == "bioformats2raw":
            group.attrs["bioformats2raw.layout"] = 3
            group = group.create_group("0")
        group.create_array("0", data=series, chunks=(1, 1, 2, 32, 32))
        names = [("t", "time"), ("z", "space"), ("c", "channel")]
        names += [("y", "space"), ("x", "space")]
        axes = [{"name": name, "type": kind} for name, kind in names]
        group.attrs["multiscales"] = [
            {"version": "0.4", "axes": axes, "datasets": [{"path": "0"}]}
        ]
    return path


def _bioformats2raw(path: Path, series: list[np.ndarray]) -> None:
    """bioformats2raw's layout: a root group naming it, one OME-Zarr group per
    series (``0``, ``1``...), each with its own multiscales."""
    root = zarr.open_group(str(path), mode="w")
    root.attrs["bioformats2raw.layout"] = 3
    for index, image in enumerate(series):
        group = root.create_group(str(index))
        group.create_array("0", data=image, chunks=(32, 32))
        group.create_array("1", data=image[::2, ::2], chunks=(32, 32))
        group.attrs["multiscales"] = [
            {"version": "0.4", "datasets": [{"path": "0"}, {"path": "1"}]}
        ]


def test_zarr_groups_give_the_array_they_hold(picture, tmp_path) -> None:
    """One array without metadata is read; bioformats2raw gives its first series'
    full resolution; an array inside a store is named by its path."""
    one = tmp_path / "one.zarr"
    zarr.open_group(str(one), mode="w").create_array("raw", data=picture)
    np.testing.assert_array_equal(open_lazy(one).compute(), picture)
    converted = tmp_path / "converted.zarr"
    _bioformats2raw(converted, [picture, picture[::-1]])
    np.testing.assert_array_equal(open_lazy(converted).compute(), picture)
    second = open_lazy(converted / "1").compute()
    np.testing.assert_array_equal(second, picture[::-1])
    np.testing.assert_array_equal(open_lazy(converted / "1" / "1"), picture[::-2, ::2])


@pytest.mark.parametrize("kind", ["arrays", "groups"])
def test_a_zarr_group_of_several_images_asks_which(picture, tmp_path, kind) -> None:
    """Several arrays (or groups) and no multiscales: an error that names them and
    the path to give, not the alphabetically first one read silently."""
    path = tmp_path / "several.zarr"
    root = zarr.open_group(str(path), mode="w")
    for name in ("raw", "mask"):
        holder = root if kind == "arrays" else root.create_group(name)
        holder.create_array(name if kind == "arrays" else "0", data=picture)
    with pytest.raises(InputError) as raised:
        open_lazy(path)
    assert f"holds 2 {kind} (mask, raw)" in str(raised.value)
    assert str(path / "mask") in str(raised.value)
    named = open_lazy(path / "raw").compute()
    np.testing.assert_array_equal(named, picture)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_folder_of_chunks_names_its_array(picture, tmp_path, zarr_format) -> None:
    """A path into an array's chunk folders gets the array to give, not zarr's
    "no group found"."""
    store = tmp_path / "plate.zarr"
    root = zarr.open_group(str(store), mode="w", zarr_format=zarr_format)
    keys = {"name": "v2" if zarr_format == 2 else "default", "separator": "/"}
    root.create_array("raw", data=picture, chunks=(32, 32), chunk_key_encoding=keys)
    chunks = next(p for p in sorted((store / "raw").rglob("*")) if p.is_dir())
    with pytest.raises(InputError) as raised:
        open_lazy(chunks)
    assert str(raised.value) == (
        f"{chunks} is a folder of chunks of the zarr array {store / 'raw'}: "
        f"give {store / 'raw'} itself"
    )
    np.testing.assert_array_equal(open_lazy(store / "raw").compute(), picture)


def test_a_multiscales_dataset_the_store_lacks_is_named(picture, tmp_path) -> None:
    path = tmp_path / "broken.ome.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", data=picture)
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "s0"}]}]
    with pytest.raises(InputError, match="names the dataset 's0', which the store"):
        open_lazy(path)


@pytest.mark.parametrize(
    "kind", ["ImageJ TIFF", "OME-TIFF", "OME-Zarr", "bioformats2raw"]
)
def test_channels_named_in_the_file_need_no_channel_axis(
    make_classifier, picture, tmp_path, kind
) -> None:
    series = np.stack([picture, picture[::-1]], axis=0)  # (C, Y, X)
    series = np.stack([np.stack([series, series // 2, series // 3])] * 2)  # T, Z
    path = _hyperstack(kind, series, tmp_path)
    two_channels = make_classifier(as_channels_first(series[0, 0], channel_axis=0))
    predict_file(two_channels, path, tmp_path / "named.tif")
    predict_file(two_channels, path, tmp_path / "given.tif", channel_axis=2)
    named = tifffile.imread(tmp_path / "named.tif")
    assert named.shape == (2, 3, 70, 90)  # T, Z, Y, X: the file's axes but C
    np.testing.assert_array_equal(named, tifffile.imread(tmp_path / "given.tif"))
    expected, _ = labels_and_uncertainty(
        predict_proba(two_channels, as_channels_first(series[1, 2], channel_axis=0))
    )
    np.testing.assert_array_equal(named[1, 2], expected[0])


def _saved_image(make_classifier, rng, tmp_path: Path, shape: tuple[int, ...]):
    """A random image of ``shape`` saved as ``image.npy`` (channel axis 2 for 5D),
    with its channel axis and a 3-class classifier for it."""
    channel_axis = 2 if len(shape) == 5 else None
    image = rng.integers(0, 4000, shape, dtype=np.uint16)
    np.save(tmp_path / "image.npy", image)
    classifier = make_classifier(
        as_channels_first(image, channel_axis), num_classes=3, seed=2
    )
    return channel_axis, classifier


@pytest.mark.parametrize("shape", [(70, 90), (3, 70, 90), (2, 3, 2, 70, 90)])
def test_zarr_results_have_the_shape_of_the_tif_results(
    make_classifier, rng, tmp_path, shape
) -> None:
    # A 2D image, a (Z, Y, X) stack and a (T, Z, C, Y, X) series (channel axis 2).
    channel_axis, classifier = _saved_image(make_classifier, rng, tmp_path, shape)
    outputs = Outputs(probabilities=True, uncertainty=True)
    for name in ("out.tif", "out.zarr"):
        predict_file(
            classifier,
            tmp_path / "image.npy",
            tmp_path / name,
            outputs,
            memory=SMALL_MEMORY,
            channel_axis=channel_axis,
        )
    spatial = shape[:2] + shape[3:] if channel_axis == 2 else shape
    result = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    for name in ("classes", "probabilities", "uncertainty"):
        tif = tmp_path / ("out.tif" if name == "classes" else f"out_{name}.tif")
        expected = tifffile.imread(tif)
        assert expected.shape == ((3,) if name == "probabilities" else ()) + spatial
        np.testing.assert_array_equal(result[name][:], expected)


@pytest.mark.parametrize("shape", [(70, 90), (2, 3, 2, 70, 90)])
def test_results_held_in_memory_equal_those_streamed_through_a_store(
    make_classifier, rng, tmp_path, monkeypatch, shape
) -> None:
    """Small results skip the scratch zarr store; the files are the same."""
    channel_axis, classifier = _saved_image(make_classifier, rng, tmp_path, shape)
    stores, create_store = [], large._create_store
    monkeypatch.setattr(
        large, "_create_store", lambda *a: stores.append(a) or create_store(*a)
    )
    outputs = Outputs(probabilities=True, uncertainty=True)
    for name, size in (("memory.tif", 0), ("store.tif", 2**62)):
        monkeypatch.setattr(large, "_results_bytes", lambda *_, size=size: size)
        predict_file(
            classifier,
            tmp_path / "image.npy",
            tmp_path / name,
            outputs,
            memory=SMALL_MEMORY,  # many tiles
            channel_axis=channel_axis,
        )
    assert len(stores) == 1  # the second only
    for kind in ("", "_probabilities", "_uncertainty"):
        with (
            tifffile.TiffFile(tmp_path / f"memory{kind}.tif") as held,
            tifffile.TiffFile(tmp_path / f"store{kind}.tif") as streamed,
        ):
            for attribute in ("axes", "dtype", "shape"):
                left = getattr(held.series[0], attribute)
                assert left == getattr(streamed.series[0], attribute)
            np.testing.assert_array_equal(held.asarray(), streamed.asarray())


@pytest.mark.parametrize(
    ("axes", "shape", "expected"),
    [
        ("TZCYX", (2, 3, 2, 40, 50), "TZYX"),  # an ImageJ hyperstack
        ("TYX", (3, 40, 50), "TYX"),  # a time-lapse stays one, not planes
        (None, (3, 40, 50), "ZYX"),  # a plain stack
        (None, (40, 50), "YX"),
    ],
)
def test_result_tifs_name_their_axes(
    make_classifier, rng, tmp_path, axes, shape, expected
) -> None:
    image = rng.integers(0, 4000, shape, dtype=np.uint16)
    metadata = {"axes": axes} if axes else None
    tifffile.imwrite(
        tmp_path / "in.tif",
        image,
        imagej=bool(axes),
        metadata=metadata,
        photometric="minisblack",
    )
    channel_axis = axes.index("C") if axes and "C" in axes else None
    classifier = make_classifier(
        as_channels_first(image, channel_axis), num_classes=3, seed=3
    )
    outputs = Outputs(probabilities=True)
    predict_file(classifier, tmp_path / "in.tif", tmp_path / "out.tif", outputs)
    for name, named in (
        ("out.tif", expected),
        ("out_probabilities.tif", "C" + expected),
    ):
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tif.is_ome and tif.series[0].axes == named
            assert tif.series[0].shape == tif.asarray().shape
    spatial = shape[:2] + shape[3:] if channel_axis == 2 else shape
    assert tifffile.imread(tmp_path / "out.tif").shape == spatial


def test_tiff_samples_other_than_rgb_are_channels(
    make_classifier, picture, tmp_path
) -> None:
    pair = np.stack([picture, picture[::-1]], axis=-1)  # (Y, X, 2): "YXS"
    tifffile.imwrite(
        tmp_path / "two.tif", pair, photometric="minisblack", planarconfig="contig"
    )
    two_channels = make_classifier(as_channels_first(pair, channel_axis=-1))
    predict_file(two_channels, tmp_path / "two.tif", tmp_path / "named.tif")
    predict_file(
        two_channels, tmp_path / "two.tif", tmp_path / "given.tif", channel_axis=-1
    )
    named = tifffile.imread(tmp_path / "named.tif")
    assert named.shape == (70, 90)  # not 70 planes of 90 x 2 pixels
    np.testing.assert_array_equal(named, tifffile.imread(tmp_path / "given.tif"))


@pytest.mark.parametrize("output", ["a.tif", "a_probabilities.tif"])
def test_the_image_is_never_an_output(classifier, picture, tmp_path, output) -> None:
    image = tmp_path / output  # the classes' path, or that of their probabilities
    tifffile.imwrite(image, picture)
    with pytest.raises(InputError, match="would overwrite the input"):
        predict_file(classifier, image, tmp_path / "a.tif", Outputs(probabilities=True))
    assert tifffile.imread(image).tolist() == picture.tolist()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_folder(classifier, picture, tmp_path) -> None:
    np.save(tmp_path / "a.npy", picture)
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(InputError, match="not writable"):
        predict_file(classifier, tmp_path / "a.npy", tmp_path / "ro" / "out.tif")


def test_channel_mismatch(classifier, rng, tmp_path) -> None:
    np.save(tmp_path / "rgb.npy", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="expects 1 channel"):
        predict_file(classifier, tmp_path / "rgb.npy", tmp_path / "out.tif")


def test_planes_that_may_be_channels_get_a_hint(make_classifier, rng, tmp_path) -> None:
    planes = rng.integers(0, 255, (2, 20, 20), dtype=np.uint8)
    np.save(tmp_path / "planes.npy", planes)
    two_channels = make_classifier(as_channels_first(planes, channel_axis=0))
    with pytest.raises(InputError, match=r"first axis \(2 planes\).*--channel-axis 0"):
        predict_file(two_channels, tmp_path / "planes.npy", tmp_path / "out.tif")
    predict_file(
        two_channels, tmp_path / "planes.npy", tmp_path / "out.tif", channel_axis=0
    )
    assert tifffile.imread(tmp_path / "out.tif").shape == (20, 20)


def test_a_last_axis_that_may_be_channels_gets_a_hint(
    make_classifier, rng, tmp_path
) -> None:
    pixels = rng.integers(0, 255, (20, 20, 2), dtype=np.uint8)  # napari: 20 planes
    np.save(tmp_path / "two.npy", pixels)
    two_channels = make_classifier(as_channels_first(pixels, channel_axis=-1))
    with pytest.raises(InputError, match=r"last axis \(2 entries\).*--channel-axis -1"):
        predict_file(two_channels, tmp_path / "two.npy", tmp_path / "out.tif")
    predict_file(
        two_channels, tmp_path / "two.npy", tmp_path / "out.tif", channel_axis=-1
    )
    assert tifffile.imread(tmp_path / "out.tif").shape == (20, 20)


def test_the_training_channel_axis_applies_to_images_laid_out_alike(
    make_classifier, rng, tmp_path
) -> None:
    planes = rng.integers(0, 255, (2, 20, 20), dtype=np.uint8)
    np.save(tmp_path / "planes.npy", planes)
    two_channels = make_classifier(as_channels_first(planes, channel_axis=0))
    two_channels.provenance["channel_axis"] = {"ndim": 3, "axis": 0}
    predict_file(two_channels, tmp_path / "planes.npy", tmp_path / "out.tif")
    predict_file(
        two_channels, tmp_path / "planes.npy", tmp_path / "given.tif", channel_axis=0
    )
    assert np.array_equal(
        tifffile.imread(tmp_path / "out.tif"), tifffile.imread(tmp_path / "given.tif")
    )
    assert tifffile.imread(tmp_path / "out.tif").shape == (20, 20)
    # Laid out otherwise (channels last, or a stack of 2D planes): not applied.
    np.save(tmp_path / "last.npy", np.moveaxis(planes, 0, -1))
    with pytest.raises(InputError, match=r"last axis \(2 entries\).*-1"):
        predict_file(two_channels, tmp_path / "last.npy", tmp_path / "last.tif")
    np.save(tmp_path / "stack.npy", planes[:, None])  # (2, 1, 20, 20): 4D
    with pytest.raises(InputError, match="give the channel axis"):
        predict_file(two_channels, tmp_path / "stack.npy", tmp_path / "stack.tif")
    for damaged in ({"ndim": 3, "axis": 7}, {"ndim": 3}, [3, 0], None):
        two_channels.provenance["channel_axis"] = damaged  # ignored, never a crash
        with pytest.raises(InputError, match=r"first axis \(2 planes\)"):
            predict_file(two_channels, tmp_path / "planes.npy", tmp_path / "d.tif")


def test_an_image_without_planes_is_refused(classifier, tmp_path) -> None:
    np.save(tmp_path / "empty.npy", np.zeros((0, 20, 20), np.uint16))
    with pytest.raises(InputError, match="the image has 0 planes"):
        predict_file(classifier, tmp_path / "empty.npy", tmp_path / "out.tif")
    assert [p.name for p in tmp_path.iterdir()] == ["empty.npy"]


def test_a_grayscale_model_gives_no_channel_hint(classifier, tmp_path) -> None:
    np.save(tmp_path / "empty.npy", np.zeros((0, 5), np.float32))
    with pytest.raises(InputError, match=r"0 x 5 pixels: it has no pixels") as error:
        predict_file(classifier, tmp_path / "empty.npy", tmp_path / "out.tif")
    assert "channel" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.tif", b"not a tiff at all", "cannot read"),
        ("bad.npy", b"\x93NUMPY garbage", "cannot read"),
        ("image.gif", b"", "unsupported file type"),
        ("image.jpg", b"not a jpeg", "cannot identify image file"),
        ("missing.tif", None, "does not exist"),
    ],
)
def test_unreadable_inputs(tmp_path, name, content, message) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        open_lazy(tmp_path / name)


def test_an_output_of_another_type(classifier, picture, tmp_path) -> None:
    np.save(tmp_path / "a.npy", picture)
    with pytest.raises(InputError, match="must end with"):
        predict_file(classifier, tmp_path / "a.npy", tmp_path / "out.png")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1GB", 2**30), ("512M", 2**29), ("64 MiB", 2**26), ("2e9", 2 * 10**9)],
)
def test_parse_memory(text, expected) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "0"])
def test_parse_memory_rejects(text) -> None:
    with pytest.raises(InputError):
        parse_memory(text)


@pytest.mark.parametrize("kind", ["tiled BigTIFF", "npy", "zarr"])
def test_per_image_normalisation_of_another_image_equals_predict_proba(
    classifier, picture, tmp_path, kind
) -> None:
    """Another brightness and contrast: the file's own percentiles, once, all tiles."""
    assert classifier.normalization.policy == "per_image"
    brighter = (picture.astype(np.float32) * 3 + 5000).astype(np.uint16)
    source = _write_input(kind, brighter, tmp_path)
    outputs = Outputs(probabilities=True)
    paths = predict_file(
        classifier, source, tmp_path / "out.tif", outputs, memory=SMALL_MEMORY
    )
    assert tile_for_memory(classifier, SMALL_MEMORY) < picture.shape[0]  # tiled
    classes, proba, _ = _whole(classifier, brighter)
    np.testing.assert_allclose(tifffile.imread(paths[1]), proba, atol=1e-5)
    np.testing.assert_array_equal(tifffile.imread(paths[0]), classes)
    # the stored map (the training image's percentiles) gives other numbers
    classifier.normalization = replace(classifier.normalization, policy="fixed")
    _, fixed, _ = _whole(classifier, brighter)
    assert np.abs(fixed - proba).max() > 1e-3
