"""Configuration: nested dataclasses, named presets and dotted overrides.

Every knob of the system lives here, with its default and where the default comes from.
Only the `build_*` functions of each component read a `Config`; modules themselves take
plain keyword arguments. The resolved config is stored inside every checkpoint
(`dataclasses.asdict(cfg)`), so a checkpoint always says how it was made.

Defaults are the official FreeSeg COCO R101c all-task settings (bytedance/FreeSeg,
`configs/coco-stuff-164k-156/*.yaml` and the Mask2Former base config it inherits);
`freeseg.presets` holds the other settings of the paper and the tiny `toy` world.

Overrides use dotted keys and are type-checked, and `validate` checks every value's range
before any work starts (`RULES`: a learning rate is finite and positive, an ensemble weight
lies in [0, 1], ...):

    cfg = get_preset("coco")  # freeseg.presets
    apply_overrides(cfg, ["model.decoder.num_queries=50", "train.lr=1e-4"])
    validate(cfg, world_size=8)

Differences from the official code: no YAML and no registries; the paper's two stages are
two presets of one config rather than two config files per stage.
"""

import copy
import dataclasses
import typing
from dataclasses import dataclass, field

from freeseg.errors import ConfigError, ConfigKeyError


@dataclass
class ClipConfig:
    # An OpenAI model name ("ViT-B/16"), a path to a checkpoint, or "" for the toy world's own
    # tiny CLIP (found in the run directory). FreeSeg uses ViT-B/16 (paper, section 4.1).
    name: str = "ViT-B/16"
    context_length: int = 77  # OpenAI CLIP's text context
    # Shape of a CLIP trained from scratch (`train.py --stage clip`, the toy world only).
    embed_dim: int = 128
    image_resolution: int = 64
    vision_layers: tuple[int, ...] = (1, 1, 1, 1)  # modified-ResNet blocks per stage
    vision_width: int = 16
    text_width: int = 128
    text_heads: int = 2  # OpenAI fixes heads = width / 64, which build_model relies on
    text_layers: int = 4
    bpe_merges: int = 300  # merges learned from the toy captions (OpenAI's vocabulary has 48,894)


@dataclass
class BackboneConfig:
    depth: int = 101  # ResNet-18/34/50/101
    stem: str = "deeplab"  # "deeplab": three 3x3 convs (R101c); "basic": one 7x7 conv (torchvision)
    width: int = 64  # channels of the stem / res2 bottleneck; 64 is the standard ResNet
    res5_dilation: int = 1
    res5_multi_grid: tuple[int, ...] = (1, 2, 4)  # DeepLab multi-grid dilations inside res5
    stride_in_1x1: bool = False  # detectron2 MSRA weights put the stride in the 1x1 conv
    freeze_at: int = 0  # 0: train everything; 1: freeze the stem; 2: stem + res2, ...
    # "frozen_bn" for ImageNet-pretrained backbones (every official config); "gn" or "bn" to
    # train from scratch (the toy world uses "gn": it does not depend on the batch split).
    norm: str = "frozen_bn"
    weights: str = ""  # torchvision or detectron2 (R-103.pkl) ImageNet weights; "" = random


@dataclass
class PixelDecoderConfig:
    conv_dim: int = 256
    mask_dim: int = 256
    num_encoder_layers: int = 6
    num_heads: int = 8
    num_points: int = 4  # sampling points per head and level
    ffn_dim: int = 1024
    # MASK_FORMER.DROPOUT 0.1 reaches the deformable encoder in the official code (the decoder
    # layers hard-code 0.0).
    dropout: float = 0.1
    num_groups: int = 32  # GroupNorm groups in the FPN convs


@dataclass
class DecoderConfig:
    hidden_dim: int = 256
    num_queries: int = 100
    # The official checkpoint holds 10 decoder layers (transformer_*_layers.0-9 in
    # tests/data/official_freeseg_r101c_keys.tsv), cycling over the three scales.
    num_layers: int = 10
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.0
    pre_norm: bool = False
    mask_mlp_layers: int = 3
    class_mlp_hidden: int = 1024  # class_embed: 256 -> 1024 -> text dim (official keys)


