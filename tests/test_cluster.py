"""Prediction on a dask cluster equals the single-process result."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_dsparse import cluster
from napari_dsparse.cluster import predict_dask
from napari_dsparse.data import InputError, as_channels_first
from napari_dsparse.export import save_classifier
from napari_dsparse.large import Outputs, predict_file
from napari_dsparse.predict import predict_proba
from napari_dsparse.workflows import predict_many

distributed = pytest.importorskip("distributed")


@pytest.fixture
def image(rng) -> np.ndarray:
    return rng.integers(0, 4000, (75, 61), dtype=np.uint16)


@pytest.fixture
def classifier(make_classifier, image):
    return make_classifier(as_channels_first(image), num_classes=3, seed=5)


@pytest.mark.parametrize("tile", [32, 40, 4096])
def test_map_overlap_equals_a_whole_pass(make_classifier, rng, tile) -> None:
    # Height 75 = 2 x 32 + 11: a last chunk thinner than the halo gets merged.
    stack = rng.normal(size=(3, 2, 75, 61))  # (C, Z, Y, X)
    classifier = make_classifier(stack, num_classes=2, seed=1)
    lazy = da.from_array(stack, chunks=(3, 1, 20, 20))
    result = predict_dask(classifier, lazy, tile).compute(scheduler="sync")
    np.testing.assert_allclose(result, predict_proba(classifier, stack), atol=1e-6)


def test_local_cluster_equals_single_process(classifier, image, tmp_path) -> None:
    tifffile.imwrite(tmp_path / "image.tif", image, tile=(16, 16))
    outputs = Outputs(probabilities=True, uncertainty=True)
    memory = 4 * 2**20  # 32 x 32 tiles: many chunks
    single = predict_file(
        classifier, tmp_path / "image.tif", tmp_path / "single.tif", outputs, memory
    )
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        clustered = predict_file(
            classifier,
            tmp_path / "image.tif",
            tmp_path / "cluster.tif",
            outputs,
            memory,
            scheduler=cluster.scheduler_address,
        )
    for one, other in zip(single, clustered, strict=True):
        np.testing.assert_allclose(
            tifffile.imread(one), tifffile.imread(other), atol=1e-6
        )
    np.testing.assert_array_equal(
        tifffile.imread(single[0]), tifffile.imread(clustered[0])
    )


def test_a_series_on_a_cluster_keeps_its_planes(make_classifier, rng, tmp_path) -> None:
    series = rng.integers(0, 4000, (2, 3, 40, 50), dtype=np.uint16)  # T, Z, Y, X
    series = np.stack([series, series[..., ::-1]], axis=2)  # (T, Z, C, Y, X)
    np.save(tmp_path / "series.npy", series)
    classifier = make_classifier(as_channels_first(series, 2), num_classes=3, seed=4)
    outputs = Outputs(probabilities=True, uncertainty=True)
    results = {}
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        for name, scheduler in (
            ("single", None),
            ("cluster", cluster.scheduler_address),
        ):
            predict_file(
                classifier,
                tmp_path / "series.npy",
                tmp_path / f"{name}.zarr",
                outputs,
                memory=4 * 2**20,
                channel_axis=2,
                scheduler=scheduler,
            )
            results[name] = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")
    for key in ("classes", "probabilities", "uncertainty"):
        single, clustered = results["single"][key][:], results["cluster"][key][:]
        assert single.shape[-4:] == (2, 3, 40, 50)
        np.testing.assert_allclose(clustered, single, atol=1e-6)
    # Plane (T 1, Z 2) is where that plane of the file went (normalised with the
    # whole series, so float32 rounding differs from a pass over it alone).
    expected = predict_proba(classifier, as_channels_first(series[1, 2], 0))[:, 0]
    np.testing.assert_allclose(
        results["cluster"]["probabilities"][:, 1, 2], expected, atol=1e-5
    )


def test_quiet_means_no_cluster_progress_bar(
    classifier, image, tmp_path, capfd
) -> None:
    tifffile.imwrite(tmp_path / "image.tif", image)
    save_classifier(classifier, tmp_path / "m.pt")
    capfd.readouterr()
    summary = predict_many(
        tmp_path / "m.pt",
        [tmp_path / "image.tif"],
        tmp_path / "out.tif",
        progress=False,
        scheduler="local",
    )
    assert summary.written and not summary.failed
    captured = capfd.readouterr()
    assert "Completed" not in captured.out + captured.err


def test_an_unreachable_scheduler(classifier, image, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    np.save(tmp_path / "image.npy", image)
    with pytest.raises(InputError, match="cannot reach the dask scheduler"):
        predict_file(
            classifier,
            tmp_path / "image.npy",
            tmp_path / "out.tif",
            scheduler="tcp://127.0.0.1:9",
        )
    assert [p.name for p in tmp_path.iterdir()] == ["image.npy"]


def test_per_image_normalisation_is_resolved_once_for_every_chunk(
    classifier, image, tmp_path
) -> None:
    """Chunks of a brighter image all use the whole image's percentiles."""
    assert classifier.normalization.policy == "per_image"
    brighter = as_channels_first(image.astype(np.float32) * 2 + 3000)
    lazy = da.from_array(brighter, chunks=(1, 1, 20, 20))
    result = predict_dask(classifier, lazy, 32).compute(scheduler="sync")
    np.testing.assert_allclose(result, predict_proba(classifier, brighter), atol=1e-6)
    tifffile.imwrite(tmp_path / "bright.tif", brighter[0, 0], tile=(16, 16))
    [classes] = predict_file(
        classifier,
        tmp_path / "bright.tif",
        tmp_path / "out.tif",
        memory=4 * 2**20,
        scheduler="local",
    )
    expected = predict_proba(classifier, brighter).argmax(0)[0] + 1
    np.testing.assert_array_equal(tifffile.imread(classes), expected)
