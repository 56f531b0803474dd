"""Inference for one image and all requested tasks.

Paper, section 3.3 and eq. 6; the official flow is bytedance/FreeSeg
mask2former/open_vocabulary_model.py (`forward` in eval mode, `semantic_inference`, ...):

    backbone + pixel decoder, once per image                      (task independent)
    for each task:
        text features of the task's class prompts                 (cached per class list and task)
        [optional: test-time prompt tuning of the class prompt]   (ttpt.py)
        interaction + transformer decoder -> last layer's logits and masks
        masks: bilinear (align_corners=True as the official code, or False as training
               upsamples: `mask_align_corners`) to the padded input size,
               cropped to the image, sigmoid -> (Q, H, W)
        p_mask = softmax over K + 1, no-object column dropped      (Q, K)
        p_clip = CLIP on the mask crops of the input image         (Q, K)   region_classifier.py
               (all tasks' crops in one pass; a binary mask that occurs twice is encoded once)
        p      = geometric ensemble (seen / unseen exponents)      (Q, K)
        semantic / instance / panoptic post-processing             (postprocess.py, or
                                                                    postprocess_official.py)

Two sets of rules after the network (`InferenceConfig.protocol`, docs/differences.md):
  - "mask2former" (default for models trained here): CLIP's own temperature, a uniform CLIP row
    for empty masks, the ensemble renormalised to the mask classifier's object mass, masks
    upsampled to the output size first, then Mask2Former's post-processing (postprocess.py);
  - "official": the official code literally: temperature 100, a CLIP row of ones, the raw
    ensemble, its post-processing at the test size, quirks included, then its resize to the
    output size (postprocess_official.py). A converted official checkpoint carries it.
Both share everything up to the class probabilities and mask logits.

Deliberate differences from the official code (both protocols):
  - one loop over tasks instead of three copied blocks; the image is encoded once, not three
    times, and text features are computed once per (class list, task) and may be cached across
    images (`text_cache`), where the official code re-runs CLIP's text tower for every call;
  - all tasks' crops go through CLIP together, a binary mask that occurs twice is encoded once,
    and a proposal whose CLIP row cannot change the result is not encoded (`clip_needed`): the
    same outputs, less work (docs/speed.md);
  - under "mask2former", panoptic post-processing follows Mask2Former's rule, which needs a "no
    object" probability per query: we append the mask classifier's own no-object probability to
    the ensembled class probabilities. The official FreeSeg code drops that column and instead
    re-sharpens the ensembled scores with softmax(p / 0.01) (postprocess_official.py).
Extension points (`Hooks`; FreeSeg has none, and the defaults are its inference): what the region
classifier crops and how it encodes the crops, extra proposals for CLIP alone to name, the text
CLIP names the regions against, and which proposals CLIP sees and which masks share a crop.
freeseg/extensions.py fills the first four for the toy world, freeseg/fast_inference.py the last
two for fast mode.
Axis legend: Q queries, K classes, E embedding dim, H W spatial, R CLIP's input size.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from freeseg.config import InferenceConfig
from freeseg.modeling.freeseg import FreeSeg
from freeseg.modeling.postprocess import instance_inference, panoptic_inference, semantic_inference
from freeseg.modeling.postprocess_official import official_ensemble, official_results
from freeseg.modeling.region_classifier import OFFICIAL_TEMPERATURE, RegionClassifier, encode_crops, geometric_ensemble
from freeseg.modeling.targets import TASKS
from freeseg.modeling.ttpt import tuned_prompt

PROTOCOLS = ("mask2former", "official")


@dataclass(frozen=True)
class Hooks:
    """The extension points of `predict`; each default is FreeSeg's inference.

    prepare_masks(binary (n, H, W) bool) -> (n, H, W) bool: the masks the region classifier crops;
    encode_crops(clip_model, crops (n, 3, R, R)) -> (n, E): CLIP's L2-normalised crop features;
    extra_proposals(masks (Q, H, W), objectness (Q,)) -> (n, H, W): more masks, named by CLIP alone;
    region_text(text_of, task, text (K, E)) -> (K, E): what CLIP names the regions against, from
        the task prompt's features `text` and `text_of(other_task)`, the other prompts' features;
    select_proposals(task, probs (Q, K + 1), rows) -> (rows,) bool: which of the proposals that
        `clip_needed` leaves CLIP sees (None: all); the others are named by the mask classifier;
    share_iou: which masks share one crop (`region_classifier.shared_masks`): 1, identical ones.
    """

    prepare_masks: Callable | None = None
    encode_crops: Callable = encode_crops
    extra_proposals: Callable | None = None
    region_text: Callable | None = None
    select_proposals: Callable | None = None
    share_iou: float = 1.0


PAPER = Hooks()


def _task_text(model: FreeSeg, class_names: list[str], task: str, text_cache: dict | None) -> torch.Tensor:
    key = (tuple(class_names), task)
    if text_cache is not None and key in text_cache:
        return text_cache[key]
    text = model.text_features(class_names, task).detach()
    if text_cache is not None:
        text_cache[key] = text
    return text


def region_text(model: FreeSeg, class_names: list[str], task: str, hooks: Hooks = PAPER,
                text_cache: dict | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
    """The text features (K, E) that CLIP names the regions against: the task prompt's own
    (FreeSeg), or what `hooks.region_text` makes of it. `text`: the task prompt's features, if
    the caller has them already."""
    if text is None:
        text = _task_text(model, class_names, task, text_cache)
    if hooks.region_text is None:
        return text
    return hooks.region_text(lambda other: _task_text(model, class_names, other, text_cache), task, text)


def image_mask_logits(model: FreeSeg, mask_logits: torch.Tensor, size: tuple[int, int],
                      align_corners: bool) -> torch.Tensor:
    """mask logits (Q, h, w) at stride 4 (or 2) of the input that `model.extract` padded -> mask
    logits (Q, H, W) of the image of `size` (H, W): upsampled to the padded size, cropped to the
    image; `align_corners` is `InferenceConfig.mask_align_corners`."""
    padded = model.padded_size(size)
    up = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=align_corners)[0]
    return up[:, :size[0], :size[1]]


def mask_probabilities(model: FreeSeg, mask_logits: torch.Tensor, size: tuple[int, int],
                       align_corners: bool) -> torch.Tensor:
    """As `image_mask_logits`, then sigmoid: probabilities (Q, H, W)."""
    return image_mask_logits(model, mask_logits, size, align_corners).sigmoid()


def region_classifier(model: FreeSeg, cfg: InferenceConfig, share_iou: float | None = 1.0,
                      hooks: Hooks = PAPER) -> RegionClassifier:
    """The region classifier of `cfg`: the official protocol scales the cosines by 100 and gives
    an empty mask a row of ones; "mask2former" uses CLIP's own learned scale and a uniform row
    (region_classifier.py). `share_iou`: which masks share a crop (`shared_masks`); `hooks`: what
    is cropped and how crops are encoded."""
    official = cfg.protocol == "official"
    return RegionClassifier(model.clip_model, cfg.mask_threshold, cfg.mask_expand_ratio, cfg.clip_chunk,
                            temperature=OFFICIAL_TEMPERATURE if official else None,
                            empty_fill=1.0 if official else None, prepare_masks=hooks.prepare_masks,
                            encode=hooks.encode_crops, share_iou=share_iou).to(model.pixel_mean.device)


def clip_probabilities(model: FreeSeg, image: torch.Tensor, masks: torch.Tensor, text: torch.Tensor,
                       cfg: InferenceConfig, hooks: Hooks = PAPER) -> torch.Tensor:
    """CLIP's class probabilities (Q, K) of the crops of `masks` (Q, H, W) out of `image` (3, H, W)."""
    return region_classifier(model, cfg, hooks=hooks)(image, masks, text)


