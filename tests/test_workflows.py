"""The command line's train and predict, end to end on files, and its errors."""

from __future__ import annotations

import importlib.metadata
import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_dsparse.cli import main
from napari_dsparse.export import load_classifier
from napari_dsparse.samples import coins_sample
from napari_dsparse.train import TrainConfig, Trainer


@pytest.fixture
def files(tmp_path):
    image, labels = coins_sample()
    image, labels = image[:96, :128], labels[:96, :128]
    labels[60:63, 40:60] = 2  # make sure both classes are painted in the crop
    tifffile.imwrite(tmp_path / "image.tif", image)
    np.save(tmp_path / "labels.npy", labels)
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_then_predict_round_trip(files, capsys) -> None:
    model = files / "model.pt"
    code, out, _ = run(
        capsys,
        "train",
        files / "image.tif",
        files / "labels.npy",
        "-o",
        model,
        "--steps",
        "3",
        "--seed",
        "1",
    )
    assert code == 0 and "step" in out and model.is_file()
    code, _, _ = run(
        capsys,
        "predict",
        model,
        files / "image.tif",
        "-o",
        files / "out.tif",
        "--probabilities",
        "--uncertainty",
    )
    assert code == 0
    classes = tifffile.imread(files / "out.tif")
    assert classes.shape == (96, 128) and set(np.unique(classes)) <= {1, 2}
    assert tifffile.imread(files / "out_probabilities.tif").shape == (2, 96, 128)
    assert tifffile.imread(files / "out_uncertainty.tif").shape == (96, 128)


def test_predict_several_images_into_a_folder(files, capsys) -> None:
    model = files / "model.pt"
    run(
        capsys,
        "train",
        files / "image.tif",
        files / "labels.npy",
        "-o",
        model,
        "--steps",
        "1",
    )
    np.save(files / "second.npy", tifffile.imread(files / "image.tif")[:50, :70])
    code, _, _ = run(
        capsys,
        "predict",
        model,
        files / "image.tif",
        files / "second.npy",
        "-o",
        files / "results",
    )
    assert code == 0
    assert tifffile.imread(files / "results" / "second.tif").shape == (50, 70)
    assert (files / "results" / "image.tif").is_file()


def _write(path, array):
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        tifffile.imwrite(path, array)
    return path


def test_train_reports_the_class_shares_and_takes_a_prior_strength(
    files, capsys
) -> None:
    argv = ["train", files / "image.tif", files / "labels.npy", "--steps", "20"]
    code, out, _ = run(capsys, *argv, "-o", files / "a.pt")
    shares = re.search(r"class shares .*: class 1 ([\d.]+) %, class 2 ([\d.]+) %", out)
    assert code == 0 and shares
    assert float(shares[1]) + float(shares[2]) == pytest.approx(100, abs=0.2)
    code, out, _ = run(capsys, *argv, "-o", files / "b.pt", "--prior-strength", "0")
    assert code == 0 and "class shares" not in out
    prior = load_classifier(files / "b.pt").class_prior()
    assert not prior.log_ratio.any()
    with pytest.raises(SystemExit):
        main(
            [str(a) for a in argv]
            + ["-o", str(files / "c.pt"), "--prior-strength", "2"]
        )
    assert "must be between 0 and 1, got 2" in capsys.readouterr().err


def test_train_takes_a_focal_gamma(files, capsys, monkeypatch) -> None:
    gammas = []
    step = Trainer.step

    def recording_step(self):
        gammas.append(self.config.focal_gamma)
        return step(self)

    monkeypatch.setattr(Trainer, "step", recording_step)
    argv = ["train", files / "image.tif", files / "labels.npy", "--steps", "2"]
    assert run(capsys, *argv, "-o", files / "a.pt")[0] == 0
    assert run(capsys, *argv, "-o", files / "b.pt", "--focal-gamma", "0")[0] == 0
    assert gammas == [TrainConfig.focal_gamma] * 2 + [0.0] * 2
    with pytest.raises(SystemExit):
        main(
            [str(a) for a in argv] + ["-o", str(files / "c.pt"), "--focal-gamma", ".5"]
        )
    assert "must be 0 or between 1 and 10, got .5" in capsys.readouterr().err


