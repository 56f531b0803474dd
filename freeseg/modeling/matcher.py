"""Hungarian matching of predicted (class, mask) pairs to ground-truth segments.

Mask classification (MaskFormer, and FreeSeg paper section 3.2) predicts a fixed set of Q
(class, mask) pairs per image; to compute a loss each of the N ground-truth segments is paired
with exactly one prediction by minimising a total cost (Kuhn-Munkres via
`scipy.optimize.linear_sum_assignment`). The cost of pairing query q with segment n is

    C[q, n] = cost_class * (-p_q(c_n)) + cost_focal * focal(q, n) + cost_dice * dice(q, n)

with p_q the softmax over the K + 1 classes (K real classes + "no object"), and focal / dice the
same losses the criterion optimises (criterion.py), evaluated for every (q, n) pair. The
class term uses -p rather than the NLL, as DETR does: it is bounded, and the constant 1 of
"1 - p" does not change the assignment.

Weights: class 1, focal 20, dice 5 (bytedance/FreeSeg `mask2former/mask_former_model.py` builds
`HungarianMatcher(cost_class=1, cost_mask=MASK_WEIGHT, cost_dice=DICE_WEIGHT)`, and
`configs/coco-stuff-164k-171/mask2former_R50_bs32_60k.yaml` sets MASK_WEIGHT 20, DICE_WEIGHT 5).

Axis legend: B batch, Q queries, K classes, N ground-truth segments, H W spatial,
S flattened pixels.

Difference from the official lineage (MaskFormer's and zsseg.baseline's matcher, which FreeSeg's
signature follows): they *downsample the targets* to the prediction size (nearest) to save
memory; here the predictions are *upsampled* to the target size (bilinear), exactly as the loss
does, so the matcher minimises the very quantity the criterion measures. At 640x640, Q=100 the
pairwise terms need two (Q, S) float buffers (about 330 MB): fine on a GPU. It matters on the
toy world, where matching at the prediction size with nearest-sampled targets was faster but
worse on every metric (docs/toy_experiments.md, "Matching at the target's size").

`num_points` > 0 takes Mask2Former's cheaper way instead (facebookresearch/Mask2Former
`mask2former/modeling/matcher.py`, TRAIN_NUM_POINTS 112 * 112 in its configs): the costs of one
image are summed over `num_points` points drawn uniformly at random and shared by all its masks,
the predictions read there bilinearly from their own grid and the targets bilinearly from theirs.
That is an unbiased sample of the same pixel means (with the points on the target's pixel
centres it is the same mean), so the assignment is the full-resolution one up to sampling noise.
"""

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from freeseg.config import LossConfig


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Losses and costs of fp16/bf16 (mixed-precision) outputs are computed in float32; float64
    stays float64 (tests compare with exact hand computations)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def upsample_masks(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize mask logits (..., h, w) to `size` (H, W); a no-op at the same size.

    align_corners=False as in MaskFormer's criterion (pixel centres, not corners, are aligned).
    """
    if tuple(mask_logits.shape[-2:]) == tuple(size):
        return mask_logits
    lead = mask_logits.shape[:-2]
    flat = mask_logits.reshape(-1, 1, *mask_logits.shape[-2:])  # (M, 1, h, w)
    flat = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return flat.reshape(*lead, *size)


def point_generator(target: dict, device: torch.device, stream: int = 0) -> torch.Generator | None:
    """The random generator of an image's sampling points: seeded by the target's "seed" (its
    sample's augmentation seed, engine.SeededDataset) and `stream` (the criterion passes the
    index of the decoder output, so each layer gets its own points, as Mask2Former draws afresh
    at every call), so the points depend on the image alone, not on how many processes share
    the batch or on a resume; None (PyTorch's global generator) when the target has no seed."""
    seed = target.get("seed")
    if seed is None:
        return None
    # PyTorch's CPU generator keeps 32 bits of its seed: hash all of (seed, stream) into them.
    mixed = int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(mixed)


def sample_points(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear reads of maps (M, H, W) at points (x, y) in [0, 1] of the map's width and height:
    points (P, 2), shared by all maps, or (M, P, 2), one set per map -> (M, P).

    Pixel centres as in `upsample_masks` (align_corners=False), and beyond the outermost centres
    the edge value (padding "border"), as bilinear upsampling clamps; so a map read at a point
    equals the map upsampled to any size and read there.
    """
    grid = (points * 2 - 1).to(maps.dtype).expand(maps.shape[0], -1, -1)  # (M, P, 2) in grid_sample's [-1, 1]
    out = F.grid_sample(maps[:, None], grid[:, None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0, 0]  # (M, 1, 1, P) -> (M, P)


def pairwise_focal_cost(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet, arXiv 1708.02002) of every prediction against every target.

    logits: (Q, S) mask logits; targets: (N, S) binary {0, 1}. Returns (Q, N): the focal loss
    averaged over the S pixels, equal to `criterion.sigmoid_focal_loss` of that pair.
    Because a target pixel is either 1 or 0, the per-pixel loss splits into a "positive" and a
    "negative" term that depend on the prediction only; one matrix product then gives all pairs.
    """
    prob = logits.sigmoid()
    # -log(1-p) = softplus(x) and -log(p) = softplus(-x) = softplus(x) - x; where x is large the
    # cancellation in the difference is multiplied by (1 - p)^gamma, which is then ~0.
    log_one_minus = F.softplus(logits)
    pos = alpha * (1 - prob) ** gamma * (log_one_minus - logits)  # (Q, S) loss where target = 1
    neg = (1 - alpha) * prob**gamma * log_one_minus  # (Q, S) loss where target = 0
    # sum_s pos t + neg (1 - t) = sum_s (pos - neg) t + sum_s neg: one matrix product.
    cost = (pos - neg) @ targets.t() + neg.sum(-1, keepdim=True)
    return cost / logits.shape[1]


def pairwise_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of every prediction against every target.

    logits: (Q, S); targets: (N, S) binary. Returns (Q, N):
    1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1). The +1 (MaskFormer's smoothing) makes an empty
    prediction against an empty target cost 0 instead of 0/0.
    """
    prob = logits.sigmoid()
    numerator = 2 * torch.einsum("qs,ns->qn", prob, targets)
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]  # (Q, N)
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions to targets, image by image.

    outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w) logits}; K is read from
    the logits, so the class list may change from call to call (open vocabulary).
    targets: list of B dicts {"labels": int64 (N,), "masks": (N, H, W) bool or {0, 1}, and
    optionally "seed", from which the image's sampling points are drawn (`point_generator`)}.
    Returns a list of B pairs (pred_idx, tgt_idx), int64 tensors of length min(Q, N), sorted by
    pred_idx: prediction pred_idx[i] is matched to target tgt_idx[i].
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_focal: float = 20.0,
        cost_dice: float = 5.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_points: int = 0,
    ):
        super().__init__()
        if num_points < 0:
            raise ValueError(f"HungarianMatcher: num_points must be >= 0 (0 = every pixel), got {num_points}")
        if cost_class == 0 and cost_focal == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all three costs are 0; the matching would be arbitrary")
        self.cost_class = cost_class
        self.cost_focal = cost_focal
        self.cost_dice = cost_dice
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(
        self, logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
        points: torch.Tensor | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Matching cost of one image: logits (Q, K+1), mask_logits (Q, h, w), labels (N,),
        masks (N, H, W) -> (Q, N). The mask costs are taken at `points` (P, 2), (x, y) in [0, 1],
        if given, else at `num_points` random points (drawn by `generator`), else at every target
        pixel."""
        num_classes = logits.shape[-1] - 1
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"HungarianMatcher: target labels must lie in [0, {num_classes}) (K from pred_logits), "
                f"got {labels.min().item()}..{labels.max().item()}"
            )
        prob = at_least_float32(logits).softmax(-1)  # (Q, K+1)
        cost_class = -prob[:, labels]  # (Q, N)
        if points is None and self.num_points:
            points = torch.rand(self.num_points, 2, device=mask_logits.device, generator=generator)  # (x, y)
        if points is not None:
            pred = sample_points(at_least_float32(mask_logits), points)  # (Q, S), S = num_points
            tgt = sample_points(masks.to(pred.dtype), points)  # (N, S)
        else:
            pred = upsample_masks(at_least_float32(mask_logits), masks.shape[-2:]).flatten(1)  # (Q, S)
            tgt = masks.to(pred.dtype).flatten(1)  # (N, S)
        cost = (
            self.cost_class * cost_class
            + self.cost_focal * pairwise_focal_cost(pred, tgt, self.focal_alpha, self.focal_gamma)
            + self.cost_dice * pairwise_dice_cost(pred, tgt)
        )
        return cost

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        logits, mask_logits = outputs["pred_logits"], outputs["pred_masks"]  # (B, Q, K+1), (B, Q, h, w)
        if len(targets) != logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {logits.shape[0]}")
        indices = []
        for b, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            generator = point_generator(target, mask_logits.device) if self.num_points else None
            cost = self.cost_matrix(logits[b], mask_logits[b], labels, masks, generator=generator).cpu()
            if not torch.isfinite(cost).all():
                raise ValueError("HungarianMatcher: the cost matrix holds NaN/inf (check pred_logits / pred_masks)")
            pred_idx, tgt_idx = linear_sum_assignment(cost.numpy())  # pred_idx comes sorted
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)))
        return indices


def build_matcher(cfg: LossConfig) -> HungarianMatcher:
    return HungarianMatcher(
        cost_class=cfg.cost_class,
        cost_focal=cfg.cost_focal,
        cost_dice=cfg.cost_dice,
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
        num_points=cfg.matcher_points,
    )