@dataclass
class InteractionConfig:
    enabled: bool = True
    attn_dim: int = 2048  # q/k/v projection width (official keys: interaction.attn.q_proj 2048)
    num_heads: int = 8
    layer_scale_init: float = 0.1  # gamma, initialised small so training starts near identity
    dropout: float = 0.1  # attention dropout (official interaction module)


@dataclass
class PromptConfig:
    class_ctx: int = 16  # learnable class-context vectors (official prefix_prompt: 16 x 512)
    task_ctx: int = 8  # learnable task vectors (official task_prompt: 8 x 512)
    init_std: float = 0.02
    # Words whose token embeddings start the class context (CoOp), e.g. "a photo of a";
    # "" = random N(0, init_std) as in the official code.
    ctx_init: str = ""
    tasks: tuple[str, ...] = ("semantic", "instance", "panoptic")
    # False: the class prompt alone, [SOS][class context][class words][.][EOT], without the task
    # words and task vectors (needs task_ctx=0): the paper's ablation of the task prompt; the
    # official learner builds this sequence when it is given no task names
    # (clip_adapter/text_prompt.py, `LearnablePromptExtractor`; freeseg/ablations.py).
    use_task_prompt: bool = True
    # False: fixed hand-written prompts instead of learned ones, the baseline of the paper's
    # ablation of prompts: each class's feature is the mean of its `templates`' CLIP text
    # features. "a photo of a {}." is the official region classifier's template
    # (mask2former/config.py, REGION_CLIP_ADAPTER.PREDEFINED_PROMPT_TEMPLATES).
    learned: bool = True
    templates: tuple[str, ...] = ("a photo of a {}.",)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    # detectron2's ImageNet statistics in 0-255 RGB, used to normalise the backbone input.
    pixel_mean: tuple[float, ...] = (123.675, 116.280, 103.530)
    pixel_std: tuple[float, ...] = (58.395, 57.120, 57.375)
    logit_scale: float = 100.0  # cosine similarity x 100, as CLIP's learned scale at convergence
    size_divisibility: int = 32  # pad inputs to a multiple of the backbone's output stride


@dataclass
class LossConfig:
    no_object_weight: float = 0.1  # cross-entropy weight of the "no object" class
    class_weight: float = 1.0
    focal_weight: float = 20.0
    dice_weight: float = 5.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    deep_supervision: bool = True
    # Hungarian matching costs (official MATCHER settings equal the loss weights).
    cost_class: float = 1.0
    cost_focal: float = 20.0
    cost_dice: float = 5.0
    # Points at which the matching costs are sampled (matcher.py); 0 = every pixel of the target.
    matcher_points: int = 0
    # Points at which the mask losses are taken (criterion.uncertain_points); 0 = every pixel of
    # the target, as FreeSeg's (MaskFormer's) criterion does. Mask2Former: 112 * 112 points,
    # oversampled 3x, 75% of them where the prediction is least sure.
    train_points: int = 0
    oversample_ratio: float = 3.0
    importance_ratio: float = 0.75


@dataclass
class TTPTConfig:
    """Test-time prompt tuning (paper section 3.4); not in the official release."""

    # The paper gives no values; these were chosen on toy val: at lr 1e-2 the shared class context
    # moves the seen classes' prompts too (docs/toy_experiments.md, "Test-time prompt tuning").
    enabled: bool = False
    steps: int = 5
    lr: float = 1e-3
    entropy_threshold: float = 0.5  # fraction of log(K_unseen): queries below it are kept


