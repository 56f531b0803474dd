"""The official FreeSeg post-processing, quirks included (`inference.protocol = "official"`).

What bytedance/FreeSeg (commit 7707335) does after the network, in
mask2former/open_vocabulary_model.py (`OpenVocabulary.forward` in eval mode and its
`semantic_inference`, `instance_inference`, `panoptic_inference`), re-written from a reading of
that code. It is kept literally, including what looks unintended, so that a converted official
checkpoint gives the official outputs; every such point is marked "Quirk". docs/differences.md
says what our default protocol ("mask2former", postprocess.py) does instead, and why.

Every function takes plain tensors of one image at the test size:
    p_ens        (Q, K)    ensembled class probabilities (`official_ensemble`), no "no object" column
    mask_logits  (Q, H, W) mask logits (the instance rule thresholds logits, not probabilities)
    mask_probs   (Q, H, W) = sigmoid(mask_logits)
    is_thing     (K,) bool (officially: the class name is one of the dataset's thing classes)
and `official_results` resizes the result to the size asked for, as the official forward does.

Two rules shared by panoptic and instance:
  - sharpening: scores = softmax(p_ens / 0.01) over the K classes. The ensemble is a product of
    powers that sums to well below 1; dividing by 0.01 turns it into an almost one-hot
    distribution, so the 0.5 score thresholds below test "is the best class clearly ahead";
  - semantic-argmax restriction: a query's segment keeps only the pixels where its class is also
    the argmax of the semantic map (the per-class sum over queries of p_ens * mask_probs).
Axis legend: Q queries, K classes, H W spatial, n kept predictions.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from freeseg.modeling.postprocess import mask_scores, semantic_inference

SHARPEN_TEMPERATURE = 0.01  # softmax(p / 0.01): open_vocabulary_model.py, panoptic/instance_inference
THING_SCORE_THRESHOLD = 0.5  # sharpened score a thing needs (panoptic: >= 0.5 kept; instance: > 0.5)
DUPLICATE_COVER = 0.8  # instance: the largest mask goes when the others cover more than 80% of it


def official_ensemble(p_mask: torch.Tensor, p_clip: torch.Tensor, unseen: torch.Tensor,
                      w_seen: float, w_unseen: float) -> torch.Tensor:
    """Paper eq. 6 as the official code computes it: p_mask (Q, K), p_clip (Q, K), unseen (K,)
    bool -> (Q, K), p_mask^(1 - w) * p_clip^w with w = w_unseen on unseen classes, else w_seen.

    Quirk: the product is used as it is, never renormalised (`mask2former` rescales it). A query
    whose mask is empty has a CLIP row of ones (RegionClassifier `empty_fill`), so its row is
    p_mask^(1 - w). The official code raises p_mask and p_clip to Python-number exponents for
    every class and blends the seen and unseen products with the 0/1 `trainable_flag`; a blend
    with 0 and 1 is exact, so picking the product per class is the same to the last bit, which
    per-class tensor exponents (`geometric_ensemble`) are not (they differ by an ulp).
    """
    if p_mask.shape != p_clip.shape or p_mask.shape[-1] != unseen.shape[0]:
        raise ValueError(f"official_ensemble: shapes differ: p_mask {tuple(p_mask.shape)}, "
                         f"p_clip {tuple(p_clip.shape)}, unseen {tuple(unseen.shape)}")
    seen_product = p_mask.pow(1 - w_seen) * p_clip.pow(w_seen)
    unseen_product = p_mask.pow(1 - w_unseen) * p_clip.pow(w_unseen)
    return torch.where(unseen.bool().to(p_mask.device), unseen_product, seen_product)


def sharpened_scores(p_ens: torch.Tensor) -> torch.Tensor:
    """(Q, K) -> softmax(p_ens / 0.01) over K (a division, as the official code: x * 100 rounds
    differently)."""
    return F.softmax(p_ens / SHARPEN_TEMPERATURE, dim=-1)


def panoptic(p_ens: torch.Tensor, mask_probs: torch.Tensor, is_thing: torch.Tensor,
             overlap_threshold: float = 0.5) -> tuple[torch.Tensor, list[dict]]:
    """Official panoptic inference at the test size -> (panoptic_seg (H, W) int32, 0 = void,
    segments_info [{"id", "isthing", "category_id"}]).

    Every query is visited in order with its sharpened best class (the official `label != 156`
    keep never fires with fewer than 157 classes); its segment is (mask_probs >= 0.5) restricted
    to its class's semantic-argmax pixels. It is skipped if empty, if that keeps less than
    `overlap_threshold` of its own mask (mask_probs >= 0.5: inclusive, a logit of exactly 0
    counts), or if it is a thing scored below 0.5.
    Quirks: nothing makes segments exclusive: each accepted query overwrites its pixels, so a
    later query wins; a stuff class seen before writes its pixels with the earlier segment's id
    (and adds no entry); ids count up from 1 in visiting order.
    """
    sem_argmax = semantic_inference(p_ens, mask_probs).argmax(0)  # (H, W)
    scores, labels = sharpened_scores(p_ens).max(-1)  # (Q,)
    panoptic_seg = torch.zeros(mask_probs.shape[-2:], dtype=torch.int32, device=mask_probs.device)
    segments_info: list[dict] = []
    stuff_ids: dict[int, int] = {}  # stuff class -> the id of its first segment
    for k in range(len(labels)):
        label = int(labels[k])
        isthing = bool(is_thing[label])
        own = mask_probs[k] >= 0.5
        segment = own & (sem_argmax == label)
        own_area, area = int(own.sum()), int(segment.sum())
        if own_area == 0 or area == 0:
            continue
        if area / own_area < overlap_threshold:
            continue
        if isthing and scores[k] < THING_SCORE_THRESHOLD:
            continue
        if not isthing and label in stuff_ids:
            panoptic_seg[segment] = stuff_ids[label]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_ids[label] = segment_id
        panoptic_seg[segment] = segment_id
        segments_info.append({"id": segment_id, "isthing": isthing, "category_id": label})
    return panoptic_seg, segments_info


def instance(p_ens: torch.Tensor, mask_logits: torch.Tensor, is_thing: torch.Tensor,
             overlap_threshold: float = 0.5) -> dict:
    """Official instance inference at the test size -> {"masks": (n, H, W) bool, "scores": (n,),
    "labels": (n,) int64}, in query order.

    One prediction per query at most: its label is the argmax of the sharpened scores, kept if
    that class is a thing (the official code tests this when panoptic inference is on, as in
    every official all-task config), the score is > 0.5, and its mask (mask LOGIT >= 0.5)
    restricted to the label's semantic-argmax pixels is non-empty and more than
    `overlap_threshold` of the mask. Final mask: logit > 0; score: the sharpened score times
    the mean mask probability inside the final mask.
    Quirks:
      - the sharpened scores are sliced `[:, :-1]` after the "no object" column is already
        gone, so the LAST REAL CLASS is dropped: it can never be predicted;
      - three thresholds on one mask: its area and segment use logit >= 0.5 (probability 0.62),
        the output mask logit > 0, while CLIP's crops used probability > 0.5;
      - de-duplication: the kept queries are meant to be grouped by class, but the group key is
        a loop variable left over from the thing filter, so all of them form ONE group; the
        group's largest mask (logit >= 0.5 area, first on ties) is dropped when the union of the
        other kept masks covers more than 80% of its area, whatever their classes and places.
    """
    sem_argmax = semantic_inference(p_ens, mask_logits.sigmoid()).argmax(0)  # (H, W)
    scores, labels = sharpened_scores(p_ens)[:, :-1].max(-1)  # (Q,) over K - 1 classes
    things = is_thing.to(labels.device)[labels]
    scores, labels, mask_logits = scores[things], labels[things], mask_logits[things]
    area_masks = mask_logits >= 0.5  # (n, H, W)
    group = []  # the kept queries: one group for all (see Quirks)
    for k in range(len(labels)):
        own_area = int(area_masks[k].sum())
        area = int((area_masks[k] & (sem_argmax == labels[k])).sum())
        if area > 0 and own_area > 0 and scores[k] > THING_SCORE_THRESHOLD and area / own_area > overlap_threshold:
            group.append(k)
    keep = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    keep[group] = True
    if group:
        areas = [int(area_masks[k].sum()) for k in group]
        largest = int(np.argmax(areas))  # the first of equal areas
        others = [k for i, k in enumerate(group) if i != largest]
        covered = int(area_masks[others].any(0).sum()) if others else 0
        if covered / areas[largest] > DUPLICATE_COVER:
            keep[group[largest]] = False
    scores, labels, mask_logits = scores[keep], labels[keep], mask_logits[keep]
    masks = mask_logits > 0
    return {"masks": masks, "scores": scores * mask_scores(mask_logits.sigmoid(), masks), "labels": labels}


def pil_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) or (H, W, C <= 4) -> (h, w[, C]) resized with PIL's nearest neighbour, as
    detectron2's `ResizeTransform.apply_segmentation` resizes label maps (PIL's pixel-centre
    rule, not torch's 'nearest')."""
    squeeze = array.ndim == 3 and array.shape[2] == 1
    image = Image.fromarray(array[:, :, 0] if squeeze else array)
    out = np.asarray(image.resize((size[1], size[0]), Image.NEAREST))
    return out[:, :, None] if squeeze else out


