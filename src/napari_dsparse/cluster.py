"""Prediction on a dask cluster: ``map_overlap`` with a depth of one halo.

Each chunk of the image arrives with ``halo`` pixels of its neighbours
(``boundary="none"``); chunks at the image border are reflect-padded here exactly as
:func:`napari_dsparse.data.read_window` pads a window, so every chunk's output equals
the same region of a whole-image pass. Workers write their results straight into the
zarr store, so for a cluster on other machines the input and the output must be on
storage that every worker can read and write.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator

import dask.array as da
import numpy as np
import torch

from napari_dsparse.data import InputError, Normalization
from napari_dsparse.large import MergedPlanes
from napari_dsparse.model import Classifier
from napari_dsparse.predict import labels_and_uncertainty

__all__ = ["connect", "predict_dask", "predict_into_with_dask"]

Progress = Callable[[int, int], None]
CONNECT_TIMEOUT = "10s"  # how long to wait for a scheduler before giving up


def predict_dask(
    classifier: Classifier,
    image: da.Array,
    tile: int,
    normalization: Normalization | None = None,
) -> da.Array:
    """Lazy class probabilities ``(K, Z, Y, X)`` float32 of a ``(C, Z, Y, X)`` image.

    ``normalization`` is the map for the whole image; by default it is resolved here,
    once (``classifier.normalization.for_image(image)``), and every chunk uses it.
    """
    if normalization is None:
        normalization = classifier.normalization.for_image(image)
    halo = classifier.halo
    channels, _, height, width = image.shape
    chunked = image.rechunk(
        (
            channels,
            1,
            _no_small_chunks(height, tile, halo),
            _no_small_chunks(width, tile, halo),
        )
    )
    return da.map_overlap(
        _predict_chunk,
        chunked,
        depth={0: 0, 1: 0, 2: halo, 3: halo},
        boundary="none",
        trim=False,
        dtype=np.float32,
        chunks=((classifier.num_classes,), *chunked.chunks[1:]),
        classifier=classifier,
        normalization=normalization,
        meta=np.empty((0, 0, 0, 0), np.float32),
    )


def _no_small_chunks(size: int, tile: int, halo: int) -> tuple[int, ...]:
    """Chunks of about ``tile`` whose last one is wider than ``halo``."""
    chunks = [min(tile, size - start) for start in range(0, size, tile)]
    if len(chunks) > 1 and chunks[-1] <= halo:
        chunks[-2] += chunks.pop()
    return tuple(chunks)


def _predict_chunk(
    block: np.ndarray,
    classifier: Classifier,
    normalization: Normalization,
    block_info: dict | None = None,
) -> np.ndarray:
    """Probabilities ``(K, 1, h, w)`` of one chunk given with its neighbours' halo."""
    halo = classifier.halo
    location = block_info[0]["chunk-location"][2:]
    counts = block_info[0]["num-chunks"][2:]
    pad = [
        (halo if index == 0 else 0, halo if index == count - 1 else 0)
        for index, count in zip(location, counts, strict=True)
    ]
    window = normalization.apply(np.asarray(block[:, 0]))  # (C, h', w')
    window = np.pad(window, ((0, 0), *pad), mode="reflect")
    classifier.patch_net.eval()
    with torch.inference_mode():
        batch = torch.from_numpy(np.ascontiguousarray(window)[None])
        logits = classifier.dense(batch.to(classifier.device), valid=True)
        proba = torch.softmax(logits, dim=1)[0].float().cpu().numpy()  # (K, h, w)
    return proba[:, None]


def predict_into_with_dask(
    classifier: Classifier,
    image: da.Array,
    store,
    tile: int,
    scheduler: str,
    progress: Progress | None = None,
    normalization: Normalization | None = None,
) -> None:
    """Fill the zarr ``store`` of :mod:`napari_dsparse.large` on a dask cluster.

    ``normalization``: the whole image's map, resolved once (see :func:`predict_dask`).
    """
    # A CPU copy travels to the workers; the caller's classifier stays where it is.
    proba = predict_dask(
        copy.deepcopy(classifier).to("cpu"), image, tile, normalization
    )
    classes = da.map_blocks(
        lambda p: labels_and_uncertainty(p)[0],
        proba,
        drop_axis=0,
        dtype=store["classes"].dtype,
    )
    sources, targets = [classes], [MergedPlanes(store["classes"])]
    if "probabilities" in store:
        sources.append(proba)
        targets.append(MergedPlanes(store["probabilities"], leading=1))
    if "uncertainty" in store:
        sources.append(
            da.map_blocks(
                lambda p: labels_and_uncertainty(p)[1],
                proba,
                drop_axis=0,
                dtype=np.float32,
            )
        )
        targets.append(MergedPlanes(store["uncertainty"]))
    stored = da.store(sources, targets, lock=False, compute=False)
    with connect(scheduler) as client:
        futures = client.compute(stored)
        try:
            _wait(client, futures, progress)
        finally:
            client.cancel(futures)


def _wait(client, futures, progress: Progress | None) -> None:
    """Wait for ``futures``, with distributed's text progress bar when asked."""
    if progress is not None:
        from distributed import progress as show_progress

        show_progress(futures)
    client.gather(futures)
    if progress is not None:
        progress(1, 1)


@contextlib.contextmanager
def connect(scheduler: str) -> Iterator:
    """A dask ``Client``: ``"local"`` starts a cluster in this process."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise InputError(
            "dask clusters need the 'distributed' package: pip install distributed"
        ) from error
    if scheduler == "local":
        # One worker thread: torch already spreads each chunk over every core.
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=1,
                processes=False,
                dashboard_address=None,
                # The scheduler's HTTP server (health, metrics) on a free port, so
                # that a second local cluster does not warn that 8787 is taken.
                scheduler_kwargs={"dashboard_address": ":0"},
            ) as cluster,
            Client(cluster) as client,
        ):
            torch.set_num_threads(os.cpu_count() or 1)
            yield client
        return
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT)
    except OSError as error:
        raise InputError(
            f"cannot reach the dask scheduler at {scheduler}: {error}"
        ) from error
    with client:
        yield client
