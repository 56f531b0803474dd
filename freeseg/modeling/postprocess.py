"""Post-processing: one image's (class, mask) predictions -> semantic, instance, panoptic results.

FreeSeg (paper section 3.3) produces, for each query, class probabilities (mask classifier
combined with the CLIP region classifier, region_classifier.py) and a mask probability map; the
three tasks only differ in how these Q pairs are turned into an output. All three rules are
Mask2Former's (facebookresearch/Mask2Former `mask2former/maskformer_model.py`, the same code in
bytedance/FreeSeg `mask2former/mask_former_model.py`):

    semantic   per-class score map: sum over queries of p_q(k) * m_q(pixel)
    instance   the top-k (query, class) pairs by class probability, thing classes only; mask =
               m_q > 0.5; score = class probability * mean mask probability inside the mask
    panoptic   queries that are not "no object" and confident enough; each pixel goes to the
               query with the highest p_q * m_q; a query that keeps too little of its own mask
               is dropped; stuff of one class is merged into one segment. One deliberate
               change, for ensembled probabilities: by default "confident enough" tests the
               object probability 1 - p(no object), not the best class probability
               (`keep_by`, InferenceConfig.panoptic_keep_by)

Inputs are probabilities already at output resolution: class_probs (Q, K) or (Q, K+1) with the
"no object" column last, mask_probs (Q, H, W) = sigmoid of the mask logits.

Differences from the official FreeSeg code: FreeSeg's OpenVocabulary model copies one inference
block (head forward, CLIP ensemble, post-processing) three times and changes the panoptic and
instance rules (it sharpens class probabilities with softmax(p / 0.01), restricts each mask to
pixels where its class wins the semantic argmax, drops things scored below 0.5, and de-duplicates
same-class instances). Here each task is one function with Mask2Former's published rules
(the panoptic keep rule above aside);
the thresholds are config fields (InferenceConfig); segments also carry their score. These are
the rules of `inference.protocol = "mask2former"`; the official ones, quirks included, are in
postprocess_official.py ("official"), and docs/differences.md compares the two.
Axis legend: Q queries, K classes, H W spatial, n kept predictions.
"""

import torch


def _check(
    class_probs: torch.Tensor, mask_probs: torch.Tensor, is_thing: torch.Tensor | None, no_object: bool, where: str
) -> None:
    """Shapes must agree: class_probs (Q, K) or (Q, K+1), mask_probs (Q, H, W), is_thing (K,)."""
    if class_probs.dim() != 2 or mask_probs.dim() != 3 or class_probs.shape[0] != mask_probs.shape[0]:
        raise ValueError(
            f"{where}: expected class_probs (Q, K) and mask_probs (Q, H, W) with the same Q, got "
            f"{tuple(class_probs.shape)} and {tuple(mask_probs.shape)}"
        )
    num_classes = class_probs.shape[1] - int(no_object)
    if is_thing is not None and is_thing.shape != (num_classes,):
        columns = "K + 1 (last = no object)" if no_object else "K"
        raise ValueError(
            f"{where}: is_thing has shape {tuple(is_thing.shape)} but class_probs has "
            f"{class_probs.shape[1]} columns = {columns}, so K = {num_classes}"
        )


def semantic_inference(class_probs: torch.Tensor, mask_probs: torch.Tensor) -> torch.Tensor:
    """Per-class score maps: class_probs (Q, K), mask_probs (Q, H, W) -> (K, H, W).

    Each query votes for every class with its class probability, spread over its mask; the
    semantic label of a pixel is the argmax over K (taken by the caller / the evaluator).
    """
    _check(class_probs, mask_probs, None, False, "semantic_inference")
    return torch.einsum("qk,qhw->khw", class_probs, mask_probs)


