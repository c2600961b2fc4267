"""Training loss: Dice + CE (nnU-Net v2), ignore label, class masks, deep supervision, partial labels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pocketseg.trainer.loss import (
    IGNORE_INDEX,
    DeepSupervisionLoss,
    DiceCELoss,
    SoftDiceLoss,
    deep_supervision_scales,
    deep_supervision_weights,
    downsample_target,
    partial_label_target,
    soft_dice,
)

DETAIL_STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_case(b: int = 2, c: int = 4, shape: tuple[int, int, int] = (4, 6, 6), seed: int = 0):
    g = _gen(seed)
    logits = torch.randn((b, c, *shape), generator=g)
    target = torch.randint(0, c, (b, 1, *shape), generator=g)
    return logits, target


def _hard_logits(labels: torch.Tensor, c: int, magnitude: float = 50.0) -> torch.Tensor:
    """Logits (B, C, ...) whose softmax is (numerically) the one-hot of ``labels`` (B, 1, ...)."""
    onehot = F.one_hot(labels[:, 0].long(), c).movedim(-1, 1).float()
    return magnitude * (2 * onehot - 1)


def _ref_dice(probs: torch.Tensor, target: torch.Tensor, smooth: float) -> torch.Tensor:
    """Per-(sample, class) Dice from explicit voxel sums, no ignore voxels: the textbook formula."""
    b, c = probs.shape[:2]
    out = torch.empty(b, c, dtype=torch.float64)
    for i in range(b):
        for k in range(c):
            p = probs[i, k].double()
            y = (target[i, 0] == k).double()
            tp, fp, fn = (p * y).sum(), (p * (1 - y)).sum(), ((1 - p) * y).sum()
            out[i, k] = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    return out


# --- soft Dice and cross-entropy -------------------------------------------------------------


def test_perfect_prediction_gives_dice_minus_one_and_zero_ce():
    _, target = _random_case(c=4)
    assert set(target.unique().tolist()) == {0, 1, 2, 3}
    logits = _hard_logits(target, 4)
    for batch_dice in (True, False):
        assert soft_dice(logits, target, batch_dice=batch_dice) == pytest.approx(-1.0, abs=1e-6)
    ce_only = DiceCELoss(weight_dice=0.0)(logits, target)
    assert 0.0 <= ce_only.item() < 1e-6
    assert DiceCELoss()(logits, target).item() == pytest.approx(-1.0, abs=1e-5)


def test_uniform_prediction_ce_is_log_c_and_dice_matches_closed_form():
    c = 5
    _, target = _random_case(b=2, c=c, shape=(3, 5, 7), seed=1)
    logits = torch.zeros((2, c, 3, 5, 7), requires_grad=True)
    assert DiceCELoss(weight_dice=0.0)(logits, target).item() == pytest.approx(math.log(c), rel=1e-6)
    # p = 1/C everywhere: tp = n/C, fp = (N - n)/C, fn = n (1 - 1/C)  =>  Dice = 2n / (N + C n)
    n_total = target.numel()
    counts = torch.bincount(target.flatten(), minlength=c).double()
    expected = -(2 * counts[1:] / (n_total + c * counts[1:])).mean()
    assert soft_dice(logits, target, smooth=0.0).item() == pytest.approx(expected.item(), rel=1e-5)
    total = DiceCELoss()(logits, target)
    assert total.item() == pytest.approx(math.log(c) + expected.item(), rel=1e-5)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dice_matches_textbook_formula_for_random_inputs():
    logits, target = _random_case(b=3, c=4, seed=2)
    probs = torch.softmax(logits, 1)
    ref = _ref_dice(probs, target, smooth=1e-5)
    per_sample = soft_dice(logits, target, batch_dice=False, do_bg=True)
    assert per_sample.item() == pytest.approx(-ref.mean().item(), rel=1e-5)
    per_sample_fg = soft_dice(logits, target, batch_dice=False)
    assert per_sample_fg.item() == pytest.approx(-ref[:, 1:].mean().item(), rel=1e-5)


def test_ce_equals_torch_mean_with_ignore_index():
    logits, target = _random_case(seed=3)
    target[:, :, 0] = IGNORE_INDEX
    expected = F.cross_entropy(logits, target[:, 0], ignore_index=IGNORE_INDEX, reduction="mean")
    got = DiceCELoss(weight_dice=0.0)(logits, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    got_4d = DiceCELoss(weight_dice=0.0)(logits, target[:, 0])  # (B, z, y, x) target layout
    assert got_4d.item() == pytest.approx(expected.item(), rel=1e-6)


def test_weights_scale_the_two_terms():
    logits, target = _random_case(seed=4)
    ce = DiceCELoss(weight_dice=0.0)(logits, target)
    dc = DiceCELoss(weight_ce=0.0)(logits, target)
    assert dc.item() == pytest.approx(soft_dice(logits, target).item(), rel=1e-6)
    assert DiceCELoss(weight_ce=2.0, weight_dice=0.5)(logits, target).item() == pytest.approx(
        2 * ce.item() + 0.5 * dc.item(), rel=1e-6)


# --- ignore label -----------------------------------------------------------------------------


def test_ignore_voxels_do_not_change_the_loss():
    logits, target = _random_case(seed=5)
    ignored = torch.rand(target.shape, generator=_gen(6)) < 0.3
    target = torch.where(ignored, torch.full_like(target, IGNORE_INDEX), target)
    other = logits.clone()
    other[ignored.expand_as(other)] = 100.0 * torch.randn(int(ignored.expand_as(other).sum()), generator=_gen(7))
    assert not torch.equal(other, logits)
    for loss in (DiceCELoss(), DiceCELoss(batch_dice=False, do_bg=True)):
        assert loss(logits, target).item() == pytest.approx(loss(other, target).item(), rel=1e-6)


def test_ignore_voxels_get_zero_gradient_from_each_term():
    logits, target = _random_case(seed=8)
    ignored = torch.zeros(target.shape, dtype=torch.bool)
    ignored[:, :, 1:3, 2:5, :] = True
    target[ignored] = IGNORE_INDEX
    mask = ignored.expand(-1, logits.shape[1], -1, -1, -1)
    for loss in (DiceCELoss(weight_dice=0.0), DiceCELoss(weight_ce=0.0), DiceCELoss(weight_ce=0.0, do_bg=True)):
        x = logits.clone().requires_grad_(True)
        loss(x, target).backward()
        assert torch.count_nonzero(x.grad[mask]) == 0
        assert x.grad[~mask].abs().sum() > 0  # the labelled voxels do get gradient


def test_ignored_region_is_equivalent_to_cropping_it_away():
    logits, target = _random_case(b=2, c=3, shape=(4, 5, 5), seed=9)
    cropped_logits, cropped_target = logits[:, :, :2], target[:, :, :2]
    target = target.clone()
    target[:, :, 2:] = IGNORE_INDEX
    for kwargs in ({}, {"batch_dice": False}, {"do_bg": True}):
        assert DiceCELoss(**kwargs)(logits, target).item() == pytest.approx(
            DiceCELoss(**kwargs)(cropped_logits, cropped_target).item(), rel=1e-5)


def test_fully_ignored_sample_is_left_out_of_per_sample_dice():
    logits, target = _random_case(seed=21)
    target = target.clone()
    target[1] = IGNORE_INDEX
    one = soft_dice(logits[:1], target[:1], batch_dice=False)
    assert soft_dice(logits, target, batch_dice=False).item() == pytest.approx(one.item(), rel=1e-6)


def test_all_ignored_gives_zero_without_nan_and_backward_works():
    logits, target = _random_case(seed=10)
    target = torch.full_like(target, IGNORE_INDEX, dtype=torch.uint8)
    x = logits.clone().requires_grad_(True)
    loss = DiceCELoss()(x, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad) == 0


# --- class mask (partially annotated samples) ---------------------------------------------------


def _swap_bg_and_class2_mass(logits: torch.Tensor, sample: int, r: torch.Tensor) -> torch.Tensor:
    """New logits for ``sample`` with p0 + p2 and p1 unchanged but their split between 0 and 2 moved.

    With do_bg=False and class 2 masked for this sample, the Dice cannot see the
    difference; without the mask it must.
    """
    out = logits.clone()
    s = logits[sample, 0].exp() + logits[sample, 2].exp()
    out[sample, 0] = torch.log(s * r)
    out[sample, 2] = torch.log(s * (1 - r))
    return out


@pytest.mark.parametrize("batch_dice", [True, False])
def test_class_mask_makes_dice_blind_to_masked_class_predictions(batch_dice):
    logits, target = _random_case(b=2, c=3, seed=11)
    r = torch.rand(logits.shape[2:], generator=_gen(12)) * 0.98 + 0.01
    changed = _swap_bg_and_class2_mass(logits, sample=1, r=r)
    p_old, p_new = torch.softmax(logits, 1), torch.softmax(changed, 1)
    assert torch.allclose(p_old[:, 1], p_new[:, 1], atol=1e-6) and not torch.allclose(p_old[1, 2], p_new[1, 2])
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    kw = {"batch_dice": batch_dice}
    assert soft_dice(changed, target, mask, **kw).item() == pytest.approx(
        soft_dice(logits, target, mask, **kw).item(), rel=1e-5)
    assert abs(soft_dice(changed, target, **kw).item() - soft_dice(logits, target, **kw).item()) > 1e-3


def test_class_mask_matches_reference_for_batch_and_per_sample_dice():
    logits, target = _random_case(b=3, c=4, seed=13)
    probs = torch.softmax(logits, 1)
    smooth = 1e-5
    mask = torch.tensor([[True, True, True, True], [True, False, True, False], [False, True, False, False]])
    per_pair = _ref_dice(probs, target, smooth)
    got = soft_dice(logits, target, mask, batch_dice=False, smooth=smooth)
    assert got.item() == pytest.approx(-per_pair[:, 1:][mask[:, 1:]].mean().item(), rel=1e-5)
    # batch Dice: tp/fp/fn of class k summed over the samples that annotate k only
    dices = []
    for k in range(1, 4):
        rows = mask[:, k].nonzero().flatten()
        y = (target[rows, 0] == k).double()
        p = probs[rows, k].double()
        tp, fp, fn = (p * y).sum(), (p * (1 - y)).sum(), ((1 - p) * y).sum()
        dices.append((2 * tp + smooth) / (2 * tp + fp + fn + smooth))
    got = soft_dice(logits, target, mask, batch_dice=True, smooth=smooth)
    assert got.item() == pytest.approx(-torch.stack(dices).mean().item(), rel=1e-5)


def test_everything_masked_gives_zero_dice_with_a_gradient_path():
    logits, target = _random_case(seed=14)
    x = logits.clone().requires_grad_(True)
    none = torch.zeros(2, 4, dtype=torch.bool)
    only_bg = none.clone()
    only_bg[:, 0] = True  # background alone is dropped by do_bg=False
    for mask in (none, only_bg):
        dice = soft_dice(x, target, mask)
        assert dice.item() == 0.0 and dice.requires_grad
        dice.backward()
    ce = DiceCELoss(weight_dice=0.0)(logits, target)
    assert DiceCELoss()(logits, target, none).item() == pytest.approx(ce.item(), rel=1e-6)


# --- batch Dice vs per-sample Dice, background ---------------------------------------------------


def _constructed_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 8-voxel samples, two classes, hard predictions.

    Sample 0: foreground at 4 voxels, predicted exactly (tp 4, fp 0, fn 0).
    Sample 1: foreground at 1 voxel, predicted at another one (tp 0, fp 1, fn 1).
    """
    target = torch.zeros(2, 1, 2, 2, 2, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, 0, 0] = 1
    pred[0, 0, 0] = 1
    target[1, 0, 0, 0, 0] = 1
    pred[1, 0, 1, 1, 1] = 1
    return _hard_logits(pred, 2), target


