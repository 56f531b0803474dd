"""Set criterion: the training losses of mask classification (FreeSeg paper section 3.2).

After the matcher pairs queries with ground-truth segments (matcher.py), three losses are taken:

    loss_ce     cross-entropy over K + 1 classes for *every* query; unmatched queries must
                predict "no object" (index K), whose weight is lowered to `no_object_weight`
                (0.1) so that the ~90 empty queries do not drown the ~10 matched ones;
    loss_focal  sigmoid focal loss (alpha 0.25, gamma 2) of each matched mask, pixel mean;
    loss_dice   dice loss of each matched mask.

Mask losses are summed over matched pairs and divided by `num_masks`, the number of target
masks in the batch averaged over ranks (all-reduced sum / world size, at least 1), so every
rank's loss has the same scale whatever its share of masks. With deep supervision the same
losses are taken for every entry of outputs["aux_outputs"] (each matched on its own), with keys
suffixed "_{i}".

Facts from the official code (bytedance/FreeSeg):
- `configs/coco-stuff-164k-171/mask2former_R50_bs32_60k.yaml`: NO_OBJECT_WEIGHT 0.1,
  CLASS_WEIGHT 1.0, MASK_WEIGHT 20.0 (the focal loss), DICE_WEIGHT 5.0, DEEP_SUPERVISION True.
- `mask2former/mask_former_model.py` builds `SetCriterion(num_classes, matcher, weight_dict,
  eos_coef, losses)`: MaskFormer's signature, without Mask2Former's point-sampling arguments
  (facebookresearch/Mask2Former's SetCriterion requires num_points, oversample_ratio,
  importance_sample_ratio). MaskFormer's criterion (facebookresearch/MaskFormer
  `mask_former/modeling/criterion.py`) upsamples the predictions bilinearly
  (align_corners=False) to the target size and takes focal (alpha 0.25, gamma 2) and dice
  losses on the full masks; that is what is done here.
Differences: the number of classes is read from pred_logits on every call (the class list of an
open-vocabulary model changes between datasets and tasks) instead of being fixed at
construction; the official focal key "loss_mask" is called "loss_focal"; the official code hard-
codes the loss_ce weight to 1 whereas `class_weight` is honoured here. `num_points` > 0 takes
Mask2Former's point-sampled mask losses instead (`uncertain_points`; off in every paper preset),
with each image's points drawn from its own seed (matcher.point_generator).
"""

import torch
import torch.nn.functional as F
from torch import nn

from freeseg.config import LossConfig
from freeseg.modeling.matcher import (
    HungarianMatcher,
    at_least_float32,
    build_matcher,
    point_generator,
    sample_points,
    upsample_masks,
)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Focal loss of matched pairs: logits (M, S), targets (M, S) in {0, 1} -> (M,) pixel mean.

    FL = -alpha_t (1 - p_t)^gamma log(p_t): the (1 - p_t)^gamma factor shrinks the loss of the many
    easy background pixels; alpha = 0.25 weights foreground pixels (RetinaNet's setting).
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log(p_t)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * ce).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of matched pairs: logits (M, S), targets (M, S) -> (M,).

    1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1); the +1 smoothing is MaskFormer's (an empty
    prediction of an empty target costs 0, and the ratio never divides by 0).
    """
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def uncertain_points(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float,
                     importance_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask2Former's training points for each mask: mask_logits (M, h, w) -> (M, P, 2), (x, y) in
    [0, 1).

    `oversample_ratio * P` random points are drawn and the `importance_ratio * P` of them where the
    prediction is least sure (logit nearest 0) are kept; the rest of the P are fresh random points.
    So the loss looks mostly at the current outline, and a little everywhere else.
    """
    M = mask_logits.shape[0]
    candidates = torch.rand(M, int(num_points * oversample_ratio), 2, device=mask_logits.device, generator=generator)
    uncertainty = -sample_points(mask_logits, candidates).abs()  # (M, P * ratio)
    num_uncertain = int(importance_ratio * num_points)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices  # (M, num_uncertain)
    uncertain = candidates.gather(1, chosen[..., None].expand(-1, -1, 2))
    fresh = torch.rand(M, num_points - num_uncertain, 2, device=mask_logits.device, generator=generator)
    return torch.cat([uncertain, fresh], dim=1)