def test_classes_without_strokes_are_named_and_left_out_of_the_counts(
    files, capsys
) -> None:
    labels = np.load(files / "labels.npy")
    labels[labels == 2] = 7  # classes 2-6 have no strokes
    np.save(files / "gaps.npy", labels)
    argv = ["train", files / "image.tif", files / "gaps.npy", "--steps", "2"]
    code, out, _ = run(capsys, *argv, "-o", files / "m.pt")
    assert code == 0
    painted = [int(n) for n in np.bincount(labels.ravel())[[1, 7]]]
    assert f"painted: class 1 {painted[0]} px, class 7 {painted[1]} px\n" in out
    assert "no strokes of class 2-6: the model keeps classes 1..7" in out
    assert re.search(r"class shares .*: class 1 [\d.]+ %, class 7 [\d.]+ %\n", out)
    assert load_classifier(files / "m.pt").num_classes == 7


def test_results_of_two_images_never_share_a_file(files, capsys) -> None:
    code, _, err = run(
        capsys,
        "train",
        files / "image.tif",
        files / "labels.npy",
        "-o",
        files / "m.pt",
        "--steps",
        "2",
    )
    assert code == 0, err
    inputs = files / "inputs"
    inputs.mkdir()
    for name in ("a.tif", "a_uncertainty.tif"):  # a's uncertainty, and an image
        (inputs / name).write_bytes((files / "image.tif").read_bytes())
    argv = ["predict", files / "m.pt", inputs, "-o", files / "out", "--uncertainty"]
    code, _, err = run(capsys, *argv, "-q")
    a, a_uncertainty = inputs / "a.tif", inputs / "a_uncertainty.tif"
    assert code == 2 and f"of {a} and {a_uncertainty} would both be written" in err
    assert not (files / "out").exists()  # a refused run leaves no empty folder
    (inputs / "a_uncertainty.tif").rename(inputs / "a.npy")  # a.tif and a.npy
    np.save(inputs / "a.npy", np.zeros((8, 8), np.float32))
    code, _, err = run(capsys, *argv[:-1], "-q")
    assert code == 2 and f"written to {files / 'out' / 'a.tif'}" in err
    (inputs / "a.npy").rename(inputs / "A.npy")  # one file on macOS and Windows
    code, _, err = run(capsys, *argv[:-1], "-q")
    assert code == 2 and "differ only in case" in err and err.count("\n") == 1
    assert f"(of {inputs / 'A.npy'})" in err
    assert not (files / "out").exists()


def test_an_imagej_multichannel_file_trains_on_its_channels(files, capsys) -> None:
    image = tifffile.imread(files / "image.tif")
    channels = np.stack([image, image.max() - image])  # (C, Y, X)
    tifffile.imwrite(files / "two.tif", channels, imagej=True, metadata={"axes": "CYX"})
    argv = ["train", files / "two.tif", files / "labels.npy", "--steps", "2"]
    code, _out, err = run(capsys, *argv, "-o", files / "m.pt")
    assert code == 0, err  # no --channel-axis: the file says C
    assert load_classifier(files / "m.pt").in_channels == 2


def test_predict_reads_files_as_the_model_was_trained_on_them(files, capsys) -> None:
    image = tifffile.imread(files / "image.tif")
    np.save(files / "two.npy", np.stack([image, image.max() - image]))  # (C, Y, X)
    argv = ["train", files / "two.npy", files / "labels.npy", "--steps", "2"]
    code, _out, err = run(capsys, *argv, "--channel-axis", "-3", "-o", files / "m.pt")
    assert code == 0, err
    trained = load_classifier(files / "m.pt").provenance["channel_axis"]
    assert trained == {"ndim": 3, "axis": 0}  # -3 of 3 axes, as a positive axis
    code, out, err = run(
        capsys, "predict", files / "m.pt", files / "two.npy", "-o", files / "a.tif"
    )
    assert code == 0, err  # no --channel-axis: the model's layout
    assert "12,288 pixels" in out  # 96 x 128: the channels are not counted as planes
    code, _, err = run(
        capsys,
        "predict",
        files / "m.pt",
        files / "two.npy",
        "-o",
        files / "b.tif",
        "--channel-axis",
        "0",
    )
    assert code == 0, err
    assert np.array_equal(
        tifffile.imread(files / "a.tif"), tifffile.imread(files / "b.tif")
    )
    assert tifffile.imread(files / "a.tif").shape == (96, 128)


def test_a_model_trained_without_a_channel_axis_records_none(files, capsys) -> None:
    argv = ["train", files / "image.tif", files / "labels.npy", "--steps", "1"]
    code, _out, err = run(capsys, *argv, "-o", files / "m.pt")
    assert code == 0, err
    assert "channel_axis" not in load_classifier(files / "m.pt").provenance