def test_batch_dice_and_per_sample_dice_differ_as_computed_by_hand():
    logits, target = _constructed_pair()
    assert soft_dice(logits, target, batch_dice=False).item() == pytest.approx(-(1.0 + 0.0) / 2, abs=1e-5)
    assert soft_dice(logits, target, batch_dice=True).item() == pytest.approx(-(2 * 4) / (2 * 4 + 1 + 1), abs=1e-5)
    module = SoftDiceLoss(batch_dice=False)
    assert module(logits, target).item() == pytest.approx(-0.5, abs=1e-5)


def test_do_bg_adds_the_background_dice():
    logits, target = _constructed_pair()
    # background: sample 0 tp 4 fp 0 fn 0 -> 1; sample 1 tp 6 fp 1 fn 1 -> 12/14; batch tp 10 fp 1 fn 1 -> 20/22
    assert soft_dice(logits, target, batch_dice=False, do_bg=True).item() == pytest.approx(
        -(1.0 + 12 / 14 + 1.0 + 0.0) / 4, abs=1e-5)
    assert soft_dice(logits, target, batch_dice=True, do_bg=True).item() == pytest.approx(
        -(20 / 22 + 8 / 10) / 2, abs=1e-5)


def test_dice_runs_in_float32_for_half_precision_logits():
    logits, target = _random_case(seed=15)
    got = DiceCELoss()(logits.to(torch.bfloat16), target)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(DiceCELoss()(logits.to(torch.bfloat16).float(), target).item(), rel=1e-6)


