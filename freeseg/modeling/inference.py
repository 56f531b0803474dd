"""Inference for one image and all requested tasks, and a CPU benchmark of it.

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
  - under "mask2former", panoptic post-processing follows Mask2Former's rule, which needs a "no
    object" probability per query: we append the mask classifier's own no-object probability to
    the ensembled class probabilities. The official FreeSeg code drops that column and instead
    re-sharpens the ensembled scores with softmax(p / 0.01) (postprocess_official.py).
Extension points (`Hooks`; FreeSeg has none, and the defaults are its inference): what the region
classifier crops and how it encodes the crops, extra proposals for CLIP alone to name, and the
text CLIP names the regions against. freeseg/extensions.py fills them for the toy world.
Axis legend: Q queries, K classes, E embedding dim, H W spatial, R CLIP's input size.
"""

import time
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
        the task prompt's features `text` and `text_of(other_task)`, the other prompts' features.
    """

    prepare_masks: Callable | None = None
    encode_crops: Callable = encode_crops
    extra_proposals: Callable | None = None
    region_text: Callable | None = None


PAPER = Hooks()


def record_time(timings: dict | None, key: str, start: float) -> float:
    """Add the seconds since `start` to timings[key] (when timing is asked for); -> now.
    On a GPU the queued kernels are waited for first, so each stage gets its own time."""
    if timings is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    now = time.perf_counter()
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + now - start
    return now


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


def clip_probabilities(model: FreeSeg, image: torch.Tensor, masks: torch.Tensor, text: torch.Tensor,
                       cfg: InferenceConfig, hooks: Hooks = PAPER) -> torch.Tensor:
    """CLIP's class probabilities (Q, K) of the crops of `masks` (Q, H, W) out of `image` (3, H, W).
    The official protocol scales the cosines by 100 and gives an empty mask a row of ones;
    "mask2former" uses CLIP's own learned scale and a uniform row (region_classifier.py)."""
    official = cfg.protocol == "official"
    regions = RegionClassifier(model.clip_model, cfg.mask_threshold, cfg.mask_expand_ratio, cfg.clip_chunk,
                               temperature=OFFICIAL_TEMPERATURE if official else None,
                               empty_fill=1.0 if official else None,
                               prepare_masks=hooks.prepare_masks, encode=hooks.encode_crops)
    return regions.to(image.device)(image, masks, text)


def classify_with_clip(model: FreeSeg, image: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor,
                       text: torch.Tensor, unseen: torch.Tensor, cfg: InferenceConfig, hooks: Hooks = PAPER) -> tuple:
    """The CLIP half of inference: masks (Q, H, W) probabilities and the mask classifier's
    probs (Q, K + 1) -> (masks (Q + n, H, W), p_clip (Q + n, K), p_ens (Q + n, K)), where the n
    extra rows are `hooks.extra_proposals` (FreeSeg: none, n = 0). `text` (K, E): what CLIP
    names the regions against (`region_text`).

    p_ens of the Q queries is the geometric ensemble of the mask classifier and CLIP (paper
    eq. 6), not renormalised; an extra proposal has no query, so CLIP alone names it.
    """
    Q = len(masks)
    if hooks.extra_proposals is not None:
        masks = torch.cat([masks, hooks.extra_proposals(masks, 1 - probs[:, -1])])
    p_clip = clip_probabilities(model, image, masks, text, cfg, hooks)  # crops of the input image, (Q + n, K)
    ensemble = official_ensemble if cfg.protocol == "official" else geometric_ensemble
    p_ens = ensemble(probs[:, :-1], p_clip[:Q], unseen, cfg.clip_weight_seen, cfg.clip_weight_unseen)
    return masks, p_clip, torch.cat([p_ens, p_clip[Q:]])