@dataclass
class InferenceConfig:
    tasks: tuple[str, ...] = ("semantic", "instance", "panoptic")
    # The rules after the network (docs/differences.md): "mask2former" (ours, the default for
    # models trained here: CLIP's own temperature, a renormalised ensemble, Mask2Former's
    # post-processing at the output size) or "official", the official FreeSeg code's inference
    # reproduced literally, quirks included (postprocess_official.py); a converted official
    # checkpoint carries "official". Both run the same network, crops and ensemble inputs.
    protocol: str = "mask2former"
    mask_threshold: float = 0.5  # binarise a mask before cropping it for CLIP
    # How stride-4 mask logits are upsampled to the image: the official inference uses
    # align_corners=True (open_vocabulary_model.py), although its training loss (point_sample,
    # grid_sample) and ours (matcher.upsample_masks) align pixel centres, i.e. False.
    mask_align_corners: bool = True
    mask_expand_ratio: float = 1.0  # grow the crop box around the mask (official: 1.0)
    clip_chunk: int = 32  # crops per CLIP forward pass
    # Geometric ensemble of mask classifier and CLIP (paper eq. 6, official ENSEMBLE_WEIGHT 0.8):
    # seen classes  p = p_mask^(1-w_seen)  * p_clip^w_seen,
    # unseen classes p = p_mask^(1-w_unseen) * p_clip^w_unseen.
    clip_weight_seen: float = 0.2
    clip_weight_unseen: float = 0.8
    use_clip: bool = True
    # Panoptic: drop queries less confident than this, and masks mostly hidden by better ones.
    # 0.5/0.5 are the official all-task settings (coco-stuff-164k-171 R101c yaml, TEST.*);
    # Mask2Former's own panoptic default is 0.8/0.8.
    object_mask_threshold: float = 0.5
    overlap_threshold: float = 0.5
    # Which confidence `object_mask_threshold` tests (postprocess.panoptic_inference):
    # "class" is Mask2Former's rule (the best of K+1 class probabilities); "object" tests the
    # mask classifier's object probability 1 - p(no object) and labels the query with the best
    # of the K classes. The CLIP ensemble spreads a sure object over look-alike classes ("red
    # circle" 0.4, "red square" 0.3), so the class rule drops queries that are certainly objects;
    # the official FreeSeg code avoids that by sharpening, softmax(p / 0.01), and then keeps
    # nearly every query (docs/toy_experiments.md, "Panoptic confidence").
    panoptic_keep_by: str = "object"
    instance_topk: int = 100
    ttpt: TTPTConfig = field(default_factory=TTPTConfig)


@dataclass
class DataConfig:
    dataset: str = "coco"  # coco | voc | ade | toy
    root: str = ""  # "" = $FREESEG_DATASETS, else ./datasets
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 640  # training crop
    # "semantic": Mask2Former's semantic mapper: short side int(x * 0.1 * short_side_base) for x
    # from 10 * min_scale to 10 * max_scale, long side at most 4 x image_size, image_size crop,
    # colour jitter, flip. "lsj": large-scale jitter, the image fitted into an image_size square
    # scaled by U(min_scale, max_scale), flip, image_size crop. The official COCO all-task config
    # names an LSJ mapper (`coco_full_lsj`, MIN_SCALE 0.1 / MAX_SCALE 2.0), but that mapper hands
    # the semantic list to detectron2, so the released models trained with "semantic" at 0.5-1.5
    # (preset `coco`); preset `coco_lsj` trains with the LSJ the config states.
    augmentation: str = "semantic"
    min_scale: float = 0.5
    max_scale: float = 1.5
    short_side_base: int = 0  # 0 = image_size; VOC's short sides are based on 640 with 512 crops
    test_short_side: int = 640
    num_workers: int = 4
    # The prompt stage (paper section 3.2) classifies segments cut out of the training images:
    # a pool of at most `prompt_samples_per_class` segments per seen class (official
    # DATASETS.SAMPLE_PER_CLASS), and for each crop the recipe `prompt_crop`:
    # "random" (official mask_former_binary_semantic mapper + ProposalClipClassifier): the
    # segment's box grown by `inference.mask_expand_ratio` (official MASK_EXPAND_RATIO), a random
    # resized crop of it, a flip, and CLIP's mean colour in normalised space outside the mask
    # (transforms.PromptCrop); "region": exactly the region classifier's crop at inference.
    prompt_samples_per_class: int = 64
    prompt_crop: str = "random"