def test_a_grey_png_with_alpha_is_one_channel(files, capsys) -> None:
    grey = tifffile.imread(files / "image.tif").astype(np.uint8)
    Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), mode="LA").save(
        files / "grey.png"
    )
    argv = ["train", files / "grey.png", files / "labels.npy", "--steps", "2"]
    code, _out, err = run(capsys, *argv, "-o", files / "m.pt")
    assert code == 0, err  # not 96 planes of 128 x 2 pixels
    assert load_classifier(files / "m.pt").in_channels == 1
    code, _out, err = run(
        capsys,
        "predict",
        files / "m.pt",
        files / "grey.png",
        "-o",
        files / "grey.tif",
        "-q",
    )
    assert code == 0, err
    assert tifffile.imread(files / "grey.tif").shape == grey.shape


@pytest.mark.parametrize("compression", ["lzw", "jpeg", "zstd"])
def test_compressed_tiffs_train_and_predict(files, capsys, compression) -> None:
    """tifffile reads these codecs through imagecodecs, a core dependency."""
    assert any(
        re.match(r"imagecodecs\b", requirement)
        for requirement in importlib.metadata.requires("napari-dsparse")
    )
    image = tifffile.imread(files / "image.tif")
    tifffile.imwrite(files / "packed.tif", image, compression=compression)
    argv = ["train", files / "packed.tif", files / "labels.npy", "--steps", "2"]
    code, _, err = run(capsys, *argv, "-o", files / "m.pt")
    assert code == 0, err
    argv = ["predict", files / "m.pt", files / "packed.tif", "-o", files / "p.tif"]
    code, _, err = run(capsys, *argv, "-q")
    assert code == 0, err


def test_jpeg_images_are_read_and_jpeg_labels_refused(files, capsys) -> None:
    image = tifffile.imread(files / "image.tif").astype(np.uint8)
    Image.fromarray(image).save(files / "photo.jpg", quality=95)
    argv = ["train", files / "photo.jpg", files / "labels.npy", "--steps", "2"]
    code, _, err = run(capsys, *argv, "-o", files / "m.pt")
    assert code == 0, err
    code, _, err = run(
        capsys, "predict", files / "m.pt", files, "-o", files / "out", "-q"
    )
    assert code == 0, err
    assert tifffile.imread(files / "out" / "photo.tif").shape == image.shape
    labels = np.load(files / "labels.npy").astype(np.uint8)
    Image.fromarray(labels).save(files / "labels.jpg")
    argv = ["train", files / "image.tif", files / "labels.jpg", "--steps", "2"]
    code, _, err = run(capsys, *argv, "-o", files / "m2.pt")
    assert code == 2 and "JPEG compression changes class ids" in err


def test_palette_png_labels_give_their_indices(files, capsys) -> None:
    labels = np.load(files / "labels.npy").astype(np.uint8)
    palette = Image.fromarray(labels, mode="P")  # how annotation tools save them
    palette.putpalette([0, 0, 0, 250, 20, 20, 20, 250, 20] + [0] * 759)
    palette.save(files / "labels.png")
    argv = ["train", files / "image.tif", files / "labels.png", "--steps", "2"]
    code, out, err = run(capsys, *argv, "-o", files / "m.pt")
    assert code == 0, err
    painted = np.bincount(labels.ravel())[1:3].tolist()
    assert f"painted: class 1 {painted[0]} px, class 2 {painted[1]} px\n" in out


@pytest.mark.parametrize(
    ("image", "labels", "message"),
    [
        ("missing.tif", "labels.npy", "does not exist"),
        ("garbage.tif", "labels.npy", "cannot read"),
        ("image.tif", "small.npy", "differs from the image"),
        ("image.tif", "empty.npy", "no painted pixels|fewer than two"),
        ("image.tif", "single.npy", "fewer than two classes"),
        ("nan.tif", "nanlabels.npy", "NaN"),
        ("planes.tif", "nanlabels.npy", r"planes are channels.*--channel-axis 0"),
        ("last.npy", "nanlabels.npy", r"last axis \(2 entries\).*--channel-axis -1"),
    ],
)
def test_bad_training_input_is_one_line_and_exit_2(
    files, capsys, image, labels, message
) -> None:
    (files / "garbage.tif").write_bytes(b"not an image at all")
    _write(files / "small.npy", np.zeros((5, 5), np.uint8))
    _write(files / "empty.npy", np.zeros((96, 128), np.uint8))
    single = np.zeros((96, 128), np.uint8)
    single[3:6, 3:30] = 1
    _write(files / "single.npy", single)
    nan_image = np.ones((20, 20), np.float32)
    nan_image[4, 4] = np.inf
    _write(files / "nan.tif", nan_image)
    nan_labels = np.zeros((20, 20), np.uint8)
    nan_labels[1, 1], nan_labels[9, 9] = 1, 2
    _write(files / "nanlabels.npy", nan_labels)
    _write(files / "planes.tif", np.arange(800, dtype=np.float32).reshape(2, 20, 20))
    _write(files / "last.npy", np.arange(800, dtype=np.float32).reshape(20, 20, 2))
    code, _, err = run(
        capsys,
        "train",
        files / image,
        files / labels,
        "-o",
        files / "m.pt",
        "--steps",
        "1",
    )
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err)
    assert not (files / "m.pt").exists()