# --- argument checks --------------------------------------------------------------------------


def test_bad_arguments_raise_clear_value_errors():
    logits, target = _random_case()
    with pytest.raises(ValueError, match="integer"):
        DiceCELoss()(logits, target.float())
    with pytest.raises(ValueError, match="does not match"):
        DiceCELoss()(logits, target[:, :, :2])
    with pytest.raises(ValueError, match="outside 0..3"):
        DiceCELoss()(logits, torch.full_like(target, 7))
    with pytest.raises(ValueError, match="class_mask must have shape"):
        soft_dice(logits, target, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        soft_dice(logits, target, torch.ones(2, 4))
    with pytest.raises(ValueError, match=">= 0"):
        DiceCELoss(weight_ce=-1.0)
    with pytest.raises(ValueError, match="smooth"):
        SoftDiceLoss(smooth=-1.0)


# --- deep supervision ---------------------------------------------------------------------------


def test_deep_supervision_weights_follow_nnunet():
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    five = deep_supervision_weights(5)
    assert five == pytest.approx([w / 1.875 for w in (1, 0.5, 0.25, 0.125, 0)])
    assert sum(five) == pytest.approx(1.0)
    assert deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_deep_supervision_loss_is_the_weighted_sum_and_skips_the_lowest_scale():
    g = _gen(16)
    shapes = [(4, 8, 8), (4, 4, 4), (2, 2, 2)]
    outputs = [torch.randn((2, 4, *s), generator=g, requires_grad=True) for s in shapes]
    targets = [torch.randint(0, 4, (2, 1, *s), generator=g) for s in shapes]
    base = DiceCELoss()
    loss = DeepSupervisionLoss(base)
    total = loss(outputs, targets)
    expected = 2 / 3 * base(outputs[0], targets[0]) + 1 / 3 * base(outputs[1], targets[1])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert outputs[0].grad is not None and outputs[1].grad is not None
    assert outputs[2].grad is None  # weight 0: never computed, not part of the graph
    # the lowest output is not even looked at: a target of the wrong shape there is fine
    broken = targets[:2] + [torch.zeros(2, 1, 1, 1, 1, dtype=torch.long)]
    assert loss(outputs, broken).item() == pytest.approx(total.item(), rel=1e-6)


def test_deep_supervision_passes_the_class_mask_and_checks_lists():
    g = _gen(17)
    outputs = [torch.randn(2, 4, 4, 4, 4, generator=g), torch.randn(2, 4, 2, 2, 2, generator=g)]
    targets = [torch.randint(0, 4, (2, 1, 4, 4, 4), generator=g), torch.randint(0, 4, (2, 1, 2, 2, 2), generator=g)]
    mask = torch.tensor([[True, True, False, False], [True, False, False, True]])
    ds = DeepSupervisionLoss(DiceCELoss())
    assert ds(outputs, targets, mask).item() == pytest.approx(DiceCELoss()(outputs[0], targets[0], mask).item())
    assert ds(outputs, targets, mask).item() != pytest.approx(ds(outputs, targets).item())
    with pytest.raises(ValueError, match="2 outputs but 1 targets"):
        ds(outputs, targets[:1])
    with pytest.raises(ValueError, match="empty"):
        ds([], [])
    with pytest.raises(ValueError, match="lists"):
        ds(outputs[0], targets[0])


def test_deep_supervision_scales_follow_nnunet():
    assert deep_supervision_scales(((1, 1, 1), (1, 2, 2), (2, 2, 2))) == [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5)]
    scales = deep_supervision_scales(DETAIL_STRIDES)
    assert scales == [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 0.25, 0.25), (0.25, 0.125, 0.125),
                      (0.125, 0.0625, 0.0625)]
    with pytest.raises(ValueError, match="at least two"):
        deep_supervision_scales(((1, 1, 1),))
    with pytest.raises(ValueError, match="positive integers"):
        deep_supervision_scales(((1, 1, 1), (0, 2, 2)))


