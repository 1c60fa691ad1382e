"""Dense sparse-kernel networks equal patch-by-patch classification, exactly."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import napari_dsparse.sparse as sparse
from napari_dsparse.sparse import (
    DenseNet,
    choose_strategy,
    iter_patches,
    patchwise,
    to_dense,
)

STRATEGIES = ["dilated", "space_to_batch"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster and immune to busy-core stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def strided() -> nn.Sequential:
    """Strided convolutions, two Linear layers, Dropout."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.ELU(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 12),
        nn.SiLU(),
        nn.Dropout(0.5),
        nn.Linear(12, 4),
    )


def two_pools() -> nn.Sequential:
    """Overlapping max pooling, then average pooling: floor division drops rows."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 3),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(5, 6, 3),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 3),
    )


def fully_conv() -> nn.Sequential:
    """No Linear: stride-3 average pooling down to a 1 x 1 map."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.GELU(),
        nn.AvgPool2d(3, stride=3),
        nn.Conv2d(4, 3, 3),
    )


def pixelwise() -> nn.Sequential:
    """P = 1: a per-pixel classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5, 7),
        nn.Sigmoid(),
        nn.Linear(7, 2),
    )


class Squares(sparse.PixelwiseModule):
    """Appends each channel's square: a pixel-wise layer that adds channels."""

    def out_channels(self, in_channels: int) -> int:
        return 2 * in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x * x], 1)


def pixel_tail() -> nn.Sequential:
    """No Linear: strided context, then a per-pixel tail of 1 x 1 layers."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(6, 5, 2),
        Squares(),
        nn.Conv2d(10, 7, 1),
        nn.Tanh(),
        nn.Conv2d(7, 4, 1),
    )


def nested_grouped() -> nn.Sequential:
    """Nested Sequential, grouped and dilated convolutions, PReLU, Tanh."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.PReLU(6)),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(6, 4, 3, dilation=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def anisotropic() -> nn.Sequential:
    """Different strides and kernels per axis, the same 7 x 7 patch."""
    return nn.Sequential(
        nn.Conv2d(3, 4, (4, 3), stride=(1, 2)),
        nn.ReLU(),
        nn.Conv2d(4, 5, (3, 2)),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 3),
    )


def linear_tail() -> nn.Sequential:
    """A pixel-wise layer between two Linear layers (it sees (N, F) per patch)."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 4),
        Squares(),
        nn.Linear(8, 3),
    )


def volumetric() -> nn.Sequential:
    """3D: Conv3d, MaxPool3d and a Linear over a 2 x 2 x 2 map."""
    return nn.Sequential(
        nn.Conv3d(2, 3, 2),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(3, 4, 2),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(4 * 8, 3),
    )


# builder, true patch size, input shape (batch > 1, non-square, several channels)
ARCHS: dict[str, tuple[Callable[[], nn.Sequential], int, tuple[int, ...]]] = {
    "strided": (strided, 9, (2, 3, 20, 27)),
    "two_pools": (two_pools, 15, (2, 3, 20, 27)),
    "fully_conv": (fully_conv, 11, (2, 3, 20, 27)),
    "pixelwise": (pixelwise, 1, (2, 3, 20, 27)),
    "pixel_tail": (pixel_tail, 5, (2, 3, 20, 27)),
    "nested_grouped": (nested_grouped, 13, (3, 3, 17, 23)),
    "anisotropic": (anisotropic, 7, (2, 3, 20, 27)),
    "linear_tail": (linear_tail, 5, (2, 3, 20, 27)),
    "volumetric": (volumetric, 7, (2, 2, 9, 10, 11)),
}


def make(
    name: str, dtype: torch.dtype, seed: int = 0
) -> tuple[nn.Sequential, DenseNet, torch.Tensor]:
    """A patch net (eval mode), its dense net, and a fresh random input."""
    build, _, shape = ARCHS[name]
    torch.manual_seed(seed)
    net = build().to(dtype).eval()
    return net, to_dense(net), torch.randn(shape, dtype=dtype)


def patches_at(x: torch.Tensor, coords: torch.Tensor, p: int) -> torch.Tensor:
    """Patches centred on ``coords`` (M, 1 + nd) of x reflect-padded by P // 2."""
    nd = x.dim() - 2
    xpad = F.pad(x, (p // 2,) * (2 * nd), mode="reflect") if p > 1 else x
    crops = []
    for n, *pos in coords.tolist():
        window = tuple(slice(i, i + p) for i in pos)
        crops.append(xpad[(n, slice(None), *window)])
    return torch.stack(crops)  # (M, C, *P)


@pytest.mark.parametrize("name", ARCHS)
def test_patch_size_is_the_true_receptive_field(name: str) -> None:
    net, dense, x = make(name, torch.float64)
    assert dense.patch_size == ARCHS[name][1]
    assert dense.halo == dense.patch_size // 2
    assert dense.ndim == x.dim() - 2
    assert dense.in_channels == x.shape[1]
    patch = torch.randn(1, x.shape[1], *(dense.patch_size,) * dense.ndim)
    logits = net(patch.double()).reshape(1, -1)  # the patch net takes exactly P
    assert logits.shape[1] == dense.num_classes


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ARCHS)
def test_dense_equals_patchwise_float64(name: str, strategy: str) -> None:
    net, dense, x = make(name, torch.float64, seed=1)
    ref = patchwise(net, x, batch_size=500)
    out = dense(x, strategy=strategy)
    assert out.shape == (x.shape[0], dense.num_classes, *x.shape[2:])
    assert (out - ref).abs().max().item() <= 1e-12


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ARCHS)
def test_dense_equals_patchwise_float32(name: str, strategy: str) -> None:
    net, dense, x = make(name, torch.float32, seed=2)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                layer.weight.mul_(2.0)  # logits of order 1, not 0.1
        ref = patchwise(net, x)
        out = dense(x, strategy=strategy)
    assert ref.abs().max().item() > 0.3
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["two_pools", "volumetric"])
def test_auto_strategy_equals_forced_ones(name: str) -> None:
    _, dense, x = make(name, torch.float64, seed=3)
    assert dense.strategy == "auto"
    auto = dense(x)
    for strategy in STRATEGIES:
        assert torch.allclose(auto, dense(x, strategy=strategy), rtol=0, atol=1e-13)


