"""Set criterion: hand-computed loss values, perfect predictions, aux keys, zero targets, gradients."""

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from freeseg.config import LossConfig
from freeseg.modeling.criterion import (
    SetCriterion,
    average_num_masks,
    build_criterion,
    dice_loss,
    sigmoid_focal_loss,
    uncertain_points,
)
from freeseg.modeling.matcher import HungarianMatcher, pairwise_dice_cost, pairwise_focal_cost


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _log_softmax(row, i):
    return row[i] - math.log(sum(math.exp(v) for v in row))


def test_loss_values_equal_a_hand_computation():
    # One image, two queries, K = 2 classes (+ no object), one target of class 1 on a 2x2 mask.
    # Query 0 is clearly the better match (mask and class); query 1 must predict "no object".
    x0 = [[2.0, -1.0], [0.5, -3.0]]  # query 0 mask logits
    t = [[1, 0], [0, 1]]
    c0, c1 = [0.1, 1.5, -0.5], [0.3, -0.2, 0.4]  # class logits (last = no object)
    outputs = {
        "pred_logits": torch.tensor([[c0, c1]], dtype=torch.float64),
        "pred_masks": torch.tensor([[x0, [[-4.0, -4.0], [-4.0, -4.0]]]], dtype=torch.float64),
    }
    targets = [{"labels": torch.tensor([1]), "masks": torch.tensor([t], dtype=torch.bool)}]
    crit = SetCriterion(HungarianMatcher(), no_object_weight=0.1, focal_alpha=0.25, focal_gamma=2.0)
    losses = crit(outputs, targets)

    alpha, gamma = 0.25, 2.0
    pixels = [(x0[i][j], t[i][j]) for i in range(2) for j in range(2)]
    focal = 0.0
    for x, y in pixels:
        p = _sigmoid(x)
        p_t = p if y else 1 - p
        focal += -(alpha if y else 1 - alpha) * (1 - p_t) ** gamma * math.log(p_t)
    focal /= 4  # pixel mean; then / num_masks = 1
    probs = [_sigmoid(x) for x, _ in pixels]
    inter = sum(p * y for p, (_, y) in zip(probs, pixels))
    dice = 1 - (2 * inter + 1) / (sum(probs) + 2 + 1)
    # query 0 -> class 1 (weight 1), query 1 -> no object (weight 0.1); weighted mean
    ce = -(1.0 * _log_softmax(c0, 1) + 0.1 * _log_softmax(c1, 2)) / (1.0 + 0.1)

    assert losses["loss_focal"].item() == pytest.approx(focal, rel=1e-10)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-10)
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-10)


def test_upsampling_and_num_masks_normalisation():
    # Predictions at 1x1 upsample bilinearly to a constant; two images with 1 and 2 targets:
    # every mask loss is summed and divided by 3.
    x = [0.7, -0.4, 1.2]
    t0 = torch.zeros(1, 4, 4, dtype=torch.bool)
    t0[0, :2] = True  # 8 of 16 pixels
    t1 = torch.zeros(2, 4, 4, dtype=torch.bool)
    t1[0, 0, 0] = True  # 1 pixel
    t1[1] = True  # 16 pixels
    outputs = {
        "pred_logits": torch.tensor([[[5.0, -5.0], [-5.0, 5.0]], [[5.0, -5.0], [5.0, -5.0]]], dtype=torch.float64),
        "pred_masks": torch.tensor([[x[0], -9.0], [x[1], x[2]]], dtype=torch.float64)[..., None, None],
    }
    targets = [{"labels": torch.tensor([0]), "masks": t0}, {"labels": torch.tensor([0, 0]), "masks": t1}]
    crit = SetCriterion(HungarianMatcher(cost_class=0, cost_focal=0, cost_dice=1))
    indices = crit.matcher(outputs, targets)
    assert [i.tolist() for i, _ in indices] == [[0], [0, 1]]
    pairs = [(x[0], 8)] + [(outputs["pred_masks"][1, q].item(), int(t1[n].sum())) for q, n in zip(*indices[1])]

    def focal(xv, area):
        p = _sigmoid(xv)
        return (area * -0.25 * (1 - p) ** 2 * math.log(p) + (16 - area) * -0.75 * p**2 * math.log(1 - p)) / 16

    def dice(xv, area):
        return 1 - (2 * _sigmoid(xv) * area + 1) / (16 * _sigmoid(xv) + area + 1)

    losses = crit(outputs, targets)
    assert losses["loss_focal"].item() == pytest.approx(sum(focal(*p) for p in pairs) / 3, rel=1e-10)
    assert losses["loss_dice"].item() == pytest.approx(sum(dice(*p) for p in pairs) / 3, rel=1e-10)


