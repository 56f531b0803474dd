"""Range rules of every config field, and `validate`: each value checked before a command works.

Split from freeseg/config.py (the dataclasses and overrides); `freeseg.config.validate` and
`freeseg.config.RULES` name the same objects.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from freeseg.errors import ConfigError

if typing.TYPE_CHECKING:
    from freeseg.config import Config

# --------------------------------------------------------------------------- ranges
#
# Every value is checked here before a command starts its work, so that a typo fails at once
# with the key named, not as a division by zero after an hour of training, or as a NaN
# checkpoint saved with exit status 0. A float field without a rule must still be finite.


def _number(low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> tuple[typing.Callable, str]:
    def ok(v):
        return (math.isfinite(v) and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    return ok, "a finite number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")


def _choice(*options) -> tuple[typing.Callable, str]:
    return (lambda v: v in options), f"one of {', '.join(map(str, options))}"


def _each(rule: tuple[typing.Callable, str], nonempty: bool = True, unique: bool = False) -> tuple[typing.Callable, str]:
    check, text = rule

    def ok(v):
        return (len(v) > 0 or not nonempty) and all(check(x) for x in v) and (not unique or len(set(v)) == len(v))
    return ok, ("a non-empty list" if nonempty else "a list") + (" without repeats" if unique else "") + f" of {text}"


_TASKS = ("semantic", "instance", "panoptic")
POSITIVE, NON_NEGATIVE, FRACTION = _number(0, low_open=True), _number(0), _number(0, 1)
AT_LEAST_1, DROPOUT = _number(1), _number(0, 1, high_open=True)

RULES: dict[str, tuple[typing.Callable, str]] = {
    **{f"model.clip.{k}": AT_LEAST_1 for k in ("context_length", "embed_dim", "image_resolution", "vision_width",
                                              "text_width", "text_heads", "text_layers")},
    "model.clip.vision_layers": _each(AT_LEAST_1),
    "model.clip.bpe_merges": NON_NEGATIVE,
    "model.backbone.depth": _choice(18, 34, 50, 101),
    "model.backbone.stem": _choice("deeplab", "basic"),
    "model.backbone.width": AT_LEAST_1,
    "model.backbone.res5_dilation": _choice(1, 2),
    "model.backbone.res5_multi_grid": _each(AT_LEAST_1),
    "model.backbone.freeze_at": _number(0, 5),
    "model.backbone.norm": _choice("frozen_bn", "gn", "bn"),
    **{f"model.pixel_decoder.{k}": AT_LEAST_1 for k in ("conv_dim", "mask_dim", "num_heads", "num_points",
                                                        "ffn_dim", "num_groups")},
    "model.pixel_decoder.num_encoder_layers": NON_NEGATIVE,
    "model.pixel_decoder.dropout": DROPOUT,
    "extensions.fine_dim": NON_NEGATIVE,
    "extensions.semantic_targets": _choice("classes", "segments"),
    "extensions.clip_erode": NON_NEGATIVE,
    "extensions.unclaimed_min_area": FRACTION,
    "fast.min_object": FRACTION,
    "fast.semantic_queries": AT_LEAST_1,
    "fast.share_iou": FRACTION,
    **{f"model.decoder.{k}": AT_LEAST_1 for k in ("hidden_dim", "num_queries", "num_layers", "num_heads", "ffn_dim",
                                                  "mask_mlp_layers", "class_mlp_hidden")},
    "model.decoder.dropout": DROPOUT,
    "model.interaction.attn_dim": AT_LEAST_1,
    "model.interaction.num_heads": AT_LEAST_1,
    "model.interaction.dropout": DROPOUT,
    "model.prompt.class_ctx": NON_NEGATIVE,
    "model.prompt.task_ctx": NON_NEGATIVE,
    "model.prompt.init_std": NON_NEGATIVE,
    "model.prompt.tasks": _each(_choice(*_TASKS), unique=True),
    "model.pixel_mean": _each(_number(0, 255)),
    "model.pixel_std": _each(POSITIVE),
    "model.logit_scale": POSITIVE,
    "model.size_divisibility": AT_LEAST_1,
    **{f"loss.{k}": NON_NEGATIVE for k in ("no_object_weight", "class_weight", "focal_weight", "dice_weight",
                                          "focal_gamma", "cost_class", "cost_focal", "cost_dice", "matcher_points",
                                          "train_points")},
    "loss.focal_alpha": FRACTION,
    "loss.oversample_ratio": AT_LEAST_1,
    "loss.importance_ratio": FRACTION,
    "inference.tasks": _each(_choice(*_TASKS), unique=True),
    "inference.mask_threshold": FRACTION,
    "inference.mask_expand_ratio": POSITIVE,
    "inference.clip_chunk": AT_LEAST_1,
    "inference.clip_weight_seen": FRACTION,
    "inference.clip_weight_unseen": FRACTION,
    "inference.object_mask_threshold": FRACTION,
    "inference.overlap_threshold": FRACTION,
    "inference.panoptic_keep_by": _choice("class", "object"),
    "inference.instance_topk": AT_LEAST_1,
    "inference.ttpt.steps": NON_NEGATIVE,
    "inference.ttpt.lr": POSITIVE,
    "inference.ttpt.entropy_threshold": FRACTION,
    "data.dataset": _choice("coco", "voc", "ade", "toy"),
    "data.train_split": ((lambda v: v.strip() != ""), "a split name"),
    "data.val_split": ((lambda v: v.strip() != ""), "a split name"),
    "data.image_size": AT_LEAST_1,
    "data.min_scale": POSITIVE,
    "data.max_scale": POSITIVE,
    "data.augmentation": _choice("lsj", "semantic"),
    "data.test_short_side": AT_LEAST_1,
    "data.num_workers": NON_NEGATIVE,
    "data.prompt_samples_per_class": AT_LEAST_1,
    "train.stage": _choice("clip", "backbone", "prompt", "alltask"),
    "train.seed": NON_NEGATIVE,  # NumPy seeds must not be negative
    "train.batch_size": AT_LEAST_1,
    "train.iterations": AT_LEAST_1,
    "train.optimizer": _choice("adamw", "sgd"),
    "train.lr": POSITIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.momentum": _number(0, 1, high_open=True),
    "train.backbone_lr_mult": NON_NEGATIVE,
    "train.schedule": _choice("poly", "cosine"),
    "train.poly_power": NON_NEGATIVE,
    "train.warmup_iters": NON_NEGATIVE,
    "train.warmup_factor": POSITIVE,
    "train.clip_grad_norm": NON_NEGATIVE,
    "train.log_every": AT_LEAST_1,
    "train.eval_every": NON_NEGATIVE,  # 0: never
    "train.checkpoint_every": AT_LEAST_1,
}


def _flat(node: typing.Any, prefix: str = "") -> dict[str, typing.Any]:
    out = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        out.update(_flat(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name: value})
    return out


def _show(value: typing.Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def validate(cfg: Config, world_size: int = 1, prefixes: tuple[str, ...] = ("",)) -> Config:
    """Check every value of `cfg` (under `prefixes`, e.g. ("inference.",)) against `RULES`
    and the settings that must agree with each other; the first problem raises a ConfigError
    `key=value: must be ...`. `world_size`: the processes the global batch is split over."""
    values = {k: v for k, v in _flat(cfg).items() if k.startswith(prefixes)}
    for key, value in values.items():
        check, text = RULES.get(key, (None, ""))
        if check is None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}={value}: must be a finite number")
            continue
        try:
            ok = check(value)
        except TypeError:
            ok = False
        if not ok:
            if isinstance(value, int) and not isinstance(value, bool):
                text = text.replace("a finite number", "an integer")
            raise ConfigError(f"{key}={_show(value)}: must be {text}")
    pairs = [  # (key, condition, what it must be)
        ("data.max_scale", cfg.data.max_scale >= cfg.data.min_scale, f">= data.min_scale ({cfg.data.min_scale:g})"),
        ("train.batch_size", cfg.train.batch_size % world_size == 0 and cfg.train.batch_size >= world_size,
         f"a multiple of the {world_size} processes (the global batch is split evenly over them)"),
        ("model.decoder.hidden_dim", cfg.model.decoder.hidden_dim % cfg.model.decoder.num_heads == 0,
         f"divisible by model.decoder.num_heads ({cfg.model.decoder.num_heads})"),
        ("model.pixel_decoder.conv_dim", cfg.model.pixel_decoder.conv_dim % cfg.model.pixel_decoder.num_heads == 0
         and cfg.model.pixel_decoder.conv_dim % cfg.model.pixel_decoder.num_groups == 0,
         f"divisible by model.pixel_decoder.num_heads ({cfg.model.pixel_decoder.num_heads}) and num_groups "
         f"({cfg.model.pixel_decoder.num_groups})"),
        ("model.interaction.attn_dim", cfg.model.interaction.attn_dim % cfg.model.interaction.num_heads == 0,
         f"divisible by model.interaction.num_heads ({cfg.model.interaction.num_heads})"),
        ("model.clip.text_width", cfg.model.clip.text_width % cfg.model.clip.text_heads == 0,
         f"divisible by model.clip.text_heads ({cfg.model.clip.text_heads})"),
        ("extensions.clip_erode", cfg.extensions.clip_erode == 0 or cfg.extensions.clip_largest_part,
         "0 unless extensions.clip_largest_part is on (the erosion is part of finding the largest part)"),
    ]
    for key, ok, text in pairs:
        if key in values and not ok:
            raise ConfigError(f"{key}={_show(values[key])}: must be {text}")
    return cfg