def masked_loss_grads(
    net: nn.Sequential, logits: torch.Tensor, target: torch.Tensor
) -> list[torch.Tensor]:
    net.zero_grad()
    F.cross_entropy(logits, target, reduction="sum").backward()
    return [p.grad.clone() for p in net.parameters()]


def max_rel_diff(grads: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    return max(
        ((g - r).abs().max() / r.abs().max()).item()
        for g, r in zip(grads, refs, strict=True)
    )


GRADIENT_CASES = [(name, torch.float64, 1e-10) for name in ARCHS] + [
    (name, torch.float32, 1e-4) for name in ("strided", "two_pools", "volumetric")
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("name", "dtype", "tol"), GRADIENT_CASES)
def test_masked_gradients_equal_sum_of_patch_gradients(
    name: str, strategy: str, dtype: torch.dtype, tol: float
) -> None:
    net, dense, x = make(name, dtype, seed=4)
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand((x.shape[0], *x.shape[2:]), generator=gen) < 0.15
    mask[0, (0,) * dense.ndim] = True  # a corner pixel: reflected patch
    coords = mask.nonzero()
    target = torch.randint(dense.num_classes, (len(coords),), generator=gen)

    patches = patches_at(x, coords, dense.patch_size)
    refs = masked_loss_grads(net, net(patches).reshape(len(coords), -1), target)
    full = dense(x, strategy=strategy).movedim(1, -1)[mask]  # (M, K)
    assert max_rel_diff(masked_loss_grads(net, full, target), refs) <= tol
    sparse_head = dense.pixels(x, mask, strategy=strategy)  # (M, K)
    assert max_rel_diff(masked_loss_grads(net, sparse_head, target), refs) <= tol


@pytest.mark.parametrize("painted", [0.0, 0.1, 0.6])  # none, sparse head, dense
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["strided", "fully_conv", "pixel_tail", "volumetric"])
def test_pixels_equal_dense_output_at_mask(
    name: str, strategy: str, painted: float
) -> None:
    _, dense, x = make(name, torch.float64, seed=6)
    mask = torch.rand((x.shape[0], *x.shape[2:])) < painted
    expected = dense(x, strategy=strategy).movedim(1, -1)[mask]
    got = dense.pixels(x, mask, strategy=strategy)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_a_per_pixel_tail_runs_on_the_masked_pixels_only() -> None:
    net, dense, x = make("pixel_tail", torch.float64, seed=8)
    seen: list[tuple[int, ...]] = []
    net[3].register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    mask = torch.rand((x.shape[0], *x.shape[2:])) < 0.6
    dense.pixels(x, mask)
    assert seen == [(int(mask.sum()), 5, 1, 1)]  # one row per masked pixel


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["strided", "two_pools", "volumetric"])
def test_valid_mode_on_crops_equals_region_of_full_result(
    name: str, strategy: str
) -> None:
    _, dense, x = make(name, torch.float64, seed=7)
    h, nd = dense.halo, dense.ndim
    full = dense(x, strategy=strategy)
    xpad = F.pad(x, (h,) * (2 * nd), mode="reflect")
    sizes = x.shape[2:]
    # corner, interior and far-border crops of uneven sizes
    for starts, lengths in [((0,) * nd, (5,) * nd), ((3,) * nd, (4, 6, 3)[:nd])]:
        ends = [
            min(s + n, size) for s, n, size in zip(starts, lengths, sizes, strict=True)
        ]
        region = tuple(slice(s, e) for s, e in zip(starts, ends, strict=True))
        crop = xpad[
            (
                slice(None),
                slice(None),
                *(slice(s, e + 2 * h) for s, e in zip(starts, ends, strict=True)),
            )
        ]
        got = dense(crop, valid=True, strategy=strategy)
        expected = full[(slice(None), slice(None), *region)]
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-12
    tail = xpad[..., -(dense.patch_size + 2) :]  # the last three columns
    assert torch.allclose(dense(tail, valid=True), full[..., -3:], atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dense_shares_parameters_with_patch_net(strategy: str) -> None:
    net, dense, x = make("two_pools", torch.float64, seed=8)
    assert [id(p) for p in dense.parameters()] == [id(p) for p in net.parameters()]
    before = patchwise(net, x)
    opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    mask = torch.rand(x.shape[0], *x.shape[2:]) < 0.2
    dense(x, strategy=strategy).movedim(1, -1)[mask].square().sum().backward()
    opt.step()
    after = patchwise(net, x)  # the patch net sees the step taken on dense
    assert (after - before).abs().max().item() > 1e-3
    assert (dense(x, strategy=strategy) - after).abs().max().item() <= 1e-12


def test_strategy_attribute_and_override() -> None:
    _, dense, x = make("strided", torch.float64, seed=9)
    dense.strategy = "bogus"
    with pytest.raises(ValueError, match="unknown strategy 'bogus'"):
        dense(x)
    dense(x, strategy="dilated")  # a per-call override wins
    dense.strategy = "space_to_batch"
    dense(x)


def test_auto_trains_with_space_to_batch_and_predicts_dilated_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert choose_strategy(torch.zeros(1, 3, 600, 600)) == "space_to_batch"
    assert choose_strategy(torch.zeros(1, 1, 40, 40, 40), grad=True) == (
        "space_to_batch"
    )
    with torch.no_grad():
        assert choose_strategy(torch.zeros(1, 3, 600, 600)) == "dilated"
    assert choose_strategy(torch.zeros(1, 3, 60, 60), grad=False) == "dilated"

    used: list[str] = []
    run_phased = sparse._run_phased

    def spy(ops: object, x: torch.Tensor, size: object, strategy: str) -> object:
        used.append(strategy)
        return run_phased(ops, x, size, strategy)

    monkeypatch.setattr(sparse, "_run_phased", spy)
    _, dense, x = make("strided", torch.float32)
    dense(x)
    with torch.no_grad():
        dense(x)
    assert used == ["space_to_batch", "dilated"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cpu_convolutions_run_channels_last(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NCHW dilated backward is a ~50x slower oneDNN path: never feed it NCHW."""
    seen: list[bool] = []
    conv2d = F.conv2d

    def spy(x: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return conv2d(x, *args)

    monkeypatch.setattr(F, "conv2d", spy)
    torch.manual_seed(10)
    net = nn.Sequential(nn.Conv2d(1, 4, 2), nn.MaxPool2d(2), nn.Conv2d(4, 2, 3))
    x = torch.randn(2, 1, 12, 13)  # one channel: ambiguous memory format
    to_dense(net)(x, strategy=strategy).sum().backward()
    assert seen
    assert all(seen)


def test_iter_patches_cover_every_pixel_in_order() -> None:
    x = torch.randn(2, 3, 7, 8)
    batches = list(iter_patches(x, 5, batch_size=13))
    patches = torch.cat(batches)
    assert patches.shape == (2 * 7 * 8, 3, 5, 5)
    coords = torch.tensor(list(itertools.product(range(2), range(7), range(8))))
    assert torch.equal(patches, patches_at(x, coords, 5))


def hooked_macs(net: nn.Sequential, patch: torch.Tensor) -> int:
    """MACs of one patch, counted from the layer outputs: out size x fan-in."""
    counted: list[int] = []

    def hook(module: nn.Module, _: object, out: torch.Tensor) -> None:
        counted.append(out.numel() * module.weight[0].numel())

    hooks = [
        layer.register_forward_hook(hook)
        for layer in net.modules()
        if isinstance(layer, (nn.Conv2d, nn.Conv3d, nn.Linear))
    ]
    net(patch)
    for handle in hooks:
        handle.remove()
    return sum(counted)


def test_macs_count_every_multiply_accumulate() -> None:
    _, dense, _ = make("pixelwise", torch.float32)
    assert dense.macs() == 3 * 5 + 5 * 7 + 7 * 2
    assert dense.macs((4, 6)) == dense.macs() * 24
    for name in ["strided", "two_pools", "volumetric"]:
        net, dense, x = make(name, torch.float32)
        patch = torch.randn(1, x.shape[1], *(dense.patch_size,) * dense.ndim)
        assert dense.macs_per_patch() == hooked_macs(net, patch)


REJECTED: list[tuple[Callable[[], nn.Module], str]] = [
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
        r"layer 1 \(BatchNorm2d\): normalisation",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)),
        r"layer 1 \(GroupNorm\): normalisation",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)),
        r"layer 1 \(InstanceNorm2d\): normalisation",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)),
        r"layer 0 \(Conv2d\): padding=\(1, 1\): must be 0",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding="same")),
        r"layer 0 \(Conv2d\): padding='same': must be 0",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding_mode="reflect")),
        r"layer 0 \(Conv2d\): padding_mode='reflect'",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 2), nn.MaxPool2d(2, padding=1)),
        r"layer 1 \(MaxPool2d\): padding=1: must be 0",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 2), nn.MaxPool2d(2, ceil_mode=True)),
        r"layer 1 \(MaxPool2d\): ceil_mode=True",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 2), nn.AvgPool2d(2, ceil_mode=True)),
        r"layer 1 \(AvgPool2d\): ceil_mode=True",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 2), nn.AvgPool2d(2, divisor_override=3)),
        r"layer 1 \(AvgPool2d\): divisor_override",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 2), nn.MaxPool2d(2, return_indices=True)),
        r"layer 1 \(MaxPool2d\): return_indices",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2)),
        r"layer 1 \(Upsample\): unsupported module",
    ),
    (
        lambda: nn.Sequential(nn.Conv1d(3, 4, 3)),
        r"layer 0 \(Conv1d\): unsupported module",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 2), nn.ReLU()),
        r"patch size 2 is even",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(30, 2)),
        r"layer 2 \(Linear\): in_features=30 does not match the patch geometry",
    ),
    (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(72, 5), nn.Linear(6, 2)
        ),
        r"layer 3 \(Linear\): in_features=6, expected 5",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.Linear(8, 2)),
        r"layer 1 \(Linear\): applied to a spatial map: put nn.Flatten",
    ),
    (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(27, 2)),
        r"layer 1 \(Linear\): cannot tell the input channels",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Conv2d(8, 2, 1)),
        r"layer 2 \(Conv2d\): spatial layers must come before Flatten",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(start_dim=0)),
        r"layer 1 \(Flatten\): only Flatten\(start_dim=1",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool3d(2)),
        r"layer 1 \(MaxPool3d\): mixes 3D with 2D",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(4, 2, 1)),
        r"layer 1 \(Conv2d\): in_channels=4, map has 8",
    ),
    (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.Flatten(), Squares(), nn.Linear(144, 2)
        ),
        r"layer 2 \(Squares\): pixel-wise layers cannot sit between Flatten",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Softmax(dim=-1)),
        r"layer 1 \(Softmax\): only dim=1",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 8, (3, 5))),
        r"receptive field differs between axes",
    ),
    (lambda: nn.Conv2d(3, 8, 3), r"expected an nn.Sequential"),
    (lambda: nn.Sequential(nn.ReLU()), r"has no Conv2d/Conv3d"),
]


@pytest.mark.parametrize(("build", "match"), REJECTED)
def test_rejects_layers_that_cannot_be_exact(
    build: Callable[[], nn.Module], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        to_dense(build())


def test_stated_patch_size_is_checked() -> None:
    assert to_dense(two_pools(), patch_size=15).patch_size == 15
    with pytest.raises(ValueError, match="patch size 16 drops 1 border rows"):
        to_dense(two_pools(), patch_size=16)
    with pytest.raises(ValueError, match=r"final map of side 2.*needs a 1 x 1 map"):
        to_dense(fully_conv(), patch_size=15)
    with pytest.raises(ValueError, match=r"final map of side 1.*map of side 2"):
        to_dense(two_pools(), patch_size=13)


def test_rejects_inputs_it_cannot_classify() -> None:
    _, dense, _ = make("two_pools", torch.float32)  # P = 15, halo 7
    with pytest.raises(ValueError, match=r"too small to reflect-pad by the halo of 7"):
        dense(torch.randn(1, 3, 7, 30))
    with pytest.raises(ValueError, match=r"valid mode needs .* >= the patch size 15"):
        dense(torch.randn(1, 3, 14, 30), valid=True)
    with pytest.raises(ValueError, match=r"expected a \(N, C, H, W\) tensor with C=3"):
        dense(torch.randn(1, 2, 20, 20))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        dense.pixels(torch.randn(1, 3, 20, 20), torch.ones(1, 20, 19, dtype=bool))
    assert dense(torch.randn(1, 3, 8, 8)).shape == (1, 3, 8, 8)  # halo + 1 works
