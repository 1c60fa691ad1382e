"""Command line with several images: train on pairs, predict folders and globs."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from napari_dsparse.cli import main
from napari_dsparse.export import load_classifier
from napari_dsparse.large import smallest_tile_memory
from napari_dsparse.samples import coins_sample


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def pairs(tmp_path):
    """Two crops of the coins sample of different sizes, with labels; one as .npy."""
    image, labels = coins_sample()
    labels = labels.copy()
    labels[60:63, 40:60] = 2
    first = (image[:96, :128], labels[:96, :128])
    second = (image[100:160, 150:300], labels[100:160, 150:300])
    tifffile.imwrite(tmp_path / "a.tif", first[0])
    np.save(tmp_path / "a_labels.npy", first[1])
    np.save(tmp_path / "b.npy", second[0])
    tifffile.imwrite(tmp_path / "b_labels.tif", second[1])
    return tmp_path


@pytest.fixture
def model(pairs, capsys):
    path = pairs / "model.pt"
    code, _, _ = run(
        capsys,
        "train",
        pairs / "a.tif",
        pairs / "a_labels.npy",
        "-o",
        path,
        "--steps",
        "2",
    )
    assert code == 0
    return path


def test_train_on_pairs_of_different_sizes(pairs, capsys) -> None:
    model = pairs / "model.pt"
    code, out, err = run(
        capsys,
        "train",
        "--pair",
        pairs / "a.tif",
        pairs / "a_labels.npy",
        "--pair",
        pairs / "b.npy",
        pairs / "b_labels.tif",
        "-o",
        model,
        "--steps",
        "3",
    )
    assert code == 0, err
    assert "from 2 image(s)" in out
    classifier = load_classifier(model)
    assert classifier.provenance["images"] == ["a.tif", "b.npy"]
    assert classifier.normalization.policy == "per_image"


def test_single_form_and_pairs_combine_and_fixed_normalization(pairs, capsys) -> None:
    model = pairs / "model.pt"
    code, out, _ = run(
        capsys,
        "train",
        pairs / "a.tif",
        pairs / "a_labels.npy",
        "--pair",
        pairs / "b.npy",
        pairs / "b_labels.tif",
        "--normalization",
        "fixed",
        "-o",
        model,
        "--steps",
        "1",
    )
    assert code == 0 and "from 2 image(s)" in out
    assert load_classifier(model).normalization.policy == "fixed"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("a.tif",), "labels file too"),
        ((), "IMAGE LABELS"),
        (
            ("--pair", "a.tif", "a_labels.npy", "--pair", "rgb.tif", "a_labels.npy"),
            "same channels",
        ),
        (
            ("a.tif", "a_labels.npy", "--pair", "a.tif", "a_labels.npy"),
            "a_labels.npy is given twice",
        ),
        (
            ("--pair", "a.tif", "a_labels.npy", "--pair", "link.tif", "a_labels.npy"),
            "link.tif",  # another name for a.tif
        ),
    ],
)
def test_bad_pairs_are_one_line_and_exit_2(pairs, capsys, argv, message) -> None:
    rgb = np.stack([tifffile.imread(pairs / "a.tif")] * 3, axis=-1)
    tifffile.imwrite(pairs / "rgb.tif", rgb)
    (pairs / "link.tif").symlink_to(pairs / "a.tif")
    argv = [pairs / a if "." in a else a for a in argv]
    code, _, err = run(capsys, "train", *argv, "-o", pairs / "m.pt", "--steps", "1")
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and not (pairs / "m.pt").exists()


def test_predict_a_folder_skips_unreadable_files_and_exits_1(
    pairs, model, capsys
) -> None:
    folder = pairs / "inputs"
    folder.mkdir()
    first = tifffile.imread(pairs / "a.tif")
    tifffile.imwrite(folder / "one.tif", first)
    np.save(folder / "two.npy", np.load(pairs / "b.npy"))
    (folder / "broken.tif").write_bytes(b"not a tiff at all")
    (folder / "notes.txt").write_text("not an image")
    code, out, err = run(capsys, "predict", model, folder, "-o", pairs / "results")
    assert code == 1
    written = sorted(p.name for p in (pairs / "results").iterdir())
    assert written == ["one.tif", "two.tif"]
    assert tifffile.imread(pairs / "results" / "two.tif").shape == (60, 150)
    pixels = first.size + 60 * 150
    assert f"3 file(s): 2 predicted, 1 failed; {pixels:,} pixels" in out
    assert "failed:" not in out  # failures go to stderr, one line each
    failures = [line for line in err.splitlines() if "failed:" in line]
    assert len(failures) == 1
    broken = folder / "broken.tif"
    line = failures[0]
    assert line.startswith(f"napari-dsparse predict: failed: cannot read {broken}")
    assert line.count(str(broken)) == 1  # named once, by the reason
    assert "predict" in err  # the progress bar


def test_predict_arrays_named_inside_a_zarr_store(pairs, model, capsys) -> None:
    """``store.zarr/name`` picks one of several arrays; its results are named after
    the store and the array; the store alone fails in one line that names them."""
    import zarr

    store = pairs / "plate.zarr"
    root = zarr.open_group(str(store), mode="w")
    first = tifffile.imread(pairs / "a.tif")
    root.create_array("raw", data=first)
    root.create_array("mask", data=(first > first.mean()).astype(np.uint8))
    results = pairs / "results"
    code, out, err = run(capsys, "predict", model, store / "raw", store, "-o", results)
    assert code == 1 and "2 file(s): 1 predicted, 1 failed" in out
    assert sorted(p.name for p in results.iterdir()) == ["plate_raw.tif"]
    assert tifffile.imread(results / "plate_raw.tif").shape == first.shape
    failures = [line for line in err.splitlines() if "failed:" in line]
    assert failures == [
        f"napari-dsparse predict: failed: {store} holds 2 arrays (mask, raw) "
        f"and no multiscales metadata: name the one to read, such as {store / 'mask'}"
    ]


def test_results_never_replace_the_store_that_holds_the_input(
    pairs, model, capsys
) -> None:
    """A .zarr output is replaced whole, so it must not be the input's own store."""
    import zarr

    store = pairs / "plate.zarr"
    first = tifffile.imread(pairs / "a.tif")
    zarr.open_group(str(store), mode="w").create_array("raw", data=first)
    code, _, err = run(capsys, "predict", model, store / "raw", "-o", store)
    assert code == 2
    assert f"the output {store} would overwrite the input {store / 'raw'}" in err
    np.testing.assert_array_equal(zarr.open_array(str(store / "raw"))[:], first)


