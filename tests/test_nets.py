"""Presets: exact dense form, fixed filters, rotation-invariant pixel features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_dsparse.data import Normalization, as_channels_first
from napari_dsparse.model import Classifier
from napari_dsparse.nets import (
    PRESETS,
    ClassPrior,
    FeatureScale,
    FilterInvariants,
    build_patch_net,
    filter_bank,
    macs_per_pixel,
)
from napari_dsparse.sparse import patchwise, to_dense

EXACTNESS_CASES = [
    ("fast", 1, torch.float64, 1e-12),
    ("fast", 3, torch.float64, 1e-12),
    ("wide", 2, torch.float32, 1e-5),  # float64 convolutions are slow on CPUs
    ("pixel", 2, torch.float64, 1e-12),
]


def test_every_preset_is_checked_for_exactness() -> None:
    assert {case[0] for case in EXACTNESS_CASES} == set(PRESETS)


@pytest.mark.parametrize(("preset", "channels", "dtype", "tolerance"), EXACTNESS_CASES)
def test_presets_are_exact_dense_networks(preset, channels, dtype, tolerance) -> None:
    net = build_patch_net(preset, channels, 3).to(dtype).eval()
    scale = next((m for m in net if isinstance(m, FeatureScale)), None)
    assert (scale is not None) == PRESETS[preset].standardize
    if scale is not None:  # not the identity
        scale.fit(torch.randn(2, scale.shift.numel(), 5, 5, dtype=dtype))
    prior = net[-1]
    assert isinstance(prior, ClassPrior)
    prior.log_ratio.copy_(torch.tensor([0.5, -1.0, 2.0]))  # not the identity either
    dense = to_dense(net)
    x = torch.randn(1, channels, 28, 33, dtype=dtype)
    with torch.no_grad():
        expected = patchwise(net, x)
        for strategy in ("dilated", "space_to_batch"):
            difference = (dense(x, strategy=strategy) - expected).abs().max()
            assert difference < tolerance


def test_fast_preset_fits_the_live_budget() -> None:
    net = build_patch_net("fast", 1, 2)
    assert to_dense(net).patch_size == 31
    assert 20_000 < macs_per_pixel(net) < 100_000


def test_pixel_preset_learns_no_context() -> None:
    """Its patch is the filter bank's support: every learned layer is 1 x 1."""
    net = build_patch_net("pixel", 1, 2)
    assert to_dense(net).patch_size == PRESETS["pixel"].filter_size
    learned = [m for m in net if isinstance(m, torch.nn.Conv2d) and m is not net[0]]
    assert learned and all(m.kernel_size == (1, 1) for m in learned)


def test_fixed_filters_do_not_train() -> None:
    net = build_patch_net("fast", 2, 2)
    assert not net[0].weight.requires_grad
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert all(p is not net[0].weight for p in trainable)


def test_filter_bank_smooths_and_differentiates() -> None:
    bank = filter_bank((1.0, 2.0), 13)  # identity + 6 per scale (float32)
    assert bank.shape == (13, 13, 13)
    assert bank[0].sum() == 1 and bank[0, 6, 6] == 1
    for scale in range(2):
        smoothing, *derivatives = bank[1 + 6 * scale : 7 + 6 * scale]
        assert smoothing.sum() == pytest.approx(1)
        for kernel in derivatives:
            assert kernel.sum() == pytest.approx(0, abs=1e-6)


def test_invariants_do_not_depend_on_orientation() -> None:
    net = build_patch_net("fast", 1, 2).double()
    filters, invariants = net[0], net[1]
    assert isinstance(invariants, FilterInvariants)
    x = torch.randn(1, 1, 40, 40, dtype=torch.float64)
    features = invariants(filters(x))[:, filters.out_channels :]
    turned = invariants(filters(torch.rot90(x, 1, (2, 3))))[:, filters.out_channels :]
    torch.testing.assert_close(torch.rot90(features, 1, (2, 3)), turned)


def test_invariants_are_gradient_and_hessian_eigenvalues_times_the_gain() -> None:
    net = build_patch_net("pixel", 1, 2).double()
    filters, invariants = net[0], net[1]
    assert invariants.gain == PRESETS["pixel"].invariant_gain == 2.0
    x = torch.randn(1, 1, 30, 30, dtype=torch.float64)
    with torch.no_grad():
        responses = filters(x)[0].numpy()  # (1 + 6 S, h, w)
        appended = invariants(filters(x))[0, filters.out_channels :].numpy()
    scales = len(PRESETS["pixel"].filter_scales)
    for scale in range(scales):
        _, gx, gy, gxx, gxy, gyy = responses[1 + 6 * scale : 7 + 6 * scale]
        hessian = np.stack([np.stack([gyy, gxy], -1), np.stack([gxy, gxx], -1)], -2)
        low, high = np.moveaxis(np.linalg.eigvalsh(hessian), -1, 0)
        np.testing.assert_allclose(appended[scale], 2 * np.hypot(gx, gy), atol=1e-5)
        np.testing.assert_allclose(appended[scales + scale], 2 * high, atol=1e-5)
        np.testing.assert_allclose(appended[2 * scales + scale], 2 * low, atol=1e-5)


def test_feature_scale_is_fitted_once_to_the_first_training_image(rng) -> None:
    image = as_channels_first(rng.normal(500, 80, (3, 150, 170)), channel_axis=0)
    classifier = Classifier.create(
        3, ("a", "b"), Normalization.from_image(image), preset="fast"
    )
    scale = classifier.feature_scale()
    assert scale is not None and scale.fitted.item() == 0
    classifier.fit_feature_scale(image)
    assert scale.fitted.item() == 1
    trunk = torch.nn.Sequential(*list(classifier.patch_net)[:2])
    window = classifier.normalization.apply(image[:, 0])  # (C, Y, X)
    with torch.no_grad():
        features = scale(trunk(torch.from_numpy(window)[None]))
    assert features.mean((0, 2, 3)).abs().max() < 0.2  # sampled windows: not exact
    assert (features.std((0, 2, 3)) - 1).abs().max() < 0.2
    fitted = scale.shift.clone()
    classifier.fit_feature_scale(image * 2 + 100)  # a trained model keeps its own
    torch.testing.assert_close(scale.shift, fitted, rtol=0, atol=0)