def test_downsample_target_shapes_and_values():
    g = _gen(18)
    target = torch.randint(0, 15, (2, 1, 16, 32, 32), generator=g).to(torch.uint8)
    target[:, :, :, :8] = IGNORE_INDEX
    scales = deep_supervision_scales(DETAIL_STRIDES)
    out = downsample_target(target, scales)
    assert out[0] is target
    assert [tuple(t.shape[2:]) for t in out] == [(16, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4), (2, 2, 2)]
    for t in out:
        assert t.dtype == torch.uint8 and t.shape[:2] == (2, 1)
        assert set(t.unique().tolist()) <= set(target.unique().tolist())
    assert (out[1] == IGNORE_INDEX).any()
    # nearest-exact picks voxel floor((i + 1/2) / scale): exact copies, never a blend of labels
    assert torch.equal(out[1], target[:, :, :, 1::2, 1::2])
    assert torch.equal(out[2], target[:, :, 1::2, 2::4, 2::4])
    # (B, z, y, x) layout is kept
    assert torch.equal(downsample_target(target[:, 0], [(1.0, 0.5, 0.5)])[0], out[1][:, 0])
    with pytest.raises(ValueError, match="integer"):
        downsample_target(target.float(), scales)
    with pytest.raises(ValueError, match="scale"):
        downsample_target(target, [(1.0, 2.0, 1.0)])