def test_perfect_predictions_give_near_zero_mask_losses():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 8, 8, generator=g) > 0.5
    labels = torch.tensor([2, 0, 1])
    logits = torch.full((1, 5, 4), -20.0)
    logits[0, :, 3] = 20.0  # unmatched queries: no object
    pred_masks = torch.full((1, 5, 8, 8), -20.0)
    for q, n in zip([1, 3, 4], [0, 1, 2]):
        logits[0, q] = -20.0
        logits[0, q, labels[n]] = 20.0
        pred_masks[0, q] = masks[n].float() * 40 - 20
    outputs = {"pred_logits": logits, "pred_masks": pred_masks}
    losses = build_criterion(LossConfig())(outputs, [{"labels": labels, "masks": masks}])
    assert losses["loss_focal"].item() < 1e-9
    assert losses["loss_dice"].item() < 1e-6
    assert losses["loss_ce"].item() < 1e-6


def test_criterion_losses_equal_matcher_costs_on_the_diagonal():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 30, generator=g, dtype=torch.float64)
    targets = (torch.rand(4, 30, generator=g) > 0.5).double()
    focal = sigmoid_focal_loss(logits, targets, 0.25, 2.0)
    assert torch.allclose(focal, pairwise_focal_cost(logits, targets, 0.25, 2.0).diagonal())
    assert torch.allclose(dice_loss(logits, targets), pairwise_dice_cost(logits, targets).diagonal())


def _outputs(B, Q, K, h, w, num_aux, seed=0):
    g = torch.Generator().manual_seed(seed)

    def one():
        return {
            "pred_logits": torch.randn(B, Q, K + 1, generator=g).requires_grad_(),
            "pred_masks": torch.randn(B, Q, h, w, generator=g).requires_grad_(),
        }

    out = one()
    out["aux_outputs"] = [one() for _ in range(num_aux)]
    return out


def _targets(B, K, H, W, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"labels": torch.randint(0, K, (n,), generator=g), "masks": torch.rand(n, H, W, generator=g) > 0.5}
        for _ in range(B)
    ]


def test_aux_keys_weights_and_gradients():
    crit = build_criterion(LossConfig())
    out = _outputs(2, 6, 5, 4, 4, num_aux=3)
    losses = crit(out, _targets(2, 5, 16, 16, n=3))
    base = ["loss_ce", "loss_focal", "loss_dice"]
    assert set(losses) == set(base) | {f"{k}_{i}" for k in base for i in range(3)}
    assert set(crit.weight_dict) == set(losses)
    assert [crit.weight_dict[f"{k}_2"] for k in base] == [1.0, 20.0, 5.0]
    total = sum(crit.weight_dict[k] * v for k, v in losses.items())
    total.backward()
    for o in [out] + out["aux_outputs"]:
        assert o["pred_logits"].grad.abs().sum() > 0 and o["pred_masks"].grad.abs().sum() > 0
    no_aux = SetCriterion(crit.matcher, deep_supervision=False)
    assert set(no_aux(out, _targets(2, 5, 16, 16, n=3))) == set(base)


def test_class_count_is_read_per_call():
    crit = build_criterion(LossConfig())
    for K in (3, 7):  # open vocabulary: the class list changes between calls
        losses = crit(_outputs(1, 4, K, 4, 4, num_aux=0), _targets(1, K, 8, 8, n=2))
        assert all(torch.isfinite(v) for v in losses.values())


def test_zero_targets_are_finite_and_differentiable():
    crit = build_criterion(LossConfig())
    out = _outputs(2, 4, 3, 4, 4, num_aux=2)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}] * 2
    losses = crit(out, empty)
    assert all(torch.isfinite(v) for v in losses.values()) and len(losses) == 9
    assert losses["loss_focal"].item() == 0 and losses["loss_dice"].item() == 0
    expected_ce = torch.nn.functional.cross_entropy(out["pred_logits"].detach().reshape(-1, 4), torch.full((8,), 3))
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert out["pred_masks"].grad is not None  # graph stays connected (DDP needs every output used)