def test_train_on_an_ome_zarr_and_its_labels(pairs, capsys) -> None:
    """An OME-Zarr image and the labels stored in it (``labels/NAME``) train as the
    same pixels in .tif and .npy files do."""
    import zarr

    image = tifffile.imread(pairs / "a.tif")
    labels = np.load(pairs / "a_labels.npy")
    store = pairs / "a.ome.zarr"
    root = zarr.open_group(str(store), mode="w")
    root.create_array("0", data=image, chunks=(32, 32))
    root.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
    scribbles = root.create_group("labels").create_group("scribbles")
    scribbles.create_array("0", data=labels, chunks=(32, 32))
    scribbles.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
    for name, pair in (
        ("zarr.pt", (store, store / "labels" / "scribbles")),
        ("files.pt", (pairs / "a.tif", pairs / "a_labels.npy")),
    ):
        code, _, err = run(
            capsys, "train", *pair, "-o", pairs / name, "--steps", "3", "--seed", "1"
        )
        assert code == 0, err
    from_zarr = load_classifier(pairs / "zarr.pt")
    from_files = load_classifier(pairs / "files.pt")
    for left, right in zip(
        from_zarr.patch_net.state_dict().values(),
        from_files.patch_net.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(left, right)


def test_a_folder_made_for_results_that_all_failed_is_removed(
    pairs, model, capsys
) -> None:
    (pairs / "broken.tif").write_bytes(b"not a tiff at all")
    (pairs / "kept").mkdir()  # a folder that was there stays, even if empty
    for folder in ("new", "kept"):
        code, out, _ = run(
            capsys, "predict", model, pairs / "broken.tif", "-o", pairs / folder
        )
        assert code == 1 and "0 predicted, 1 failed" in out
    assert not (pairs / "new").exists() and (pairs / "kept").is_dir()


def test_results_for_one_image_into_an_existing_file_of_another_kind(
    pairs, model, capsys
) -> None:
    code, _, err = run(capsys, "predict", model, pairs / "a.tif", "-o", model)
    assert code == 2 and f"{model} is a file, not a folder" in err
    assert err.count("\n") == 1


def test_predict_a_glob_pattern(pairs, model, capsys) -> None:
    code, out, _ = run(
        capsys, "predict", model, str(pairs / "*.npy"), "-o", pairs / "results"
    )
    assert code == 0
    # a_labels.npy and b.npy match the pattern; a_labels is an image of 0/1/2 values
    assert sorted(p.name for p in (pairs / "results").iterdir()) == [
        "a_labels.tif",
        "b.tif",
    ]
    assert "2 file(s): 2 predicted, 0 failed" in out


def test_predict_nothing_matching_is_exit_2(pairs, model, capsys) -> None:
    code, _, err = run(
        capsys, "predict", model, str(pairs / "*.czi"), "-o", pairs / "results"
    )
    assert code == 2 and "no image files" in err


def test_predict_a_folder_in_small_tiles_equals_whole_image_prediction(
    pairs, model, capsys
) -> None:
    """--memory tiles every file (zarr stores too); --quiet hides the progress."""
    import zarr

    from napari_dsparse.data import as_channels_first
    from napari_dsparse.predict import predict_proba

    folder = pairs / "inputs"
    folder.mkdir()
    first = tifffile.imread(pairs / "a.tif")
    second = np.load(pairs / "b.npy") * 2 + 40  # its own brightness: per image
    tifffile.imwrite(folder / "one.tif", first, tile=(32, 32))
    zarr.create_array(str(folder / "two.zarr"), data=second, chunks=(16, 64))
    code, out, err = run(
        capsys,
        *("predict", model, folder, "-o", pairs / "results"),
        *("--memory", "4MB", "--quiet", "--probabilities"),
    )
    assert code == 0 and err == "", err
    assert "2 file(s): 2 predicted, 0 failed" in out
    classifier = load_classifier(model)
    for name, image in (("one", first), ("two", second)):
        proba = predict_proba(classifier, as_channels_first(image), tile=4096)
        written = tifffile.imread(pairs / "results" / f"{name}_probabilities.tif")
        np.testing.assert_allclose(written, proba[:, 0], atol=1e-5)
        classes = tifffile.imread(pairs / "results" / f"{name}.tif")
        np.testing.assert_array_equal(classes, proba.argmax(0)[0] + 1)


def test_predict_one_file_shows_its_tiles_progress(pairs, model, capsys) -> None:
    code, out, err = run(
        capsys,
        *("predict", model, pairs / "b.npy", "-o", pairs / "b_classes.tif"),
        *("--memory", "4MB"),
    )
    assert code == 0 and "1 file(s): 1 predicted" in out
    assert "b.npy" in err and "tile" in err  # the per-file bar, no files bar
    assert "file/s" not in err and "predict:" not in err


def test_a_tiff_of_several_series_warns_that_only_the_first_is_predicted(
    pairs, model, capsys
) -> None:
    """A multi-position TIFF (or a slide with thumbnail and label images) holds more
    than one image; predicting only the first must not go unsaid."""
    first = tifffile.imread(pairs / "a.tif")
    path = pairs / "positions.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(first)
        tif.write(first[:40, :50])
        tif.write(first[:30, :20])
    code, out, err = run(capsys, "predict", model, path, "-o", pairs / "p.tif", "-q")
    assert code == 0 and "1 file(s): 1 predicted" in out
    assert err.splitlines() == [
        f"napari-dsparse predict: warning: {path} holds 3 image series; only the "
        "first is predicted, not series 1 (40 x 50), series 2 (30 x 20)"
    ]
    assert tifffile.imread(pairs / "p.tif").shape == first.shape


def test_training_on_a_tiff_of_several_series_warns_that_only_the_first_is_read(
    pairs, capsys
) -> None:
    """``train`` reads a TIFF's first series, as ``predict`` does, and says so."""
    first = tifffile.imread(pairs / "a.tif")
    path = pairs / "positions.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(first)
        tif.write(first[:40, :50])
    args = ("train", path, pairs / "a_labels.npy", "--steps", "2", "--seed", "3")
    m = pairs / "m.pt"
    code, _, err = run(capsys, *args, "-o", m)
    assert code == 0
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [
        f"napari-dsparse train: warning: {path} holds 2 image series; only the "
        "first is read, not series 1 (40 x 50)"
    ]
    plain = pairs / "plain.pt"
    code, _, err = run(capsys, *args[:1], pairs / "a.tif", *args[2:], "-o", plain)
    assert code == 0 and "warning" not in err
    series, alone = (load_classifier(p).patch_net.state_dict() for p in (m, plain))
    assert all(torch.equal(series[k], alone[k]) for k in series)  # the same pixels


def test_a_memory_budget_below_the_smallest_tile_is_warned_of(
    pairs, model, capsys
) -> None:
    """The budget is exceeded, so say so once, up front; the work still runs."""
    code, out, err = run(
        capsys,
        *("predict", model, pairs / "b.npy", "-o", pairs / "b.tif"),
        *("--memory", "100KB", "--quiet"),
    )
    classifier = load_classifier(model)
    need = smallest_tile_memory(classifier) / 2**20
    assert code == 0 and "1 file(s): 1 predicted" in out
    assert need > 0.1  # the 100 KB asked for (0.68 MB for ``pixel``)
    assert err.splitlines() == [
        "napari-dsparse predict: warning: a memory budget of 0.0977 MB is below "
        f"the smallest tile's need for this model ({need:.3g} MB for 16 px and its "
        f"{classifier.halo} px halo); predicting in tiles of 16 px, over the budget"
    ]
    assert tifffile.imread(pairs / "b.tif").shape == (60, 150)


def test_predict_files_raises_the_first_failure_after_the_others(pairs, model) -> None:
    from napari_dsparse.data import InputError
    from napari_dsparse.workflows import predict_files

    (pairs / "broken.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputError, match=r"broken\.tif"):
        predict_files(model, [pairs / "broken.tif", pairs / "b.npy"], pairs / "out")
    assert [p.name for p in (pairs / "out").iterdir()] == ["b.tif"]
    assert predict_files(model, [pairs / "b.npy"], pairs / "b.tif") == [pairs / "b.tif"]