# --- partial labels -------------------------------------------------------------------------


def test_partial_label_target_ignores_unknown_background():
    target = torch.tensor([[0, 1, 3], [3, 0, IGNORE_INDEX]], dtype=torch.uint8)
    new, row = partial_label_target(target, [1, 3])
    assert new.tolist() == [[IGNORE_INDEX, 1, 3], [3, IGNORE_INDEX, IGNORE_INDEX]]
    assert new.dtype == torch.uint8 and target[0, 0] == 0  # input untouched
    assert row.dtype == torch.bool and row.shape == (15,)
    assert row.nonzero().flatten().tolist() == [1, 3]
    # 0 may be listed; background stays implied and still unknown in a partial case
    new0, row0 = partial_label_target(target, [0, 1, 3])
    assert torch.equal(new0, new) and torch.equal(row0, row)


def test_partial_label_target_keeps_fully_annotated_cases():
    target = torch.tensor([0, 5, 14, 0, 2])
    new, row = partial_label_target(target, range(1, 15))
    assert torch.equal(new, target) and new is not target
    assert row.all()
    small, small_row = partial_label_target(torch.tensor([0, 1, 2]), [1, 2], num_classes=3, foreground_classes=(1, 2))
    assert small.tolist() == [0, 1, 2] and small_row.tolist() == [True, True, True]
    unlabeled, none = partial_label_target(torch.tensor([0, 0]), [])
    assert unlabeled.tolist() == [IGNORE_INDEX, IGNORE_INDEX] and not none.any()


