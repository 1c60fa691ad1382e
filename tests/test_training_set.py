"""Training on several images: sizes, balance, warm changes, channels, normalisation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_dsparse.data import InputError, Normalization, as_channels_first
from napari_dsparse.export import load_classifier, save_classifier
from napari_dsparse.predict import predict_proba
from napari_dsparse.train import TrainConfig, Trainer, _stack, masked_cross_entropy
from napari_dsparse.training_set import TrainingSet

CROPS = TrainConfig(batch_size=4, crop_size=16)


@pytest.fixture
def wide_image(rng) -> np.ndarray:
    """A (1, 1, 30, 70) image of another size and brightness than ``gray_image``."""
    image = rng.normal(200, 30, (30, 70))
    image[:, 35:] += 300
    return as_channels_first(image.astype(np.float32))


@pytest.fixture
def wide_labels() -> np.ndarray:
    labels = np.zeros((30, 70), np.uint8)
    labels[10:12, 5:25] = 1
    labels[18:20, 45:65] = 2
    return labels


def _sampled_pairs(trainer: Trainer, draws: int = 200) -> Counter:
    return Counter(
        trainer.training_set.sample_crop(trainer.rng, 16).pair.name
        for _ in range(draws)
    )


def test_pairs_of_different_sizes_train_in_both_modes(
    make_classifier, gray_image, disc_labels, wide_image, wide_labels
) -> None:
    classifier = make_classifier(gray_image)
    training_set = TrainingSet(classifier.normalization, classifier.num_classes)
    training_set.add("disc", gray_image, disc_labels)
    training_set.add("wide", wide_image, wide_labels)
    for config, mode in ((CROPS, "crops"), (TrainConfig(batch_size=64), "whole")):
        trainer = Trainer.from_set(classifier, training_set, config)
        assert trainer.choose_mode() == mode
        batch = trainer.crop_batch() if mode == "crops" else trainer.whole_batch()
        if mode == "whole":  # padded to the largest height and width
            assert batch.targets.shape == (2, 45, 70)
            assert (batch.targets[1, 30:] == 0).all()
        loss, used = trainer.step()
        assert used == mode and np.isfinite(loss)
    assert trainer.counts.tolist() == [
        int((disc_labels == 1).sum() + (wide_labels == 1).sum()),
        int((disc_labels == 2).sum() + (wide_labels == 2).sum()),
    ]


def test_padding_windows_of_different_sizes_changes_neither_loss_nor_gradient(
    make_classifier, gray_image, disc_labels, wide_image, wide_labels
) -> None:
    classifier = make_classifier(gray_image)
    training_set = TrainingSet(classifier.normalization, classifier.num_classes)
    training_set.add("disc", gray_image, disc_labels)
    training_set.add("wide", wide_image, wide_labels)
    trainer = Trainer.from_set(classifier, training_set, TrainConfig(augment=False))
    items = [
        trainer._item(pair, z, (0, pair.image.shape[-2]), (0, pair.image.shape[-1]))
        for pair, z in training_set.painted_units
    ]
    weights = trainer.weights
    params = [p for p in classifier.patch_net.parameters() if p.requires_grad]

    batch = _stack(items)
    padded = masked_cross_entropy(
        classifier.dense(batch.windows, valid=True), batch.targets, weights
    )
    padded_grads = torch.autograd.grad(padded, params)

    # independent: each window alone, unpadded, summed by hand
    total, norm = 0.0, 0.0
    for window, target in items:
        logits = classifier.dense(torch.from_numpy(window[None]), valid=True)
        target = torch.from_numpy(np.ascontiguousarray(target))[None].long()
        classes = (target - 1).clamp(min=0)
        pixel_weights = weights[classes] * (target > 0)
        total = (
            total
            + (F.cross_entropy(logits, classes, reduction="none") * pixel_weights).sum()
        )
        norm = norm + pixel_weights.sum()
    separate = total / norm
    separate_grads = torch.autograd.grad(separate, params)

    torch.testing.assert_close(padded, separate, rtol=1e-5, atol=1e-6)
    for a, b in zip(padded_grads, separate_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_adding_and_removing_a_pair_between_steps_changes_what_is_sampled(
    make_classifier, gray_image, disc_labels, wide_image, wide_labels
) -> None:
    trainer = Trainer(make_classifier(gray_image), gray_image, disc_labels, CROPS)
    trainer.step()
    optimizer, version = trainer.optimizer, trainer.labels_version
    assert set(_sampled_pairs(trainer)) == {"image"}

    trainer.add_pair("wide", wide_image, wide_labels)
    drawn = _sampled_pairs(trainer)
    assert set(drawn) == {"image", "wide"}
    assert min(drawn.values()) > 50  # both images weigh about the same
    trainer.step()
    assert trainer.steps_done == 2 and trainer.optimizer is optimizer  # warm
    assert trainer.labels_version > version

    trainer.remove_pair("image")
    assert set(_sampled_pairs(trainer)) == {"wide"}
    with pytest.raises(InputError, match="no painted pixels"):
        trainer.remove_pair("wide")  # the last painted pair stays
    assert trainer.training_set.names == ["wide"]


def test_sampling_is_balanced_across_classes_and_images(
    make_classifier, gray_image, wide_image
) -> None:
    big = np.zeros((45, 52), np.uint8)
    big[:20, :] = 1  # 1040 pixels of class 1
    big[40, 40] = 2  # one pixel of class 2
    small = np.zeros((30, 70), np.uint8)
    small[5, 5] = 1  # one pixel of class 1
    classifier = make_classifier(gray_image)
    training_set = TrainingSet(classifier.normalization, classifier.num_classes)
    training_set.add("big", gray_image, big)
    training_set.add("small", wide_image, small)
    rng = np.random.default_rng(0)
    draws = Counter()
    for _ in range(4000):
        crop = training_set.sample_crop(rng, 1)  # the crop is the sampled pixel
        (row, col) = crop.rows[0], crop.cols[0]
        draws[crop.pair.name, int(crop.pair.labels[crop.z, row, col])] += 1
    assert set(draws) == {("big", 1), ("big", 2), ("small", 1)}
    # class 2 half of the time; class 1 split evenly between the two images
    assert draws["big", 2] == pytest.approx(2000, abs=150)
    assert draws["big", 1] == pytest.approx(1000, abs=120)
    assert draws["small", 1] == pytest.approx(1000, abs=120)


def test_channels_must_agree(make_classifier, gray_image, disc_labels, rng) -> None:
    rgb = as_channels_first(rng.integers(0, 255, (45, 52, 3), dtype=np.uint8))
    classifier = make_classifier(gray_image)
    training_set = TrainingSet(classifier.normalization, classifier.num_classes)
    training_set.add("gray", gray_image, disc_labels)
    with pytest.raises(InputError, match="same channels"):
        training_set.add("rgb", rgb, disc_labels)
    assert training_set.names == ["gray"]
    trainer = Trainer(classifier, gray_image, disc_labels, CROPS)
    with pytest.raises(InputError, match="channel"):
        trainer.add_pair("rgb", rgb, disc_labels)
    assert trainer.training_set.names == ["image"]


def test_each_painted_slice_of_a_stack_is_a_unit_without_copying(
    make_classifier, gray_image, disc_labels
) -> None:
    stack = np.concatenate([gray_image] * 3, axis=1)  # (1, 3, 45, 52)
    labels = np.zeros(stack.shape[1:], np.uint8)
    labels[0], labels[2] = disc_labels, disc_labels
    training_set = TrainingSet(Normalization.from_image(stack), 2)
    pair = training_set.add("stack", stack, labels)
    assert pair.image is stack
    assert [z for _, z in training_set.painted_units] == [0, 2]
    rng = np.random.default_rng(1)
    slices = Counter(training_set.sample_crop(rng, 16).z for _ in range(400))
    assert set(slices) == {0, 2} and min(slices.values()) > 150


def test_each_image_gets_its_own_percentiles_by_default(gray_image, wide_image) -> None:
    default = Normalization.from_image(gray_image)
    assert default.policy == "per_image"
    training_set = TrainingSet(default, 2)
    labels = np.ones(wide_image.shape[2:], np.uint8)
    pair = training_set.add("wide", wide_image, labels)
    assert pair.normalization == Normalization.from_image(wide_image)
    assert pair.normalization.low != default.low

    fixed = Normalization.from_images([gray_image, wide_image], policy="fixed")
    pooled = np.concatenate([gray_image.ravel(), wide_image.ravel()])
    assert fixed.low[0] == pytest.approx(np.percentile(pooled, 1.0), rel=1e-6)
    training_set = TrainingSet(fixed, 2)
    assert training_set.add("wide", wide_image, labels).normalization is fixed


def test_per_image_policy_makes_predictions_invariant_to_brightness(
    make_classifier, gray_image, disc_labels
) -> None:
    classifier = make_classifier(gray_image)
    trainer = Trainer(classifier, gray_image, disc_labels, CROPS)
    for _ in range(30):
        trainer.step()
    brighter = (gray_image.astype(np.float64) * 3 + 500).astype(np.float32)
    same = predict_proba(classifier, gray_image)
    torch.testing.assert_close(
        predict_proba(classifier, brighter), same, rtol=1e-4, atol=1e-5
    )
    classifier.normalization = Normalization(
        classifier.normalization.low, classifier.normalization.high, "fixed"
    )
    assert np.abs(predict_proba(classifier, brighter) - same).max() > 0.1


def test_the_policy_is_stored_with_the_model(make_classifier, gray_image, tmp_path):
    classifier = make_classifier(gray_image)
    path = save_classifier(classifier, tmp_path / "model.pt")
    assert load_classifier(path).normalization == classifier.normalization
    old = {"low": [1.0], "high": [2.0]}  # a file written before policies existed
    assert Normalization.from_dict(old).policy == "fixed"
    with pytest.raises(InputError, match="policy"):
        Normalization((0.0,), (1.0,), "per_slice")


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_labels_are_copied_once_so_later_paint_does_not_leak_in(dtype) -> None:
    image = as_channels_first(np.zeros((6, 7), np.float32))
    labels = np.zeros((6, 7), dtype)
    labels[1, 1], labels[4, 5] = 1, 2
    training_set = TrainingSet(Normalization.from_image(image), num_classes=2)
    pair = training_set.add("a", image, labels)
    labels[2, 2] = 1  # the user paints on after the snapshot
    assert pair.labels[0, 2, 2] == 0
    assert not np.may_share_memory(pair.labels, labels)
    assert pair.image is image  # images are never copied
