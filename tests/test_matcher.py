"""Hungarian matcher: pairwise costs against explicit formulas, optimality, batching, edge cases."""

import itertools
import math

import pytest
import torch

from freeseg.config import LossConfig
from freeseg.modeling.matcher import (
    HungarianMatcher,
    build_matcher,
    pairwise_dice_cost,
    point_generator,
    pairwise_focal_cost,
    upsample_masks,
)


def _focal_by_hand(x: list[float], t: list[float], alpha: float, gamma: float) -> float:
    total = 0.0
    for xi, ti in zip(x, t):
        p = 1 / (1 + math.exp(-xi))
        p_t = p if ti == 1 else 1 - p
        a_t = alpha if ti == 1 else 1 - alpha
        total += -a_t * (1 - p_t) ** gamma * math.log(p_t)
    return total / len(x)


def _dice_by_hand(x: list[float], t: list[float]) -> float:
    p = [1 / (1 + math.exp(-xi)) for xi in x]
    inter = sum(pi * ti for pi, ti in zip(p, t))
    return 1 - (2 * inter + 1) / (sum(p) + sum(t) + 1)


def test_pairwise_costs_equal_a_loop_over_pairs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=g, dtype=torch.float64) * 3  # (Q, S)
    targets = (torch.rand(2, 6, generator=g) > 0.5).double()  # (N, S)
    focal = pairwise_focal_cost(logits, targets, alpha=0.25, gamma=2.0)
    dice = pairwise_dice_cost(logits, targets)
    assert focal.shape == dice.shape == (3, 2)
    for q in range(3):
        for n in range(2):
            x, t = logits[q].tolist(), targets[n].tolist()
            assert focal[q, n].item() == pytest.approx(_focal_by_hand(x, t, 0.25, 2.0), rel=1e-12)
            assert dice[q, n].item() == pytest.approx(_dice_by_hand(x, t), rel=1e-12)


def _random_outputs(B, Q, K, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(B, Q, K + 1, generator=g),
        "pred_masks": torch.randn(B, Q, h, w, generator=g) * 2,
    }


def _random_target(N, K, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    return {"labels": torch.randint(0, K, (N,), generator=g), "masks": torch.rand(N, H, W, generator=g) > 0.6}


def test_cost_matrix_shape_with_upsampling():
    m = HungarianMatcher()
    out = _random_outputs(1, 5, 4, 4, 4)
    tgt = _random_target(3, 4, 8, 8, seed=1)
    cost = m.cost_matrix(out["pred_logits"][0], out["pred_masks"][0], tgt["labels"], tgt["masks"])
    assert cost.shape == (5, 3)
    # the cost is computed on predictions upsampled to the 8x8 target size
    up = upsample_masks(out["pred_masks"][0], (8, 8)).flatten(1)
    expected_dice = pairwise_dice_cost(up, tgt["masks"].flatten(1).float())
    only_dice = HungarianMatcher(cost_class=0, cost_focal=0, cost_dice=1)
    cost = only_dice.cost_matrix(out["pred_logits"][0], out["pred_masks"][0], tgt["labels"], tgt["masks"])
    assert torch.allclose(cost, expected_dice)


def test_hand_made_case_where_greedy_fails():
    # Class probabilities of the two targets' classes (0 and 1) for two queries; greedy (target 0
    # takes its best query 0, 0.50) leaves target 1 with 0.05: total 0.55. Optimal: query 0 ->
    # target 1 (0.45), query 1 -> target 0 (0.48): total 0.93.
    probs = torch.tensor([[0.50, 0.45, 0.05], [0.48, 0.05, 0.47]])
    outputs = {"pred_logits": probs.log()[None], "pred_masks": torch.zeros(1, 2, 2, 2)}
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 2, 2, dtype=torch.bool)}]
    (pred_idx, tgt_idx), = HungarianMatcher(cost_class=1, cost_focal=0, cost_dice=0)(outputs, targets)
    assert pred_idx.tolist() == [0, 1] and tgt_idx.tolist() == [1, 0]


def test_hand_made_case_masks_decide():
    # Target 0: left half, class 0; target 1: right half, class 1. Query 2 predicts the left
    # half, query 0 the right half, query 1 nothing; classes are uninformative (all equal).
    left = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.bool)
    masks = torch.stack([left, ~left])
    pred_masks = torch.stack([(~left).float(), torch.zeros(4, 4), left.float()]) * 20 - 10
    outputs = {"pred_logits": torch.zeros(1, 3, 3), "pred_masks": pred_masks[None]}
    (pred_idx, tgt_idx), = HungarianMatcher()(outputs, [{"labels": torch.tensor([0, 1]), "masks": masks}])
    assert pred_idx.tolist() == [0, 2] and tgt_idx.tolist() == [1, 0]