def test_partial_label_target_rejects_inconsistent_input():
    with pytest.raises(ValueError, match=r"labels \[5\]"):
        partial_label_target(torch.tensor([0, 1, 5]), [1])
    with pytest.raises(ValueError, match="not foreground"):
        partial_label_target(torch.tensor([0, 1]), [1, 20])
    with pytest.raises(ValueError, match="outside"):
        partial_label_target(torch.tensor([0, 1, 40]), [1])
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        partial_label_target(torch.tensor([0, 1], dtype=torch.int8), [1])


def test_partial_case_trains_only_annotated_classes():
    """A partial case's background predictions do not matter; its annotated organs do."""
    g = _gen(19)
    c = 15
    labels = torch.zeros(1, 1, 4, 6, 6, dtype=torch.uint8)
    labels[..., :2, :2] = 1
    labels[..., 4:, 4:] = 3
    target, row = partial_label_target(labels, [1, 3])
    logits = torch.randn(1, c, 4, 6, 6, generator=g)
    loss = DiceCELoss()
    other = logits.clone()
    other[(labels == 0).expand_as(other)] = 30.0  # anything at the unknown background
    assert loss(logits, target, row[None]).item() == pytest.approx(loss(other, target, row[None]).item(), rel=1e-6)
    # perfect predictions on the annotated organs give the minimum whatever the rest says
    perfect = other.clone()
    perfect[:, :, :, :2, :2] = _hard_logits(torch.ones(1, 1, 4, 2, 2), c)
    perfect[:, :, :, 4:, 4:] = _hard_logits(torch.full((1, 1, 4, 2, 2), 3), c)
    assert loss(perfect, target, row[None]).item() == pytest.approx(-1.0, abs=1e-5)


# --- optimisation sanity ----------------------------------------------------------------------


def test_loss_decreases_when_training_a_tiny_conv_net():
    """20 plain gradient steps on a fixed target (by hand: torch.optim's first step costs seconds of imports)."""
    torch.manual_seed(0)
    g = _gen(20)
    image = torch.randn(2, 1, 8, 12, 12, generator=g)
    target = torch.bucketize(image, torch.tensor([-0.7, 0.0, 0.7]))  # 4 learnable intensity classes
    target[:, :, :2] = IGNORE_INDEX
    body = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.LeakyReLU(0.01))
    head, low_head = nn.Conv3d(8, 4, 1), nn.Conv3d(8, 4, 1)
    params = [*body.parameters(), *head.parameters(), *low_head.parameters()]
    loss_fn = DeepSupervisionLoss(DiceCELoss())
    targets = downsample_target(target, [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)])
    history = []
    for _ in range(20):
        features = body(image)
        outputs = [head(features), low_head(F.avg_pool3d(features, 2)), low_head(F.avg_pool3d(features, 4))]
        loss = loss_fn(outputs, targets)
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.5 * p.grad
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert all(later < earlier for earlier, later in zip(history, history[1:]))  # small steps: monotone
    assert history[-1] < history[0] - 0.2
