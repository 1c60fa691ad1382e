"""Masked, class-balanced training: what counts, what does not, determinism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_dsparse import train as train_module
from napari_dsparse.data import (
    InputError,
    Normalization,
    as_channels_first,
    read_window,
)
from napari_dsparse.predict import predict_proba
from napari_dsparse.train import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainStatus,
    iter_train,
    masked_cross_entropy,
    painted_cross_entropy,
)

WHOLE = TrainConfig(augment=False, batch_size=64)  # whole-image steps for small images


def _parameters(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.classifier.patch_net.parameters()]


@pytest.mark.parametrize("focal_gamma", [0.0, 2.0])
def test_unpainted_logits_get_no_gradient(rng, focal_gamma) -> None:
    logits = torch.tensor(rng.normal(size=(2, 3, 5, 6)), requires_grad=True)
    targets = torch.tensor(rng.integers(0, 4, (2, 5, 6)))
    weights = torch.tensor([1.0, 2.0, 0.5])
    loss = masked_cross_entropy(logits, targets, weights, focal_gamma)
    loss.backward()
    unpainted = (targets == 0).unsqueeze(1).expand_as(logits)
    assert logits.grad[unpainted].abs().max() == 0
    assert logits.grad[~unpainted].abs().max() > 0


def test_masked_loss_is_the_weighted_mean_over_painted_pixels() -> None:
    logits = torch.zeros(1, 2, 1, 3)
    targets = torch.tensor([[[0, 1, 2]]])
    loss = masked_cross_entropy(logits, targets, torch.tensor([1.0, 3.0]))
    assert loss.item() == pytest.approx(np.log(2))


@pytest.mark.parametrize("focal_gamma", [0.0, 2.0])
def test_painted_loss_equals_the_masked_loss_on_dense_logits(rng, focal_gamma) -> None:
    logits = torch.tensor(rng.normal(size=(2, 3, 5, 6)))
    targets = torch.tensor(rng.integers(0, 4, (2, 5, 6)))
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    painted = targets > 0
    flat = logits.movedim(1, -1)[painted]  # (M, K)
    torch.testing.assert_close(
        painted_cross_entropy(flat, targets[painted] - 1, weights, focal_gamma),
        masked_cross_entropy(logits, targets, weights, focal_gamma),
    )


@pytest.mark.parametrize("focal_gamma", [0.0, 1.0, 2.0, 4.5])
def test_the_focal_loss_is_its_formula(rng, focal_gamma) -> None:
    logits = rng.normal(scale=3.0, size=(40, 3))
    classes = rng.integers(0, 3, 40)
    weights = np.array([1.0, 2.0, 0.5])
    exp = np.exp(logits - logits.max(1, keepdims=True))
    p = (exp / exp.sum(1, keepdims=True))[np.arange(40), classes]
    per_pixel = -((1 - p) ** focal_gamma) * np.log(p)
    expected = (per_pixel * weights[classes]).sum() / weights[classes].sum()
    loss = painted_cross_entropy(
        torch.tensor(logits), torch.tensor(classes), torch.tensor(weights), focal_gamma
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_the_step_takes_the_configured_focal_loss(
    make_classifier, gray_image, disc_labels
) -> None:
    losses = {}
    for gamma in (0.0, 2.0):
        trainer = Trainer(
            make_classifier(gray_image),
            gray_image,
            disc_labels,
            replace(WHOLE, focal_gamma=gamma),
        )
        losses[gamma], _ = trainer.step()
    # the same batch and weights, each pixel's loss scaled by (1 - p)**2 < 1
    assert 0 < losses[2.0] < losses[0.0]


@pytest.mark.parametrize("focal_gamma", [-1.0, 0.5, 11.0, float("nan")])
def test_focal_gammas_that_cannot_train_are_refused(focal_gamma) -> None:
    with pytest.raises(ValueError, match="focal_gamma must be 0 or between 1 and 10"):
        TrainConfig(focal_gamma=focal_gamma)


def test_pixels_outside_every_painted_patch_do_not_change_a_step(
    make_classifier, gray_image, rng
) -> None:
    labels = np.zeros(gray_image.shape[2:], np.uint8)
    labels[5, 5], labels[6, 8] = 1, 2  # patches reach at most row/col 5 + halo
    changed = gray_image.copy()
    changed[..., 30:, 30:] = rng.integers(0, 3000, changed[..., 30:, 30:].shape)
    after = []
    for image in (gray_image, changed):
        classifier = make_classifier(gray_image)
        # one fixed normalisation for both images (per-image would differ)
        classifier.normalization = Normalization.from_image(gray_image, policy="fixed")
        classifier.fit_feature_scale(gray_image)  # and one feature scale
        trainer = Trainer(classifier, image, labels, WHOLE)
        trainer.step()
        after.append(_parameters(trainer))
    for a, b in zip(*after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_crop_and_whole_image_losses_give_the_same_gradients(
    make_classifier, gray_image, disc_labels
) -> None:
    classifier = make_classifier(gray_image)
    net, norm, halo = classifier.dense, classifier.normalization, classifier.halo
    params = [p for p in net.parameters() if p.requires_grad]
    targets = torch.from_numpy(disc_labels.astype(np.int64))
    weights = torch.tensor([1.0, 2.0])

    def summed_loss(rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        window = torch.from_numpy(read_window(gray_image, norm, 0, rows, cols, halo))
        logits = net(window[None], valid=True)  # (1, K, h, w)
        crop = targets[None, rows[0] : rows[1], cols[0] : cols[1]]
        classes = (crop - 1).clamp(min=0)
        per_pixel = F.cross_entropy(logits, classes, reduction="none")
        return (per_pixel * weights[classes] * (crop > 0)).sum()

    height, width = disc_labels.shape
    whole = torch.autograd.grad(summed_loss((0, height), (0, width)), params)
    crops = sum(
        summed_loss((r, min(r + 16, height)), (c, min(c + 20, width)))
        for r in range(0, height, 16)
        for c in range(0, width, 20)
    )
    tiled = torch.autograd.grad(crops, params)
    for a, b in zip(whole, tiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_step_mode_follows_the_cost(make_classifier, gray_image, disc_labels) -> None:
    small = Trainer(make_classifier(gray_image), gray_image, disc_labels, TrainConfig())
    assert small.choose_mode() == "whole"
    big_image = np.zeros((1, 1, 400, 500), np.uint8)
    big_labels = np.zeros((400, 500), np.uint8)
    big_labels[10, 10], big_labels[300, 300] = 1, 2
    big = Trainer(make_classifier(big_image), big_image, big_labels, TrainConfig())
    assert big.choose_mode() == "crops"
    side = 64 + 2 * big.classifier.halo
    assert big.crop_batch().windows.shape == (8, 1, side, side)


def test_mixing_pastes_a_rectangle_of_another_crop_with_its_labels(
    make_classifier,
) -> None:
    image = np.zeros((1, 1, 200, 200), np.uint8)
    labels = np.zeros((200, 200), np.uint8)
    labels[10, 10], labels[100, 100] = 1, 2
    trainer = Trainer(make_classifier(image), image, labels, TrainConfig(mix=1.0))
    halo, side = trainer.classifier.halo, 40
    items = [  # crop i: window all 10 * i, labels all i (classes 1..6)
        (
            np.full((1, side + 2 * halo, side + 2 * halo), 10.0 * i, np.float32),
            np.full((side, side), i, np.uint8),
        )
        for i in range(1, 7)
    ]
    mixed = trainer._mix(items)
    assert [t.min() for _, t in items] == list(range(1, 7))  # inputs untouched
    changed = 0
    for i, (window, target) in enumerate(mixed, start=1):
        pasted = target != i
        if not pasted.any():
            continue
        changed += 1
        assert len(np.unique(target[pasted])) == 1  # from one other crop
        rows, cols = np.nonzero(pasted.any(1))[0], np.nonzero(pasted.any(0))[0]
        assert pasted.sum() == rows.size * cols.size  # a rectangle
        assert side // 4 <= min(rows.size, cols.size)
        assert max(rows.size, cols.size) <= 3 * side // 4
        inner = window[0, halo:-halo, halo:-halo]  # each output pixel's centre
        np.testing.assert_array_equal(inner, 10.0 * target)
        assert (window[0, :halo] == 10.0 * i).all()  # the halo ring stays
    assert changed >= 3
    unmixed = Trainer(make_classifier(image), image, labels, TrainConfig(mix=0.0))
    painted = (unmixed.crop_batch().targets > 0).sum((1, 2))
    assert (painted == 1).all()  # each crop holds its own painted pixel only
    with pytest.raises(ValueError, match="mix must be between 0 and 1"):
        TrainConfig(mix=1.5)


def test_training_is_deterministic_with_a_seed(
    make_classifier, gray_image, disc_labels
) -> None:
    runs = []
    for _ in range(2):
        trainer = Trainer(
            make_classifier(gray_image, seed=3),
            gray_image,
            disc_labels,
            TrainConfig(seed=7, crop_size=24),
        )
        losses = [status.loss for status in iter_train(trainer, steps=4)]
        runs.append((losses, _parameters(trainer)))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_new_label_snapshot_warm_starts(
    make_classifier, gray_image, disc_labels
) -> None:
    first = disc_labels.copy()
    first[first == 2] = 0
    first[21, 30] = 2
    trainer = Trainer(make_classifier(gray_image), gray_image, first, WHOLE)
    steps = iter_train(trainer, steps=6)
    statuses = [next(steps), next(steps)]
    before = _parameters(trainer)
    statuses.append(steps.send(disc_labels))
    statuses += list(steps)
    assert statuses[0].painted[1] == 1
    assert statuses[2].painted[1] == int((disc_labels == 2).sum())
    assert [s.step for s in statuses] == [1, 2, 3, 4, 5, 6]
    assert statuses[2].labels_version == statuses[0].labels_version + 1
    moved = [
        (a - b).abs().max() for a, b in zip(before, _parameters(trainer), strict=True)
    ]
    assert max(moved) < 1.0  # continued from the trained weights, not reset


def test_the_learning_rate_halves_per_half_life_until_new_labels(
    make_classifier, gray_image, disc_labels
) -> None:
    def rates(trainer: Trainer, steps: int) -> list[float]:
        taken = []
        for _ in range(steps):
            trainer.step()
            taken.append(trainer.optimizer.param_groups[0]["lr"])
        return taken

    config = TrainConfig(learning_rate=1e-3, lr_half_life=4, crop_size=24)
    trainer = Trainer(make_classifier(gray_image), gray_image, disc_labels, config)
    decayed = rates(trainer, 9)
    assert decayed[0] == 1e-3
    assert decayed[4] == pytest.approx(5e-4)
    assert decayed[8] == pytest.approx(2.5e-4)
    trainer.set_labels(disc_labels)  # a new snapshot: back to the full rate
    assert rates(trainer, 2) == [1e-3, pytest.approx(1e-3 * 0.5**0.25)]
    status = next(iter_train(trainer, steps=1))  # after 3 steps on these labels
    assert status.learning_rate == pytest.approx(1e-3 * 0.5**0.75)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**0.5)
    constant = replace(config, lr_half_life=None)
    trainer = Trainer(make_classifier(gray_image), gray_image, disc_labels, constant)
    assert rates(trainer, 5) == [1e-3] * 5
    with pytest.raises(ValueError, match="lr_half_life"):
        TrainConfig(lr_half_life=0)


def test_snapshots_are_copies(make_classifier, gray_image, disc_labels) -> None:
    labels = disc_labels.copy()
    trainer = Trainer(make_classifier(gray_image), gray_image, labels, WHOLE)
    labels[:] = 0
    assert trainer.counts.sum() > 0


def test_no_painted_pixels_is_an_error(make_classifier, gray_image) -> None:
    with pytest.raises(InputError, match="no painted pixels"):
        Trainer(make_classifier(gray_image), gray_image, np.zeros((45, 52)), WHOLE)


def test_divergence_is_reported(make_classifier, gray_image, disc_labels) -> None:
    trainer = Trainer(
        make_classifier(gray_image),
        gray_image,
        disc_labels,
        TrainConfig(learning_rate=1e9),
    )
    with pytest.raises(TrainingDiverged, match="learning rate"):
        for _ in iter_train(trainer, steps=50):
            pass


@pytest.mark.parametrize("preset", ["fast", "pixel"])
def test_the_model_learns_the_painted_image(
    make_classifier, gray_image, disc_labels, preset
) -> None:
    trainer = Trainer(
        make_classifier(gray_image, preset=preset),
        gray_image,
        disc_labels,
        TrainConfig(),
    )
    for _ in iter_train(trainer, steps=150):
        pass
    proba = predict_proba(trainer.classifier, gray_image)  # (K, 1, Y, X)
    predicted = proba.argmax(axis=0)[0] + 1
    painted = disc_labels > 0
    assert (predicted[painted] == disc_labels[painted]).mean() == 1.0
    rows, cols = np.mgrid[:45, :52]
    inside = (rows - 22) ** 2 + (cols - 30) ** 2 < 8**2
    outside = (rows - 22) ** 2 + (cols - 30) ** 2 > 16**2
    assert (predicted[inside] == 2).mean() > 0.95
    assert (predicted[outside] == 1).mean() > 0.95


def test_the_class_prior_never_changes_a_step(
    make_classifier, gray_image, disc_labels
) -> None:
    runs = []
    for shift in (torch.zeros(2), torch.tensor([2.0, -3.0])):
        classifier = make_classifier(gray_image, seed=4)
        classifier.class_prior().log_ratio.copy_(shift)
        trainer = Trainer(classifier, gray_image, disc_labels, replace(WHOLE, seed=1))
        runs.append(([trainer.step()[0] for _ in range(2)], _parameters(trainer)))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_training_prior_is_the_weighted_class_shares_of_the_batches(
    make_classifier, gray_image, disc_labels
) -> None:
    balanced = Trainer(make_classifier(gray_image), gray_image, disc_labels, WHOLE)
    np.testing.assert_allclose(balanced.training_prior(), [0.5, 0.5])
    plain = Trainer(
        make_classifier(gray_image),
        gray_image,
        disc_labels,
        replace(WHOLE, class_balance=False),
    )
    counts = np.bincount(disc_labels.ravel())[1:]
    np.testing.assert_allclose(plain.training_prior(), counts / counts.sum())


def test_training_prior_of_crop_steps_matches_their_batches(make_classifier) -> None:
    image = np.zeros((1, 1, 300, 320), np.uint8)
    labels = np.zeros((300, 320), np.uint8)
    labels[20:23, 10:300] = 1  # long strokes of class 1, a short one of class 2
    labels[150:152, 100:120] = 2
    trainer = Trainer(
        make_classifier(image), image, labels, TrainConfig(class_balance=False)
    )
    assert trainer.choose_mode() == "crops"
    seen = np.zeros(2)
    for _ in range(200):
        targets = trainer.crop_batch().targets.numpy()
        seen += [(targets == 1).sum(), (targets == 2).sum()]
    np.testing.assert_allclose(trainer.training_prior(), seen / seen.sum(), atol=0.03)


def _small_class_image(rng) -> tuple[np.ndarray, np.ndarray, float]:
    """A bright square on 6 % of a dark image, painted as much as the background."""
    image = rng.normal(100, 5, (64, 64))
    image[20:36, 20:36] += 100
    labels = np.zeros((64, 64), np.uint8)
    labels[22:34, 22:34] = 2
    labels[2:14, 40:52] = 1
    return as_channels_first(image.astype(np.float32)), labels, 16 * 16 / 64**2


@pytest.mark.parametrize(("focal_gamma", "way"), [(0.0, 0.75), (2.0, 0.5)])
def test_the_fitted_prior_comes_near_the_image_share(
    make_classifier, rng, focal_gamma, way
) -> None:
    image, labels, share = _small_class_image(rng)
    config = replace(WHOLE, focal_gamma=focal_gamma)
    trainer = Trainer(make_classifier(image, preset="pixel"), image, labels, config)
    for _ in range(150):
        trainer.step()
    prior = trainer.fit_class_prior()
    # the mean posterior: most of the way from the training prior (0.5) to the
    # share, never past it; the focal loss's softer posteriors go less far
    assert share - 0.01 < prior[1] < share + (1 - way) * (0.5 - share)
    ratio = trainer.classifier.class_prior().log_ratio.numpy()
    expected = 0.5 * np.log(prior / trainer.training_prior())
    np.testing.assert_allclose(ratio, expected, rtol=1e-5)
    assert ratio[1] < 0 < ratio[0]


def test_strength_zero_keeps_the_networks_posteriors(make_classifier, rng) -> None:
    image, labels, _ = _small_class_image(rng)
    classifier = make_classifier(image, preset="pixel")
    classifier.class_prior().log_ratio.fill_(1.0)  # say, from a loaded model
    trainer = Trainer(classifier, image, labels, replace(WHOLE, prior_strength=0))
    assert trainer.fit_class_prior() is None
    assert not classifier.class_prior().log_ratio.any()
    with pytest.raises(ValueError, match="prior_strength must be between 0 and 1"):
        TrainConfig(prior_strength=1.5)


def test_iter_train_fits_the_prior_when_its_budget_runs_out(
    make_classifier, rng
) -> None:
    image, labels, _ = _small_class_image(rng)
    trainer = Trainer(make_classifier(image, preset="pixel"), image, labels, WHOLE)
    steps = iter_train(trainer, steps=40)
    for _ in range(39):
        next(steps)
    assert not trainer.classifier.class_prior().log_ratio.any()
    list(steps)
    assert trainer.classifier.class_prior().log_ratio[1] < 0


def test_the_prior_sample_is_read_once_per_training_set(
    make_classifier, rng, monkeypatch
) -> None:
    image, labels, _ = _small_class_image(rng)
    trainer = Trainer(make_classifier(image, preset="pixel"), image, labels, WHOLE)
    reads = []
    original = train_module.read_window
    monkeypatch.setattr(
        train_module,
        "read_window",
        lambda *a, **k: reads.append(1) or original(*a, **k),
    )
    first = trainer.fit_class_prior()
    windows = len(reads)
    assert windows > 0
    np.testing.assert_allclose(trainer.fit_class_prior(), first, atol=1e-6)
    assert len(reads) == windows  # the same sample, not read again
    trainer.set_labels(labels)
    trainer.fit_class_prior()
    assert len(reads) == 2 * windows


@pytest.mark.parametrize(
    ("loss", "text"), [(1.2345e-4, "0.000123"), (0.5, "0.5"), (2.71828, "2.72")]
)
def test_small_losses_do_not_read_as_zero(loss, text) -> None:
    status = TrainStatus(1, loss, 10.0, (5, 5), "crops", 1, 1e-3)
    assert status.loss_text == text