def resize_panoptic(panoptic_seg: torch.Tensor, segments_info: list[dict],
                    size: tuple[int, int]) -> tuple[torch.Tensor, list[dict]]:
    """The official forward's resize of a panoptic result to the size asked for.
    Quirks: the id map is cast to uint8 first (ids above 255 wrap around), resized with PIL's
    nearest neighbour (also when the size is unchanged), and the segments whose id no longer
    appears are dropped. -> (panoptic_seg (h, w) int32 holding the uint8 values, segments_info)."""
    ids = pil_nearest(panoptic_seg.cpu().numpy().astype(np.uint8), size)
    present = set(np.unique(ids).tolist())
    seg = torch.from_numpy(ids.astype(np.int32)).to(panoptic_seg.device)
    return seg, [s for s in segments_info if s["id"] in present]


def resize_instance_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, H, W) bool -> (n, h, w) bool with PIL's nearest neighbour, as the official forward
    resizes instance masks: as uint8 images of 3 channels at a time (PIL holds at most 4), then
    the remaining 1 or 2. Nearest neighbour treats channels alike, so the grouping does not
    change the result. Quirk: the official code skips the resize when there is no instance
    (its empty (0, H, W) stays at the test size); here an empty result has the size asked for."""
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros((0, *size))
    stack = masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8)  # (H, W, n)
    starts = list(range(0, n - n % 3, 3)) if n > 3 else [0]
    groups = [stack[:, :, s:s + 3] for s in starts]
    if n > 3 and n % 3:
        groups.append(stack[:, :, n - n % 3:])
    resized = np.concatenate([pil_nearest(g, size) for g in groups], axis=2)  # (h, w, n)
    return torch.from_numpy(resized).permute(2, 0, 1).bool().to(masks.device)


def official_results(task: str, p_ens: torch.Tensor, mask_logits: torch.Tensor, is_thing: torch.Tensor,
                     out_size: tuple[int, int], overlap_threshold: float = 0.5):
    """One task's official post-processing at the test size (H, W) of `mask_logits`, then the
    official forward's resize to `out_size` (the original image size in evaluation). Returns
    what `inference.predict` returns for the task:
        "semantic": (K, h, w) class scores: the einsum at the test size, resized bilinearly;
        "instance": {"masks": (n, h, w) bool, "scores": (n,), "labels": (n,)};
        "panoptic": (panoptic_seg (h, w) int32, segments_info).
    """
    out_size = tuple(out_size)
    if task == "semantic":
        scores = semantic_inference(p_ens, mask_logits.sigmoid())  # (K, H, W)
        if scores.shape[-2:] == out_size:
            return scores
        return F.interpolate(scores[None], size=out_size, mode="bilinear", align_corners=False)[0]
    if task == "instance":
        result = instance(p_ens, mask_logits, is_thing, overlap_threshold)
        return {**result, "masks": resize_instance_masks(result["masks"], out_size)}
    if task == "panoptic":
        return resize_panoptic(*panoptic(p_ens, mask_logits.sigmoid(), is_thing, overlap_threshold), out_size)
    raise ValueError(f"official_results: unknown task {task!r}")
