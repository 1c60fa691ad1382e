"""Bad or unusual input: a clear InputError or a warning, and correct results."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_dsparse.data import (
    NORMALIZED_LIMIT,
    InputError,
    Normalization,
    as_channels_first,
    as_planes,
    check_trainable_image,
    missing_classes,
    small_image_warning,
)
from napari_dsparse.live import LiveSession, Mailbox, Notice, Waiting, iter_live
from napari_dsparse.model import Classifier
from napari_dsparse.predict import predict_proba
from napari_dsparse.train import TrainConfig, Trainer

WHOLE = TrainConfig(augment=False)


def _strokes(shape: tuple[int, int]) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[2:4, 2:20], labels[-6:-3, 5:25] = 1, 2
    return labels


def _events(session: LiveSession, labels: np.ndarray, seconds: float = 0.05) -> list:
    mailbox = Mailbox()
    mailbox.post_labels(labels)
    return list(iter_live(session, mailbox, round_seconds=seconds, rounds=1))


@pytest.mark.parametrize("shape", [(40, 40), (1, 40, 40), (1, 1, 1, 40, 40)])
def test_arrays_not_laid_out_as_the_core_wants_are_named(shape) -> None:
    """The Python API takes ``(C, Z, Y, X)``; a plain 2D array must not slip by."""
    good = as_channels_first(np.random.default_rng(0).normal(size=(40, 40)))
    classifier = Classifier.create(1, ("a", "b"), Normalization.from_image(good))
    wrong = good.reshape(shape)
    calls = [
        lambda: Normalization.from_image(wrong),
        lambda: Trainer(classifier, wrong, _strokes((40, 40))),
        lambda: predict_proba(classifier, wrong),
    ]
    for call in calls:
        with pytest.raises(InputError, match=r"expected a \(C, Z, Y, X\) array"):
            call()


def test_a_constant_image_is_refused_for_training() -> None:
    with pytest.raises(InputError, match="nothing to tell classes apart"):
        LiveSession(np.full((1, 1, 20, 20), 7, np.uint16), ("a", "b"))


def test_a_constant_image_can_still_be_predicted(make_classifier, gray_image) -> None:
    classifier = make_classifier(gray_image)
    proba = predict_proba(classifier, np.full_like(gray_image, 1000))
    np.testing.assert_allclose(proba.sum(axis=0), 1, rtol=1e-5)


def test_a_constant_channel_next_to_a_varying_one_is_fine(rng) -> None:
    image = np.stack([rng.normal(size=(1, 20, 20)), np.zeros((1, 20, 20))])
    check_trainable_image(image)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinite_pixels_are_refused(bad, rng) -> None:
    image = rng.normal(size=(1, 1, 20, 20))
    image[0, 0, 5, 5] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        LiveSession(image, ("a", "b"))


def test_complex_images_are_refused_for_training_and_prediction(
    make_classifier, rng
) -> None:
    image = (rng.normal(size=(1, 1, 20, 20)) * (1 + 1j)).astype(np.complex64)
    with pytest.raises(InputError, match="complex"):
        check_trainable_image(image)
    classifier = make_classifier(image.real.astype(np.float32))
    with pytest.raises(InputError, match="complex"):
        predict_proba(classifier, image)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.full((40, 50), 1.5), "whole numbers"),
        (np.full((40, 50), -2, np.int32), "negative"),
        (np.zeros((41, 50), np.uint8), "differs"),
    ],
    ids=["float", "negative", "shape"],
)
def test_bad_scribbles_stop_the_live_loop_with_a_message(rng, labels, message) -> None:
    session = LiveSession(rng.normal(size=(1, 1, 40, 50)), ("a", "b"))
    with pytest.raises(InputError, match=message):
        _events(session, labels)


def test_one_painted_class_waits_for_a_second(rng) -> None:
    session = LiveSession(rng.normal(size=(1, 1, 40, 50)), ("a", "b"))
    labels = _strokes((40, 50))
    labels[labels == 2] = 0
    mailbox = Mailbox()
    mailbox.post_labels(labels)
    event = next(iter_live(session, mailbox))
    assert isinstance(event, Waiting) and "two classes" in event.reason
    assert session.trainer is None


def test_class_ids_with_gaps_train_with_a_notice(rng) -> None:
    session = LiveSession(rng.normal(size=(1, 1, 40, 50)), ("a", "b", "c"))
    labels = _strokes((40, 50))
    labels[labels == 2] = 3  # classes 1 and 3, no 2
    assert missing_classes(labels) == [2]
    events = _events(session, labels)
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert len(notices) == 1 and "class 2 ('b')" in notices[0]
    assert session.trainer.steps_done > 0
    assert session.trainer.weights.tolist()[1] == 0  # the gap weighs nothing
    assert not [e for e in _events(session, labels) if isinstance(e, Notice)]
    labels[labels == 3] = 40  # classes 2-39 unpainted: one range, not 38 names
    notices = [e.message for e in _events(session, labels) if isinstance(e, Notice)]
    assert notices == ["no strokes of class 2-39: it is not predicted until painted"]


def test_an_image_smaller_than_the_receptive_field_trains_with_a_warning(
    rng,
) -> None:
    session = LiveSession(rng.normal(size=(1, 1, 12, 12)), ("a", "b"))
    labels = np.zeros((12, 12), np.uint8)
    labels[1, 1:5], labels[10, 6:11] = 1, 2
    events = _events(session, labels)
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("smaller than the network's receptive field" in n for n in notices)
    proba = predict_proba(session.classifier, session.image)
    assert proba.shape == (2, 1, 12, 12) and np.isfinite(proba).all()
    assert small_image_warning((1, 31, 31), 31) is None


def test_time_series_become_one_slice_per_time_point_and_plane(rng) -> None:
    series = rng.normal(size=(3, 2, 20, 24))  # (T, Z, Y, X)
    planes = as_planes(series[None])  # (C, T * Z, Y, X)
    assert planes.shape == (1, 6, 20, 24)
    np.testing.assert_array_equal(planes[0, 2 * 2 + 1], series[2, 1])
    rgb_series = rng.integers(0, 255, (4, 20, 24, 3), np.uint8)  # (T, Y, X, RGB)
    channels_first = np.moveaxis(rgb_series, -1, 0)
    assert as_planes(channels_first).shape == (3, 4, 20, 24)


def test_a_time_series_trains_and_predicts_per_time_point(make_classifier, rng) -> None:
    series = rng.normal(size=(2, 3, 30, 30)).astype(np.float32)  # (T, Z, Y, X)
    image = as_planes(series[None])  # (1, 6, 30, 30)
    labels = np.zeros((2, 3, 30, 30), np.uint8)
    labels[1, 2, 3:5, 3:20], labels[1, 2, 20:23, 5:25] = 1, 2
    classifier = make_classifier(image)
    # fixed: per image, one time point alone would have percentiles of its own
    classifier.normalization = replace(classifier.normalization, policy="fixed")
    trainer = Trainer(classifier, image, labels.reshape(6, 30, 30), WHOLE)
    trainer.step()
    proba = predict_proba(classifier, image)
    alone = predict_proba(classifier, image[:, 5:6])  # time point 1, plane 2
    np.testing.assert_array_equal(proba[:, 5:6], alone)


def test_non_contiguous_images_give_the_same_results(make_classifier, rng) -> None:
    base = rng.normal(size=(60, 80)).astype(np.float32)
    strided = base[::2, ::2].T  # (40, 30), neither C- nor F-contiguous
    assert not strided.flags.c_contiguous and not strided.flags.f_contiguous
    image = as_channels_first(strided)
    copy = np.ascontiguousarray(image)
    classifier = make_classifier(copy)
    # torch may order the sums differently for another memory layout: 1 ulp
    np.testing.assert_allclose(
        predict_proba(classifier, image), predict_proba(classifier, copy), atol=1e-6
    )
    labels = _strokes((40, 30))
    losses = [
        Trainer(make_classifier(copy), data, labels, WHOLE).step()[0]
        for data in (image, copy)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_dask_images_give_the_same_results_lazily(make_classifier, rng) -> None:
    da = pytest.importorskip("dask.array")
    image = rng.normal(size=(1, 1, 90, 70)).astype(np.float32)
    lazy = da.from_array(image, chunks=(1, 1, 32, 32))
    classifier = make_classifier(image)
    assert Normalization.from_image(lazy) == Normalization.from_image(image)
    np.testing.assert_array_equal(
        predict_proba(classifier, lazy, tile=40),
        predict_proba(classifier, image, tile=40),
    )
    session = LiveSession(lazy, ("a", "b"))
    _events(session, _strokes((90, 70)))
    assert session.trainer.steps_done > 0 and session.image is lazy


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.uint16, np.int32, np.float16, np.float64]
)
def test_every_pixel_type_trains_and_predicts_alike(dtype, make_classifier) -> None:
    rows, cols = np.mgrid[:40, :40]
    values = ((rows // 4 + cols // 5) % 7 * 30).astype(dtype)  # exact in every dtype
    image = as_channels_first(values)
    reference = as_channels_first(values.astype(np.float32))
    classifier = make_classifier(reference)
    np.testing.assert_allclose(  # int32 and float64 normalise in float64: 1 rounding
        predict_proba(classifier, image),
        predict_proba(classifier, reference),
        atol=1e-6,
    )
    session = LiveSession(image, ("a", "b"))
    _events(session, _strokes((40, 40)))
    assert session.trainer.steps_done > 0
    net = session.classifier.patch_net
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize(
    ("offset", "scale", "dtype"),
    [
        (1e9, 1.0, np.float64),  # float32 spacing 64: the contrast was lost (NaN)
        (0.0, 1e300, np.float64),  # beyond float32: inf, then NaN
        (4e9, 10.0, np.uint32),  # above 2**24: rounded away
        (2.0**40, 10.0, np.int64),
    ],
    ids=["float64 offset", "float64 huge", "uint32 offset", "int64 offset"],
)
def test_pixels_float32_cannot_hold_keep_their_contrast(
    offset, scale, dtype, make_classifier
) -> None:
    rows, cols = np.mgrid[:40, :40]
    pattern = (rows // 4 + cols // 5) % 7
    image = as_channels_first((offset + scale * pattern).astype(dtype))
    reference = as_channels_first(pattern.astype(np.float32))
    classifier = make_classifier(reference)
    np.testing.assert_allclose(
        predict_proba(classifier, image),
        predict_proba(classifier, reference),
        atol=1e-5,
    )


def test_outliers_are_clipped_after_normalisation() -> None:
    values = np.zeros((1, 1, 40, 40), np.float32)
    values[..., 20:, :] = 1.0
    values[..., 0, 0] = 3e38  # finite, but times the scale it would overflow
    normalized = Normalization.from_image(values).apply(values[:, 0])
    assert np.isfinite(normalized).all() and normalized.max() == NORMALIZED_LIMIT
    assert normalized[0, 30, 30] == 1.0 and normalized[0, 10, 10] == 0.0


@pytest.mark.parametrize(("model_channels", "image_channels"), [(1, 3), (3, 1)])
def test_rgb_and_grayscale_models_refuse_the_other_kind(
    make_classifier, rng, model_channels, image_channels
) -> None:
    classifier = make_classifier(rng.normal(size=(model_channels, 1, 20, 20)))
    with pytest.raises(InputError, match=f"expects {model_channels} channel"):
        predict_proba(classifier, rng.normal(size=(image_channels, 1, 20, 20)))
