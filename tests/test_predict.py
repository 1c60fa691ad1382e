"""Prediction: tiles, regions and slices give the whole-image numbers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_dsparse.data import InputError, as_channels_first
from napari_dsparse.model import pick_device
from napari_dsparse.predict import (
    Box,
    iter_tiles,
    labels_and_uncertainty,
    predict_proba,
)


def test_tiles_cover_the_image_once() -> None:
    covered = np.zeros((2, 23, 31), int)
    for box in iter_tiles((2, 23, 31), 10):
        covered[box.z, box.r0 : box.r1, box.c0 : box.c1] += 1
    assert (covered == 1).all()


def test_tiled_prediction_equals_one_whole_pass(make_classifier, rng) -> None:
    image = as_channels_first(rng.integers(0, 255, (37, 41, 3), dtype=np.uint8))
    classifier = make_classifier(image, num_classes=3)
    whole = predict_proba(classifier, image, tile=4096)
    tiled = predict_proba(classifier, image, tile=9)
    assert whole.shape == (3, 1, 37, 41)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(whole.sum(axis=0), 1, atol=1e-5)


def test_a_region_equals_the_same_part_of_the_whole(make_classifier, rng) -> None:
    image = as_channels_first(rng.normal(size=(3, 30, 26)))
    classifier = make_classifier(image)
    whole = predict_proba(classifier, image)
    region = predict_proba(classifier, image, region=Box(2, 5, 19, 0, 11), tile=6)
    np.testing.assert_allclose(region, whole[:, 2, 5:19, 0:11], atol=1e-6)


def test_volumes_are_predicted_slice_by_slice(make_classifier, rng) -> None:
    volume = as_channels_first(rng.normal(size=(3, 20, 24)))
    classifier = make_classifier(volume)
    # one fixed map: per image, a slice alone would get its own percentiles
    classifier.normalization = replace(classifier.normalization, policy="fixed")
    stacked = predict_proba(classifier, volume)
    single = predict_proba(classifier, volume[:, 1:2])
    np.testing.assert_allclose(stacked[:, 1:2], single, atol=1e-6)


def test_images_smaller_than_the_patch_are_reflected(make_classifier, rng) -> None:
    image = as_channels_first(rng.normal(size=(6, 5)))
    classifier = make_classifier(image)
    assert classifier.patch_size > 6
    proba = predict_proba(classifier, image)
    assert proba.shape == (2, 1, 6, 5) and np.isfinite(proba).all()


def test_labels_and_uncertainty(rng) -> None:
    proba = np.array([[0.9, 0.5, 0.2], [0.1, 0.5, 0.8]])[:, None]
    labels, uncertainty = labels_and_uncertainty(proba)
    np.testing.assert_array_equal(labels[0], [1, 1, 2])
    np.testing.assert_allclose(uncertainty[0], [0.2, 1.0, 0.4], atol=1e-6)


def test_channel_mismatch_is_an_error(make_classifier, rng) -> None:
    classifier = make_classifier(as_channels_first(rng.normal(size=(9, 9))))
    with pytest.raises(InputError, match="expects 1 channel"):
        predict_proba(classifier, as_channels_first(rng.normal(size=(9, 9, 3))))


def test_device_choice_falls_back_to_the_cpu() -> None:
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert pick_device() == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0': give cpu, cuda"):
        pick_device("gpu0")