def mask_scores(mask_probs: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """Mean foreground probability inside each binary mask: (n, H, W), (n, H, W) -> (n,).

    Mask2Former's mask quality score; the 1e-6 keeps an empty mask at score 0 rather than 0/0.
    """
    binary = binary.to(mask_probs.dtype).flatten(1)
    return (mask_probs.flatten(1) * binary).sum(1) / (binary.sum(1) + 1e-6)


def instance_inference(
    class_probs: torch.Tensor, mask_probs: torch.Tensor, is_thing: torch.Tensor, topk: int
) -> dict:
    """Instance predictions: class_probs (Q, K), mask_probs (Q, H, W), is_thing (K,) bool.

    Every (query, class) pair is a candidate, so one query may yield several instances of
    different classes (it helps AP when a query is unsure). The `topk` best pairs by class
    probability are taken first, then those of stuff classes are dropped (Mask2Former's order,
    so fewer than `topk` may remain). Returns {"masks": (n, H, W) bool, "scores": (n,),
    "labels": (n,) int64}, by decreasing class probability.
    """
    _check(class_probs, mask_probs, is_thing, False, "instance_inference")
    Q, K = class_probs.shape
    top_probs, top_idx = class_probs.flatten().topk(min(topk, Q * K))  # over Q*K pairs, sorted
    queries, labels = top_idx // K, top_idx % K  # (Q*K) is flattened query-major
    keep = is_thing.to(labels.device)[labels]
    top_probs, queries, labels = top_probs[keep], queries[keep], labels[keep]
    probs = mask_probs[queries]  # (n, H, W)
    masks = probs > 0.5  # the same as mask logit > 0
    return {"masks": masks, "scores": top_probs * mask_scores(probs, masks), "labels": labels}


def panoptic_inference(
    class_probs: torch.Tensor,
    mask_probs: torch.Tensor,
    is_thing: torch.Tensor,
    object_mask_threshold: float,
    overlap_threshold: float,
    keep_by: str = "class",
) -> tuple[torch.Tensor, list[dict]]:
    """Panoptic segmentation: class_probs (Q, K+1) with "no object" last, mask_probs (Q, H, W).

    1. keep confident queries. `keep_by="class"` (Mask2Former): the best of the K+1 classes is
       not "no object" and its probability exceeds `object_mask_threshold`. `keep_by="object"`:
       the query's object probability 1 - p(no object) exceeds the threshold, and its label is
       the best of the K classes. The second rule is for ensembled class probabilities, which
       spread a confident object over look-alike classes (see InferenceConfig.panoptic_keep_by);
    2. give each pixel to the kept query with the largest class score * mask probability;
    3. visit kept queries in order; a query whose won pixels cover less than
       `overlap_threshold` of its own mask (m_q >= 0.5) is mostly hidden by better queries and
       is dropped; otherwise its won pixels with m_q >= 0.5 form the segment;
    4. a stuff class gets one segment: later queries of the same stuff class join the first.
    Returns (panoptic_seg (H, W) int32 with 0 = void and ids 1, 2, ..., segments_info) where
    segments_info = [{"id", "category_id", "isthing", "score"}] (score: best query's class
    probability).
    """
    _check(class_probs, mask_probs, is_thing, True, "panoptic_inference")
    num_classes = class_probs.shape[1] - 1
    if keep_by == "class":
        scores, labels = class_probs.max(-1)  # (Q,)
        keep = (labels != num_classes) & (scores > object_mask_threshold)
    elif keep_by == "object":
        scores, labels = class_probs[:, :num_classes].max(-1)  # (Q,)
        keep = 1 - class_probs[:, num_classes] > object_mask_threshold
    else:
        raise ValueError(f"panoptic_inference: keep_by (inference.panoptic_keep_by) must be 'class' or 'object', "
                         f"got {keep_by!r}")
    scores, labels, masks = scores[keep], labels[keep], mask_probs[keep]  # masks (n, H, W)

    panoptic_seg = torch.zeros(mask_probs.shape[-2:], dtype=torch.int32, device=mask_probs.device)
    segments_info: list[dict] = []
    if masks.shape[0] == 0:
        return panoptic_seg, segments_info
    owner = (scores[:, None, None] * masks).argmax(0)  # (H, W) index of the winning kept query
    stuff_segment: dict[int, dict] = {}  # stuff class -> its segment
    for k in range(masks.shape[0]):
        label, score = int(labels[k]), float(scores[k])
        isthing = bool(is_thing[label])
        won = owner == k
        own = masks[k] >= 0.5
        segment = won & own
        won_area, own_area = int(won.sum()), int(own.sum())
        if won_area == 0 or own_area == 0 or not segment.any():
            continue
        if won_area / own_area < overlap_threshold:
            continue
        if not isthing and label in stuff_segment:
            merged = stuff_segment[label]
            panoptic_seg[segment] = merged["id"]
            merged["score"] = max(merged["score"], score)
            continue
        info = {"id": len(segments_info) + 1, "category_id": label, "isthing": isthing, "score": score}
        panoptic_seg[segment] = info["id"]
        segments_info.append(info)
        if not isthing:
            stuff_segment[label] = info
    return panoptic_seg, segments_info