@dataclass
class TrainConfig:
    stage: str = "alltask"  # clip, backbone (toy only) | prompt | alltask
    seed: int = 0
    batch_size: int = 32  # global batch, split over ranks
    iterations: int = 60000
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1.5e-4
    weight_decay: float = 1.5e-4
    momentum: float = 0.9
    backbone_lr_mult: float = 0.1
    schedule: str = "poly"  # poly | cosine
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 1.0
    clip_grad_norm: float = 0.01  # full-model L2 clipping (official CLIP_VALUE 0.01)
    # The tasks a stage draws its iterations from, one uniformly at random per iteration
    # (FreeSeg: all three). One task trains a task-specific model, the baseline of the paper's
    # ablation of all-task training (freeseg/ablations.py).
    tasks: tuple[str, ...] = ("semantic", "instance", "panoptic")
    amp: bool = True  # mixed precision, GPU only
    log_every: int = 20
    eval_every: int = 5000
    checkpoint_every: int = 5000


@dataclass
class ExtensionsConfig:
    """Mechanisms that FreeSeg does not have (freeseg/extensions.py): all off in the paper's presets,
    on in the toy world's, where each one fixed a failure measured on the toy data."""

    # The transformer decoder's positional terms (extensions.PositionalMaskDecoder):
    coord_masks: bool = False  # add a per-query disc over pixel positions to the mask logits
    coord_values: bool = False  # add each pixel's position to the features the queries attend to
    # > 0: mask features at stride 2, refined from a trainable path over the image with this many
    # channels (extensions.StrideTwoRefiner); 0 = FreeSeg's stride-4 mask features.
    fine_dim: int = 0
    # Training (extensions.target_task): what a semantic iteration of the all-task stage learns
    # from: "classes", one mask per class (FreeSeg), or "segments", the panoptic task's segments
    # (things one mask per instance) with the semantic prompt kept.
    semantic_targets: str = "classes"
    # Inference (extensions.inference_hooks; they may change after training):
    # crop only the largest 4-connected part of each binary mask for CLIP, after eroding it by
    # `clip_erode` pixels (extensions.largest_parts);
    clip_largest_part: bool = False
    clip_erode: int = 0
    clip_flip: bool = False  # average CLIP's features of each crop and of its mirror image
    # CLIP names the regions against the mean of the three task prompts' text features instead
    # of the current task's (extensions.task_ensemble_text);
    clip_task_ensemble: bool = False
    # > 0: every unclaimed region covering at least this fraction of the image becomes a proposal
    # named by CLIP alone (extensions.unclaimed_regions).
    unclaimed_min_area: float = 0.0


@dataclass
class FastConfig:
    """Fast mode (`--fast` on evaluate.py and demo.py; freeseg/fast_inference.py, docs/speed.md),
    an approximation of our own, off by default: region CLIP only where it can hardly change the
    result. A query CLIP does not see is named by the mask classifier alone."""

    enabled: bool = False
    # CLIP sees, per task, only the queries whose object probability 1 - p(no object) reaches
    # `min_object`, and for semantic only the `semantic_queries` most object-like of them;
    min_object: float = 0.1
    semantic_queries: int = 20
    # one crop serves every mask, of any task, whose binary mask overlaps the group's first with
    # IoU >= `share_iou` (exact mode: identical masks only).
    share_iou: float = 0.9
    # CLIP's image tower under bfloat16 autocast: about twice as fast on CPUs with native bfloat16
    # (AVX512-BF16, AMX) and on GPUs, slower on other CPUs, so off unless asked for.
    clip_bfloat16: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extensions: ExtensionsConfig = field(default_factory=ExtensionsConfig)
    fast: FastConfig = field(default_factory=FastConfig)


