"""Fast mode: an approximation of our own, off by default (`--fast` on evaluate.py and demo.py,
config section `fast`, docs/speed.md). FreeSeg has no such mode: it encodes every proposal's crop.

Region CLIP is most of an image's inference time on a CPU (ViT-B/16 for up to 300 crops), so
fast mode shows CLIP only the proposals whose CLIP row is likely to change the result:
  - per task, the queries whose object probability 1 - p(no object) reaches `min_object`;
  - for semantic segmentation, only the `semantic_queries` most object-like of those (the label
    map is a sum over all queries, dominated by the confident ones);
  - one crop serves every mask, of any task, whose binary mask overlaps the group's first with
    IoU >= `share_iou`;
  - with `clip_bfloat16`, CLIP's image tower runs under bfloat16 autocast.
A query CLIP does not see is named by the mask classifier alone (inference.region_probabilities).
Exact mode already leaves out what provably cannot matter (`inference.clip_needed`); this module
adds only the approximations, through three extension points of `inference.Hooks`:
`select_proposals`, `share_iou` and `encode_crops`.
"""

import dataclasses
import functools

import torch
import torch.nn.functional as F

from freeseg.config import FastConfig
from freeseg.modeling.inference import Hooks


def select_proposals(task: str, probs: torch.Tensor, rows: int, fast: FastConfig) -> torch.Tensor:
    """Which of a task's `rows` proposals (Q queries, then extra proposals) CLIP sees: probs
    (Q, K + 1) of the mask classifier -> (rows,) bool. An extra proposal has no mask classifier
    to fall back on, so CLIP always sees it."""
    objectness = 1 - probs[:, -1]  # (Q,)
    wanted = objectness >= fast.min_object
    if task == "semantic":
        top = objectness.topk(min(fast.semantic_queries, len(objectness))).indices
        wanted &= torch.zeros_like(wanted).index_fill_(0, top, True)
    return torch.cat([wanted, wanted.new_ones(rows - len(wanted))])


def encode_in_bfloat16(encode, clip_model: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """`encode(clip_model, crops)` (an `encode_crops` hook) under bfloat16 autocast -> (n, E)
    float32 features, L2-normalised."""
    with torch.autocast(crops.device.type, dtype=torch.bfloat16):
        features = encode(clip_model, crops)
    return F.normalize(features.float(), dim=-1)


def fast_hooks(fast: FastConfig, hooks: Hooks) -> Hooks:
    """`hooks` with fast mode's proposal selection, crop sharing and (`clip_bfloat16`) CLIP
    precision, if `fast.enabled`; the crop encoder of `hooks` (the toy world's mirror crops) is
    kept, in bfloat16 if asked."""
    if not fast.enabled:
        return hooks
    encode = functools.partial(encode_in_bfloat16, hooks.encode_crops) if fast.clip_bfloat16 else hooks.encode_crops
    return dataclasses.replace(hooks, select_proposals=functools.partial(select_proposals, fast=fast),
                               share_iou=fast.share_iou, encode_crops=encode)