def rank_average(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over ranks and divided by the world size (itself in a single process).

    A loss normalised by this average and then averaged over ranks by DDP equals the loss of
    one process holding the whole batch.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return value


def average_num_masks(targets: list[dict], device: torch.device) -> float:
    """Number of target masks per rank: the batch total, averaged over ranks, at least 1."""
    num = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    return max(rank_average(num).item(), 1.0)


class SetCriterion(nn.Module):
    """Matching-based losses for one model output.

    outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w) logits,
              "aux_outputs": [{"pred_logits", "pred_masks"}, ...] (optional)}
    targets: list of B dicts {"labels": int64 (N,), "masks": (N, H, W)} at image size.
    forward returns the unweighted losses {"loss_ce", "loss_focal", "loss_dice"} (scalars) plus
    "loss_ce_{i}", ... for aux output i; `weight_dict[key]` is the weight of each key, and
    `sum(weight_dict[k] * v for k, v in losses.items())` is the training loss.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        no_object_weight: float = 0.1,
        class_weight: float = 1.0,
        focal_weight: float = 20.0,
        dice_weight: float = 5.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        deep_supervision: bool = True,
        num_points: int = 0,
        oversample_ratio: float = 3.0,
        importance_ratio: float = 0.75,
    ):
        super().__init__()
        self.num_points, self.oversample_ratio, self.importance_ratio = num_points, oversample_ratio, importance_ratio
        self.matcher = matcher
        self.no_object_weight = no_object_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.deep_supervision = deep_supervision
        self.base_weights = {"loss_ce": class_weight, "loss_focal": focal_weight, "loss_dice": dice_weight}
        # The number of aux outputs is the decoder's business; the "_{i}" keys are added the first
        # time forward sees aux output i, so the dict always covers every key forward returned.
        self.weight_dict: dict[str, float] = dict(self.base_weights)

    def loss_labels(self, logits: torch.Tensor, targets: list[dict], indices: list) -> torch.Tensor:
        """Weighted cross-entropy over K+1 classes; logits (B, Q, K+1)."""
        B, Q, K1 = logits.shape
        target_classes = torch.full((B, Q), K1 - 1, dtype=torch.long, device=logits.device)  # all "no object"
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            target_classes[b, pred_idx.to(logits.device)] = targets[b]["labels"][tgt_idx].to(logits.device)
        weight = torch.ones(K1, dtype=at_least_float32(logits).dtype, device=logits.device)
        weight[-1] = self.no_object_weight
        # sum_i w_i l_i / sum_i w_i over the GLOBAL batch: the weight total is averaged over ranks
        # like the mask count (F.cross_entropy's own mean would normalise each rank separately).
        total = F.cross_entropy(at_least_float32(logits).transpose(1, 2), target_classes, weight,
                                reduction="sum")  # classes on dim 1: (B, K+1, Q)
        return total / rank_average(weight[target_classes].sum().detach())

    def loss_masks(
        self, mask_logits: torch.Tensor, targets: list[dict], indices: list, num_masks: float, stream: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Focal and dice losses of the matched masks; mask_logits (B, Q, h, w).

        Each image's matched predictions are upsampled to its own target size, so targets of
        different sizes are handled (they must be aligned with the input: see batch_targets).
        With `num_points` > 0 both are read at the points of `uncertain_points` instead, drawn
        from the image's seed and `stream` (matcher.point_generator).
        """
        focal, dice = [], []
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            tgt = targets[b]["masks"]
            pred = at_least_float32(mask_logits[b, pred_idx.to(mask_logits.device)])  # (M, h, w)
            tgt = tgt[tgt_idx.to(tgt.device)].to(pred)  # (M, H, W)
            if self.num_points:
                generator = point_generator(targets[b], pred.device, stream)
                points = uncertain_points(pred, self.num_points, self.oversample_ratio, self.importance_ratio, generator)
                pred, tgt = sample_points(pred, points), sample_points(tgt, points)  # (M, P)
            else:
                pred, tgt = upsample_masks(pred, tgt.shape[-2:]).flatten(1), tgt.flatten(1)  # (M, H * W)
            focal.append(sigmoid_focal_loss(pred, tgt, self.focal_alpha, self.focal_gamma))
            dice.append(dice_loss(pred, tgt))
        # With no target at all the sums are 0 but stay connected to pred_masks (for DDP).
        return torch.cat(focal).sum() / num_masks, torch.cat(dice).sum() / num_masks

    def single_output_losses(self, outputs: dict, targets: list[dict], num_masks: float, stream: int = 0) -> dict:
        """Match one set of predictions to the targets and compute its three losses."""
        indices = self.matcher(outputs, targets)
        loss_focal, loss_dice = self.loss_masks(outputs["pred_masks"], targets, indices, num_masks, stream)
        return {
            "loss_ce": self.loss_labels(outputs["pred_logits"], targets, indices),
            "loss_focal": loss_focal,
            "loss_dice": loss_dice,
        }

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        num_masks = average_num_masks(targets, outputs["pred_logits"].device)
        losses = self.single_output_losses(outputs, targets, num_masks)
        if not self.deep_supervision:
            return losses
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            for key, value in self.single_output_losses(aux, targets, num_masks, stream=i + 1).items():
                losses[f"{key}_{i}"] = value
                self.weight_dict.setdefault(f"{key}_{i}", self.base_weights[key])
        return losses


def build_criterion(cfg: LossConfig) -> SetCriterion:
    return SetCriterion(
        matcher=build_matcher(cfg),
        no_object_weight=cfg.no_object_weight,
        class_weight=cfg.class_weight,
        focal_weight=cfg.focal_weight,
        dice_weight=cfg.dice_weight,
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
        deep_supervision=cfg.deep_supervision,
        num_points=cfg.train_points,
        oversample_ratio=cfg.oversample_ratio,
        importance_ratio=cfg.importance_ratio,
    )