def test_tiny_images_train_by_reflection(tmp_path, capsys) -> None:
    image = np.random.default_rng(0).normal(size=(9, 11)).astype(np.float32)
    labels = np.zeros((9, 11), np.uint8)
    labels[1, 1], labels[7, 9] = 1, 2
    _write(tmp_path / "tiny.tif", image)
    _write(tmp_path / "tiny.npy", labels)
    code, _, _ = run(
        capsys,
        "train",
        tmp_path / "tiny.tif",
        tmp_path / "tiny.npy",
        "-o",
        tmp_path / "m.pt",
        "--steps",
        "2",
    )
    assert code == 0


def test_corrupt_model_for_predict(files, capsys) -> None:
    (files / "bad.pt").write_bytes(b"\x00" * 100)
    code, _, err = run(
        capsys, "predict", files / "bad.pt", files / "image.tif", "-o", files / "o.tif"
    )
    assert code == 2 and "corrupt" in err and not (files / "o.tif").exists()


def test_a_picture_or_npy_output_is_refused_not_made_a_folder(files, capsys) -> None:
    argv = ["train", files / "image.tif", files / "labels.npy", "-o", files / "m.pt"]
    assert run(capsys, *argv, "--steps", "2")[0] == 0
    for name in ("out.png", "out.NPY", "out.jpg"):
        code, _, err = run(
            capsys, "predict", files / "m.pt", files / "image.tif", "-o", files / name
        )
        assert code == 2 and "give a .tif, .tiff, .zarr file or a folder" in err
        assert not (files / name).exists()
    (files / "old.png").mkdir()  # a folder that happens to have such a name
    code, _, err = run(
        capsys, "predict", files / "m.pt", files / "image.tif", "-o", files / "old.png"
    )
    assert code == 0, err
    assert (files / "old.png" / "image.tif").is_file()


def test_a_failed_file_is_named_once_on_its_line(tmp_path) -> None:
    """The file leads the line unless its reason names it already."""
    from napari_dsparse.workflows import PredictSummary

    broken, nan = tmp_path / "broken.tif", tmp_path / "nan.tif"
    summary = PredictSummary()
    summary.failed.append((broken, f"cannot read {broken}: not a TIFF file"))
    summary.failed.append((nan, "the image holds NaN or Inf"))
    assert summary.failure_lines() == [
        f"failed: cannot read {broken}: not a TIFF file",
        f"failed: {nan}: the image holds NaN or Inf",
    ]


def test_predict_many_counts_the_pixels_and_decodes_each_picture_once(
    files, capsys, monkeypatch
) -> None:
    """The summary's pixels are every slice's of every file written; a PNG is
    decoded once (its pixel count comes from the result, not a second read)."""
    from napari_dsparse import large
    from napari_dsparse.workflows import predict_many

    model = files / "model.pt"
    code, _, err = run(
        capsys, "train", files / "image.tif", files / "labels.npy", "-o", model,
        "--steps", "2",
    )  # fmt: skip
    assert code == 0, err
    image = tifffile.imread(files / "image.tif")
    Image.fromarray(image.astype(np.uint8)).save(files / "flat.png")
    volume = np.stack([image] * 4)
    tifffile.imwrite(files / "volume.tif", volume, photometric="minisblack")
    decoded = []
    read_picture = large.read_picture
    monkeypatch.setattr(
        large, "read_picture", lambda path: decoded.append(path) or read_picture(path)
    )
    summary = predict_many(
        model, [files / "flat.png", files / "volume.tif"], files / "out", progress=False
    )
    assert not summary.failed and len(summary.written) == 2
    assert summary.pixels == image.size + volume.size
    assert decoded == [files / "flat.png"]
    into_zarr = predict_many(
        model, [files / "volume.tif"], files / "volume.zarr", progress=False
    )
    assert into_zarr.pixels == volume.size