@torch.no_grad()
def predict(model: FreeSeg, image: torch.Tensor, class_names: list[str], unseen: torch.Tensor,
            is_thing: torch.Tensor, tasks: tuple[str, ...] | None = None, cfg: InferenceConfig | None = None,
            out_size: tuple[int, int] | None = None, text_cache: dict | None = None,
            timings: dict | None = None, hooks: Hooks = PAPER) -> dict:
    """One image (3, H, W) uint8 or float 0-255 -> results per task:
        "semantic": (K, H_out, W_out) class scores (argmax = label map),
        "instance": {"masks": (n, H_out, W_out) bool, "scores": (n,), "labels": (n,)},
        "panoptic": (panoptic_seg (H_out, W_out) int32, segments_info list).
    class_names (K), unseen (K,) bool, is_thing (K,) bool; tasks default to cfg.tasks;
    out_size (H_out, W_out): the output size (default: the input size); "mask2former" resizes
    the masks to it first, "official" resizes its results (see `official_results`: the panoptic
    ids it returns are the official uint8 ids, segments_info without scores);
    text_cache: a dict kept by the caller across images (drop it if the prompts change);
    hooks: the extension points (`Hooks`; default FreeSeg's inference);
    timings: a dict that receives seconds per stage: "extract" (backbone and pixel decoder, once), and per
    task {"text", "ttpt", "interaction_decoder", "region_clip", "postprocess"}.
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
        start = time.perf_counter()
        features = model.extract(image[None])
        record_time(timings, "extract", start)
        return {task: _predict_task(model, image, features, task, class_names, unseen, is_thing, cfg, out_size,
                                    text_cache, timings, hooks)
                for task in tasks}
    finally:
        model.train(was_training)


def _predict_task(model: FreeSeg, image: torch.Tensor, features: dict, task: str, class_names: list[str],
                  unseen: torch.Tensor, is_thing: torch.Tensor, cfg: InferenceConfig,
                  out_size: tuple[int, int] | None, text_cache: dict | None, timings: dict | None,
                  hooks: Hooks):
    """One task of `predict` on the shared image features."""
    K, (H, W) = len(class_names), image.shape[-2:]
    task_times = {} if timings is not None else None
    start = time.perf_counter()
    text = _task_text(model, class_names, task, text_cache)
    start = record_time(task_times, "text", start)
    clip_text = None  # what CLIP names the regions against, from the same prompt as `text`
    if cfg.ttpt.enabled and int(unseen.sum()) >= 2:
        with tuned_prompt(model, features, class_names, task, unseen, cfg.ttpt):  # this image's prompt
            text = model.text_features(class_names, task)
            if cfg.use_clip:
                clip_text = region_text(model, class_names, task, hooks, text=text)  # every task's prompt tuned
        start = record_time(task_times, "ttpt", start)
    out = model.decode(features, text)
    start = record_time(task_times, "interaction_decoder", start)
    logits = image_mask_logits(model, out["pred_masks"][0], (H, W), cfg.mask_align_corners)  # (Q, H, W)
    masks = logits.sigmoid()
    probs = out["pred_logits"][0].softmax(dim=-1)  # (Q, K + 1)
    p_mask, p_void = probs[:, :K], probs[:, K:]
    start = record_time(task_times, "postprocess", start)
    official = cfg.protocol == "official"
    if cfg.use_clip:
        if clip_text is None:
            clip_text = region_text(model, class_names, task, hooks, text_cache, text)
        Q = len(masks)
        masks, _, p_ens = classify_with_clip(model, image, masks, probs, clip_text, unseen, cfg, hooks)  # Q + n rows
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
        start = record_time(task_times, "region_clip", start)
    if official:  # post-processing at the test size, then the official resize to out_size
        result = official_results(task, p_mask, logits, is_thing, out_size or (H, W), cfg.overlap_threshold)
    else:
        if out_size is not None and tuple(out_size) != (H, W):
            masks = F.interpolate(masks[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
        if task == "semantic":
            result = semantic_inference(p_mask, masks)
        elif task == "instance":
            result = instance_inference(p_mask, masks, is_thing, cfg.instance_topk)
        else:
            result = panoptic_inference(torch.cat([p_mask, p_void], dim=1), masks, is_thing,
                                        cfg.object_mask_threshold, cfg.overlap_threshold, cfg.panoptic_keep_by)
    record_time(task_times, "postprocess", start)
    if timings is not None:
        timings[task] = task_times
    return result


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


def benchmark_inference(height: int = 480, width: int = 640, num_classes: int = 133, seed: int = 0,
                        device: str = "cpu", repeat: int = 1) -> dict:
    """Time `predict` (all three tasks, one call) on one random image with the full-size
    configuration: R101c DeepLab backbone, ViT-B/16-shaped CLIP, `num_classes` classes, random
    weights. On a GPU one untimed call warms up first. -> the `timings` dict of `predict` (the
    run with the median total) plus "total" and "build" seconds."""
    start = time.perf_counter()
    cfg, model = full_size_model(seed, device)
    model.eval()
    build = time.perf_counter() - start
    names = [f"class {i}" for i in range(num_classes)]
    unseen = torch.arange(num_classes) % 9 == 0
    is_thing = torch.arange(num_classes) < 80
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    on_gpu = device != "cpu"
    runs = []
    for run in range(on_gpu + repeat):  # on a GPU, run 0 is the warm-up
        timings: dict = {}
        start = time.perf_counter()
        predict(model, image, names, unseen, is_thing, cfg.inference.tasks, cfg.inference, timings=timings)
        if on_gpu:
            torch.cuda.synchronize()
        timings["total"] = time.perf_counter() - start
        if run >= on_gpu:
            runs.append(timings)
    report = sorted(runs, key=lambda t: t["total"])[len(runs) // 2]
    return {**report, "build": build}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Time `predict` (3 tasks) of the full-size model on one image.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeat", type=int, default=1, help="timed calls; the median is reported")
    args = parser.parse_args(argv)
    report = benchmark_inference(device=args.device, repeat=args.repeat)
    threads = f"torch threads {torch.get_num_threads()}" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"{threads}; model build {report['build']:.1f} s; predict, 3 tasks: {report['total']:.3f} s "
          f"(median of {args.repeat})")
    print(f"shared: backbone and pixel decoder {report['extract']:.3f} s")
    for task in ("semantic", "instance", "panoptic"):
        parts = ", ".join(f"{k} {v:.3f}" for k, v in report[task].items())
        print(f"{task:9s} {sum(report[task].values()):7.3f} s  ({parts})")


if __name__ == "__main__":
    main()