def test_assignment_is_optimal_by_brute_force():
    m = HungarianMatcher()
    for seed in range(5):
        out = _random_outputs(1, 5, 3, 4, 4, seed=seed)
        tgt = _random_target(3, 3, 4, 4, seed=100 + seed)
        (pred_idx, tgt_idx), = m(out, [tgt])
        cost = m.cost_matrix(out["pred_logits"][0], out["pred_masks"][0], tgt["labels"], tgt["masks"])
        best = min(sum(cost[q, n] for n, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
        assert cost[pred_idx, tgt_idx].sum().item() == pytest.approx(best.item(), rel=1e-6)
        assert sorted(tgt_idx.tolist()) == [0, 1, 2]


def test_batched_equals_per_image_and_sorted():
    m = build_matcher(LossConfig())
    out = _random_outputs(3, 6, 4, 5, 5, seed=3)
    targets = [_random_target(n, 4, 10, 10, seed=s) for s, n in enumerate([2, 0, 4])]
    batched = m(out, targets)
    for b in range(3):
        single = m({k: v[b : b + 1] for k, v in out.items()}, [targets[b]])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])
        assert batched[b][0].dtype == torch.int64 and batched[b][1].dtype == torch.int64
        assert len(batched[b][0]) == min(6, len(targets[b]["labels"]))
        assert batched[b][0].tolist() == sorted(batched[b][0].tolist())


def test_empty_targets_give_empty_indices():
    out = _random_outputs(2, 4, 3, 4, 4)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}
    indices = HungarianMatcher()(out, [empty, empty])
    for pred_idx, tgt_idx in indices:
        assert pred_idx.shape == tgt_idx.shape == (0,) and pred_idx.dtype == torch.int64


def test_more_targets_than_queries_and_bad_labels():
    out = _random_outputs(1, 2, 3, 4, 4)
    pred_idx, tgt_idx = HungarianMatcher()(out, [_random_target(5, 3, 4, 4, seed=0)])[0]
    assert pred_idx.tolist() == [0, 1] and len(set(tgt_idx.tolist())) == 2
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        HungarianMatcher()(out, [{"labels": torch.tensor([3]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}])
    with pytest.raises(ValueError, match="all three costs"):
        HungarianMatcher(cost_class=0, cost_focal=0, cost_dice=0)


def test_points_on_pixel_centres_give_the_full_resolution_costs():
    """Sampled costs (Mask2Former's way) are pixel means: at every target pixel centre, read from
    the predictions' own grid, they equal the costs of the upsampled masks."""
    H, W = 12, 8
    out = {k: v.double() for k, v in _random_outputs(1, 5, 3, 3, 2, seed=1).items()}
    target = _random_target(4, 3, H, W, seed=2)
    ys, xs = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten()], dim=1).double()  # (H * W, 2), (x, y)
    centres = centres[torch.randperm(H * W, generator=torch.Generator().manual_seed(0))]
    args = out["pred_logits"][0], out["pred_masks"][0], target["labels"], target["masks"]
    full = HungarianMatcher().cost_matrix(*args)
    sampled = HungarianMatcher(num_points=7).cost_matrix(*args, points=centres)
    # (bilinear resampling computes its source positions in float32: agreement to ~1e-7)
    torch.testing.assert_close(sampled, full, rtol=1e-6, atol=1e-9)
    off_centre = HungarianMatcher().cost_matrix(*args, points=centres + 0.25 / H)
    assert not torch.allclose(off_centre, full, rtol=1e-3)


def test_sampled_matching_agrees_with_full_resolution_matching():
    """With a few hundred random points the assignment is nearly always the full-resolution one;
    with 0 points every pixel is used."""
    torch.manual_seed(0)
    agree = 0
    for seed in range(20):
        out = _random_outputs(1, 6, 4, 6, 6, seed=seed)
        out["pred_masks"] = out["pred_masks"] * 3
        target = _random_target(3, 4, 24, 24, seed=100 + seed)
        # targets that some query resembles: blocks of the upsampled predictions, thresholded
        target["masks"] = upsample_masks(out["pred_masks"][0, :3], (24, 24)) > 0
        full = HungarianMatcher()(out, [target])[0]
        sampled = HungarianMatcher(num_points=400)(out, [target])[0]
        agree += all(torch.equal(a, b) for a, b in zip(full, sampled))
    assert agree >= 18
    with pytest.raises(ValueError, match="num_points"):
        HungarianMatcher(num_points=-1)


def test_point_generator_is_a_function_of_the_seed_and_stream():
    draw = lambda target, stream=0: torch.rand(5, generator=point_generator(target, torch.device("cpu"), stream))
    assert torch.equal(draw({"seed": 7}), draw({"seed": 7}))
    assert not torch.equal(draw({"seed": 7}), draw({"seed": 8}))
    assert not torch.equal(draw({"seed": 7}, 0), draw({"seed": 7}, 1))  # each decoder layer its own points
    assert point_generator({}, torch.device("cpu")) is None  # no seed: PyTorch's global generator