# --------------------------------------------------------------------------- overrides

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_value(text: str, kind: typing.Any, key: str) -> typing.Any:
    """Convert `text` to the type `kind` of field `key`, or raise a ConfigError naming the key."""
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"expected true/false, got {text!r}")
        if kind in (int, float, str):
            return kind(text)
        if origin is tuple:
            (item, _ellipsis) = typing.get_args(kind)
            parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
            return tuple(_parse_value(p.strip(), item, key) for p in parts)
    except ValueError as err:
        raise ConfigError(f"bad value for {key}: {err}") from None
    raise ConfigError(f"field {key} has a type ({kind}) that cannot be set from the command line")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `key=value` strings in place (and return `cfg`); unknown keys raise a ConfigKeyError
    (a KeyError), bad values a ConfigError (a ValueError). Ranges: `validate`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        if key.strip() in MOVED_KEYS:
            raise ConfigKeyError(f"config key {key.strip()!r} is now {MOVED_KEYS[key.strip()]!r}")
        *path, name = key.strip().split(".")
        node = cfg
        for part in path:
            if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                raise ConfigKeyError(f"unknown config key {key!r} (no section {part!r})")
            node = getattr(node, part)
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if name not in fields:
            raise ConfigKeyError(f"unknown config key {key!r}; {'.'.join(path) or 'config'} has: {', '.join(fields)}")
        hints = typing.get_type_hints(type(node))
        if dataclasses.is_dataclass(hints[name]):
            raise ConfigKeyError(f"{key!r} is a section; set one of its fields instead")
        setattr(node, name, _parse_value(text, hints[name], key))
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Fields that moved from a paper section to `extensions` or `fast`, old dotted key -> new one: a config saved
# in a checkpoint with the old layout is read with its values in their new place.
MOVED_KEYS = {
    "model.decoder.coord_masks": "extensions.coord_masks",
    "model.decoder.coord_values": "extensions.coord_values",
    "model.pixel_decoder.fine_dim": "extensions.fine_dim",
    "train.semantic_targets": "extensions.semantic_targets",
    "inference.clip_largest_part": "extensions.clip_largest_part",
    "inference.clip_erode": "extensions.clip_erode",
    "inference.clip_flip": "extensions.clip_flip",
    "inference.clip_task_ensemble": "extensions.clip_task_ensemble",
    "inference.unclaimed_min_area": "extensions.unclaimed_min_area",
    # fast mode, an option of our own, moved out of the paper's inference section
    "inference.fast": "fast.enabled",
    "inference.fast_min_object": "fast.min_object",
    "inference.fast_semantic_queries": "fast.semantic_queries",
    "inference.fast_share_iou": "fast.share_iou",
}
# The extensions that act only at inference, so may change after training (evaluate.py --set).
INFERENCE_EXTENSIONS = ("extensions.clip_largest_part", "extensions.clip_erode", "extensions.clip_flip",
                        "extensions.clip_task_ensemble", "extensions.unclaimed_min_area")


def _move_keys(data: dict) -> dict:
    """A copy of the saved config `data` with every key of MOVED_KEYS in its new place."""
    data = copy.deepcopy(data)
    for old, new in MOVED_KEYS.items():
        *old_path, old_name = old.split(".")
        node = data
        for part in old_path:
            node = node.get(part, {})
        if old_name not in node:
            continue
        value = node.pop(old_name)
        *new_path, new_name = new.split(".")
        target = data
        for part in new_path:
            target = target.setdefault(part, {})
        target[new_name] = value
    return data


def from_dict(data: dict, cls: type = Config) -> typing.Any:
    """Rebuild a config saved with `to_dict` (for example from a checkpoint), with the fields of
    MOVED_KEYS read from their old place too."""
    if cls is Config:
        data = _move_keys(data)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue  # a field added after the checkpoint was written keeps its default
        value, kind = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind):
            value = from_dict(value, kind)
        elif typing.get_origin(kind) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, typing.Any, typing.Any]]:
    """(dotted key, old value, new value) for every setting of `to_dict` output `new` that
    differs from `old`; keys `old` does not have (fields added since) are left out."""
    changes = []
    for key, value in new.items():
        if key not in old:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            changes += config_diff(old[key], value, f"{prefix}{key}.")
        elif (list(value) if isinstance(value, tuple) else value) != (list(old[key]) if isinstance(old[key], tuple) else old[key]):
            changes.append((f"{prefix}{key}", old[key], value))
    return changes


# Range rules and `validate` live in freeseg/config_rules.py; importable from here too.
from freeseg.config_rules import RULES, _flat, validate  # noqa: E402,F401