def _dist_worker(rank, world, init_file, result_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    targets = _targets(1, 3, 4, 4, n=[1, 4][rank])
    num = average_num_masks(targets, torch.device("cpu"))
    torch.save(num, os.path.join(result_dir, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_num_masks_is_averaged_over_ranks():
    assert average_num_masks(_targets(2, 3, 4, 4, n=0), torch.device("cpu")) == 1.0  # clamped at 1
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        assert [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)] == [2.5, 2.5]  # (1 + 4) / 2


def test_uncertain_points_lie_on_the_outline_and_fresh_points_anywhere():
    """Mask2Former's importance sampling: 75% of the points where |logit| is smallest among 3x
    as many random candidates, the rest uniform."""
    torch.manual_seed(0)
    ys, xs = torch.meshgrid((torch.arange(32) + 0.5) / 32, (torch.arange(32) + 0.5) / 32, indexing="ij")
    radius = ((xs - 0.5) ** 2 + (ys - 0.5) ** 2).sqrt()
    logits = ((0.3 - radius) * 40)[None].repeat(2, 1, 1)  # a disc of radius 0.3, outline at logit 0
    points = uncertain_points(logits, 400, oversample_ratio=3.0, importance_ratio=0.75)
    assert points.shape == (2, 400, 2) and points.min() >= 0 and points.max() < 1
    dist = ((points - 0.5) ** 2).sum(-1).sqrt()  # (2, 400) distance from the centre
    near = (dist - 0.3).abs() < 0.05
    # the outline band (|r - 0.3| < 0.05) covers about 19% of the square; of 1,200 candidates
    # about 225 fall in it, and the 300 least sure are those plus the next nearest
    assert near[:, :300].float().mean() > 0.6
    assert near[:, 300:].float().mean() < 0.35  # fresh points: uniform
    only_random = uncertain_points(logits, 400, oversample_ratio=3.0, importance_ratio=0.0)
    assert ((((only_random - 0.5) ** 2).sum(-1).sqrt() - 0.3).abs() < 0.05).float().mean() < 0.35


def test_point_losses_without_importance_estimate_the_full_mask_losses():
    """With uniform points (importance 0) the point losses estimate the pixel means: with many
    points they are close to the full-resolution losses (targets read between pixel centres are
    soft only along their outlines), and gradients flow."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mask_logits = (torch.randn(2, 3, 6, 6, generator=g) * 3).requires_grad_()
    outputs = {"pred_logits": torch.randn(2, 3, 3, generator=g), "pred_masks": mask_logits}
    boxes = torch.zeros(3, 24, 24, dtype=torch.bool)  # blobs: a target read between pixels is soft
    boxes[0, 2:12, 3:20] = boxes[1, 10:22, 8:16] = boxes[2, 5:20, 1:10] = True
    targets = [{"labels": torch.tensor([0, 1]), "masks": boxes[:2]}, {"labels": torch.tensor([1]), "masks": boxes[2:]}]
    full = SetCriterion(HungarianMatcher())(outputs, targets)
    sampled = SetCriterion(HungarianMatcher(), num_points=20000, importance_ratio=0.0)(outputs, targets)
    assert sampled["loss_focal"].item() == pytest.approx(full["loss_focal"].item(), rel=0.03)
    assert sampled["loss_dice"].item() == pytest.approx(full["loss_dice"].item(), rel=0.03)
    sampled["loss_dice"].backward()
    assert mask_logits.grad.abs().sum() > 0


def test_point_losses_depend_on_each_images_seed_not_on_the_global_generator():
    """An image's points come from its target's "seed", so a loss does not change with the global
    RNG state or with the other images of the batch (process counts and resumes agree)."""
    g = torch.Generator().manual_seed(3)
    outputs = {"pred_logits": torch.randn(2, 3, 3, generator=g), "pred_masks": torch.randn(2, 3, 6, 6, generator=g) * 3}
    boxes = torch.zeros(2, 24, 24, dtype=torch.bool)
    boxes[0, 2:12, 3:20] = boxes[1, 10:22, 8:16] = True
    targets = [{"labels": torch.tensor([0]), "masks": boxes[:1], "seed": 11},
               {"labels": torch.tensor([1]), "masks": boxes[1:], "seed": 12}]
    crit = SetCriterion(HungarianMatcher(num_points=50), num_points=40, deep_supervision=False)
    torch.manual_seed(0)
    whole = crit(outputs, targets)
    torch.manual_seed(1)
    assert crit(outputs, targets)["loss_focal"].item() == whole["loss_focal"].item()
    # each image alone (one per "process"): the per-image sums add up to the batch's
    halves = [crit({k: v[b:b + 1] for k, v in outputs.items()}, targets[b:b + 1]) for b in range(2)]
    assert sum(h["loss_focal"].item() for h in halves) / 2 == pytest.approx(whole["loss_focal"].item(), rel=1e-6)
    unseeded = [{k: v for k, v in t.items() if k != "seed"} for t in targets]
    torch.manual_seed(0)
    first = crit(outputs, unseeded)["loss_focal"].item()
    torch.manual_seed(1)
    assert crit(outputs, unseeded)["loss_focal"].item() != first  # without seeds: the global generator