def proposals(masks: torch.Tensor, probs: torch.Tensor, hooks: Hooks = PAPER) -> torch.Tensor:
    """What CLIP classifies: the Q query masks (Q, H, W), then `hooks.extra_proposals` (FreeSeg:
    none) -> (Q + n, H, W). probs (Q, K + 1)."""
    if hooks.extra_proposals is None:
        return masks
    return torch.cat([masks, hooks.extra_proposals(masks, 1 - probs[:, -1])])


def ensemble_with_clip(probs: torch.Tensor, p_clip: torch.Tensor, unseen: torch.Tensor,
                       cfg: InferenceConfig) -> torch.Tensor:
    """probs (Q, K + 1) of the mask classifier, p_clip (Q + n, K) -> p_ens (Q + n, K): the
    geometric ensemble of the Q queries (paper eq. 6), not renormalised; an extra proposal
    has no query, so CLIP alone names it."""
    Q = len(probs)
    ensemble = official_ensemble if cfg.protocol == "official" else geometric_ensemble
    p_ens = ensemble(probs[:, :-1], p_clip[:Q], unseen, cfg.clip_weight_seen, cfg.clip_weight_unseen)
    return torch.cat([p_ens, p_clip[Q:]])


def classify_with_clip(model: FreeSeg, image: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor,
                       text: torch.Tensor, unseen: torch.Tensor, cfg: InferenceConfig, hooks: Hooks = PAPER) -> tuple:
    """The CLIP half of inference for one task: masks (Q, H, W) probabilities and the mask
    classifier's probs (Q, K + 1) -> (masks (Q + n, H, W), p_clip (Q + n, K), p_ens (Q + n, K))
    (`proposals`, `ensemble_with_clip`). `text` (K, E): what CLIP names the regions against
    (`region_text`). `predict` does the same for all tasks at once (`region_probabilities`)."""
    masks = proposals(masks, probs, hooks)
    p_clip = clip_probabilities(model, image, masks, text, cfg, hooks)  # crops of the input image, (Q + n, K)
    return masks, p_clip, ensemble_with_clip(probs, p_clip, unseen, cfg)


def clip_needed(task: str, probs: torch.Tensor, rows: int, cfg: InferenceConfig) -> torch.Tensor:
    """Which of a task's `rows` proposals (Q queries, then extra proposals) can have their result
    changed by CLIP: probs (Q, K + 1) -> (rows,) bool. All of them, except for panoptic under
    "mask2former": a query whose object probability 1 - p(no object) does not exceed
    `object_mask_threshold` fails the keep test whatever CLIP says (the ensemble is rescaled to
    that probability, so no class score exceeds it either, and `panoptic_keep_by="object"` tests
    it alone), so its crop is not encoded. Exact: tests/test_shared_crops.py."""
    wanted = torch.ones(rows, dtype=torch.bool, device=probs.device)
    if task == "panoptic" and cfg.protocol == "mask2former":
        wanted[:len(probs)] = 1 - probs[:, -1] > cfg.object_mask_threshold
    return wanted


def region_probabilities(model: FreeSeg, image: torch.Tensor, decoded: dict[str, dict],
                         cfg: InferenceConfig, hooks: Hooks = PAPER) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The CLIP half of inference for every task at once: decoded {task: `decode_task` output}
    -> {task: (masks (Q + n, H, W), p_clip (Q + n, K))}.

    The proposals of all tasks are stacked and go through CLIP together, in batches of
    `cfg.clip_chunk`; a binary mask that occurs more than once (the three tasks' decoders
    often agree) is cropped and encoded once, and each task names the features against its
    own text. CLIP sees only the proposals of `clip_needed` (and of `hooks.select_proposals`,
    fast mode); a query it does not see gets the mask classifier's class distribution as its
    CLIP row, so the ensemble names it as the mask classifier does. Without
    `hooks.select_proposals` the task results are those of `classify_with_clip` task by task.
    """
    regions = region_classifier(model, cfg, hooks.share_iou, hooks)
    masks = {task: proposals(d["masks"], d["probs"], hooks) for task, d in decoded.items()}
    wanted = {}
    for task, m in masks.items():
        wanted[task] = clip_needed(task, decoded[task]["probs"], len(m), cfg)
        if hooks.select_proposals is not None:
            wanted[task] &= hooks.select_proposals(task, decoded[task]["probs"], len(m))
    binary = torch.cat([(m > cfg.mask_threshold)[wanted[task]] for task, m in masks.items()])  # (sum of rows, H, W)
    features, valid = regions.encode_regions(image, binary)
    out, start = {}, 0
    for task, m in masks.items():
        rows = wanted[task]
        n = int(rows.sum())
        task_features = features.new_zeros(len(m), features.shape[1])
        task_valid = torch.zeros(len(m), dtype=torch.bool, device=m.device)
        task_features[rows], task_valid[rows] = features[start:start + n], valid[start:start + n]
        start += n
        p_clip = regions.classify(task_features, task_valid, decoded[task]["clip_text"])  # (Q + n, K)
        if not rows.all():
            probs = decoded[task]["probs"][:, :-1]
            mask_classifier = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)  # (Q, K)
            p_clip[:len(probs)] = torch.where(rows[:len(probs), None], p_clip[:len(probs)], mask_classifier)
        out[task] = (m, p_clip)
    return out


@torch.no_grad()
def predict(model: FreeSeg, image: torch.Tensor, class_names: list[str], unseen: torch.Tensor,
            is_thing: torch.Tensor, tasks: tuple[str, ...] | None = None, cfg: InferenceConfig | None = None,
            out_size: tuple[int, int] | None = None, text_cache: dict | None = None, hooks: Hooks = PAPER) -> dict:
    """One image (3, H, W) uint8 or float 0-255 -> results per task:
        "semantic": (K, H_out, W_out) class scores (argmax = label map),
        "instance": {"masks": (n, H_out, W_out) bool, "scores": (n,), "labels": (n,)},
        "panoptic": (panoptic_seg (H_out, W_out) int32, segments_info list).
    class_names (K), unseen (K,) bool, is_thing (K,) bool; tasks default to cfg.tasks;
    out_size (H_out, W_out): the output size (default: the input size); "mask2former" resizes
    the masks to it first, "official" resizes its results (see `official_results`: the panoptic
    ids it returns are the official uint8 ids, segments_info without scores);
    text_cache: a dict kept by the caller across images (drop it if the prompts change);
    hooks: the extension points (`Hooks`; default FreeSeg's inference).

    The image is encoded once; each task is decoded (`decode_task`); the proposals of all tasks
    go through CLIP together (`region_probabilities`); each task is post-processed
    (`finish_task`). freeseg/bench.py times these stages (`python -m freeseg.bench infer`).
    """
    cfg = cfg or InferenceConfig()
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"inference.protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    tasks = tuple(tasks or cfg.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"predict: unknown tasks {unknown}; known: {', '.join(TASKS)}")
    K = len(class_names)
    if unseen.shape != (K,) or is_thing.shape != (K,):
        raise ValueError(f"predict: unseen {tuple(unseen.shape)} and is_thing {tuple(is_thing.shape)} must be ({K},)")
    was_training = model.training
    model.eval()  # no dropout; the caller's mode is restored below
    try:
        image = image.to(model.pixel_mean.device).float()
        features = model.extract(image[None])
        decoded = {task: decode_task(model, image, features, task, class_names, unseen, cfg, text_cache, hooks)
                   for task in tasks}
        clip = region_probabilities(model, image, decoded, cfg, hooks) if cfg.use_clip else {}
        return {task: finish_task(task, decoded[task], *clip.get(task, (None, None)), unseen, is_thing, cfg,
                                  out_size)
                for task in tasks}
    finally:
        model.train(was_training)


def decode_task(model: FreeSeg, image: torch.Tensor, features: dict, task: str, class_names: list[str],
                unseen: torch.Tensor, cfg: InferenceConfig, text_cache: dict | None, hooks: Hooks = PAPER) -> dict:
    """One task's network pass on the shared image features -> {"logits": mask logits (Q, H, W)
    at the image size (the official rules threshold them; None under "mask2former", which needs
    only their sigmoid: `predict` holds every task's masks at once), "masks": their sigmoid,
    "probs": the mask classifier's softmax (Q, K + 1), "clip_text": what CLIP names this task's
    regions against (K, E), or None without CLIP}."""
    H, W = image.shape[-2:]
    text = _task_text(model, class_names, task, text_cache)
    clip_text = None  # what CLIP names the regions against, from the same prompt as `text`
    if cfg.ttpt.enabled and int(unseen.sum()) >= 2:
        with tuned_prompt(model, features, class_names, task, unseen, cfg.ttpt):  # this image's prompt
            text = model.text_features(class_names, task)
            if cfg.use_clip:
                clip_text = region_text(model, class_names, task, hooks, text=text)  # every task's prompt tuned
    out = model.decode(features, text)
    if cfg.use_clip and clip_text is None:
        clip_text = region_text(model, class_names, task, hooks, text_cache, text)
    logits = image_mask_logits(model, out["pred_masks"][0], (H, W), cfg.mask_align_corners)  # (Q, H, W)
    return {"logits": logits if cfg.protocol == "official" else None, "masks": logits.sigmoid(),
            "probs": out["pred_logits"][0].softmax(dim=-1), "clip_text": clip_text}


def finish_task(task: str, decoded: dict, masks: torch.Tensor | None, p_clip: torch.Tensor | None,
                unseen: torch.Tensor, is_thing: torch.Tensor, cfg: InferenceConfig,
                out_size: tuple[int, int] | None):
    """One task's ensemble and post-processing: `decode_task` output, the proposals masks
    (Q + n, H, W) and their p_clip (Q + n, K) (both None without CLIP) -> the task's result."""
    logits, probs = decoded["logits"], decoded["probs"]
    (Q, H, W), K = decoded["masks"].shape, probs.shape[1] - 1
    p_mask, p_void = probs[:, :K], probs[:, K:]
    official = cfg.protocol == "official"
    if p_clip is None:
        masks = decoded["masks"]
    else:
        p_ens = ensemble_with_clip(probs, p_clip, unseen, cfg)  # Q + n rows
        if official:
            p_mask = p_ens  # the raw ensemble, as the official post-processing takes it
            # Extra proposals (rows Q onwards) are binary masks: as logits, -inf or +inf.
            logits = torch.cat([logits, torch.where(masks[Q:] > 0.5, torch.inf, -torch.inf)])
        else:
            # A geometric mean of two distributions sums to less than 1 (the less, the more they
            # disagree). Rescale it to the mask classifier's object mass 1 - p(no object): the
            # ensemble decides WHICH class, the mask classifier WHETHER there is an object, so
            # thresholds on scores (panoptic, instance) keep their meaning. The official code
            # re-sharpens with softmax(p / 0.01) in panoptic/instance inference instead.
            # Extra proposals (rows Q onwards) are not "no object".
            p_mask = torch.cat([p_ens[:Q] / p_ens[:Q].sum(-1, keepdim=True).clamp_min(1e-12) * (1 - p_void),
                                p_ens[Q:]])
            p_void = torch.cat([p_void, p_void.new_zeros(len(masks) - Q, 1)])
    if official:  # post-processing at the test size, then the official resize to out_size
        return official_results(task, p_mask, logits, is_thing, out_size or (H, W), cfg.overlap_threshold)
    if out_size is not None and tuple(out_size) != (H, W):
        masks = F.interpolate(masks[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
    if task == "semantic":
        return semantic_inference(p_mask, masks)
    if task == "instance":
        return instance_inference(p_mask, masks, is_thing, cfg.instance_topk)
    return panoptic_inference(torch.cat([p_mask, p_void], dim=1), masks, is_thing,
                              cfg.object_mask_threshold, cfg.overlap_threshold, cfg.panoptic_keep_by)


def full_size_model(seed: int = 0, device: str = "cpu") -> tuple:
    """The COCO preset's model with random weights and a CLIP of OpenAI ViT-B/16's shape (what
    `build_model` infers from the released weights), for benchmarks. -> (cfg, model)."""
    from freeseg.clip import CLIP, default_tokenizer
    from freeseg.presets import get_preset
    from freeseg.modeling.freeseg import build_freeseg

    torch.manual_seed(seed)
    cfg = get_preset("coco")
    clip = CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12)
    return cfg, build_freeseg(cfg, clip, default_tokenizer()).to(device)

