"""The paper's presets against the official configs, and every dataset/stage pair resolving into a
config and a model.

OFFICIAL holds numbers typed from the official FreeSeg configs (bytedance/FreeSeg, configs/ and
mask2former/), each with the file it comes from, so a preset that drifts from them fails here.
"""

import pytest
import torch

import train
from freeseg.clip import CLIP, default_tokenizer
from freeseg.data.transforms import PromptCrop, build_transforms
from freeseg.modeling.freeseg import build_freeseg
from freeseg.modeling.prompts import build_prompts
from freeseg.presets import PRESETS, get_preset, preset_for

COCO = "coco-stuff-164k-156/mask2former_R101c_alltask_bs32_60k.yaml"
COCO_BASE = "coco-stuff-164k-171/Base-COCOStuff164K-171.yaml"
COCO_PROMPT = "coco-stuff-164k-156/mask2former_learn_prompt_bs32_16k.yaml"
VOC = "voc-11k-15/mask2former_R101c_bs16_20k.yaml"
VOC_BASE = "voc-11k-20/Base-VOC11K-20.yaml"
VOC_PROMPT = "voc-11k-15/mask2former_learn_prompt_bs16_10k.yaml"
ADE = "ade20k-135/mask2former_R101c_alltask_bs32_60k.yaml"
ADE_BASE = "ade20k-150/Base-ADE20K-150.yaml"
ADE_PROMPT = "ade20k-135/mask2former_learn_prompt_bs32_16k.yaml"
M2F = "mask2former/config.py"

# preset -> {config key: (official value, source)}
OFFICIAL = {
    "coco": {
        "train.lr": (1.5e-4, COCO), "train.weight_decay": (1.5e-4, COCO), "train.iterations": (60000, COCO),
        "train.batch_size": (32, COCO), "train.optimizer": ("adamw", COCO_BASE), "train.schedule": ("poly", COCO_BASE),
        "train.backbone_lr_mult": (0.1, COCO_BASE), "train.clip_grad_norm": (0.01, COCO_BASE),
        "train.warmup_iters": (0, COCO_BASE),
        "data.image_size": (640, COCO_BASE), "data.augmentation": ("semantic", "coco_full_task_new_baseline_dataset_mapper.py"),
        "data.min_scale": (0.5, COCO_BASE), "data.max_scale": (1.5, COCO_BASE), "data.test_short_side": (640, COCO_BASE),
        "data.prompt_samples_per_class": (64, COCO_PROMPT),
        "inference.tasks": (("semantic", "instance", "panoptic"), COCO), "inference.clip_weight_unseen": (0.8, COCO),
        "inference.clip_weight_seen": (0.2, COCO), "inference.object_mask_threshold": (0.5, COCO),
        "inference.overlap_threshold": (0.5, COCO), "inference.mask_expand_ratio": (1.0, COCO),
        "inference.mask_threshold": (0.5, COCO),
        "model.backbone.depth": (101, COCO), "model.backbone.stem": ("deeplab", COCO),
        "model.backbone.res5_multi_grid": ((1, 2, 4), COCO), "model.prompt.class_ctx": (16, COCO),
        "model.prompt.task_ctx": (8, M2F), "model.decoder.num_queries": (100, "coco-stuff-164k-171/mask2former_R50_bs32_60k.yaml"),
    },
    "coco_lsj": {"data.augmentation": ("lsj", COCO), "data.min_scale": (0.1, M2F), "data.max_scale": (2.0, M2F),
                 "data.image_size": (640, COCO)},
    "coco_prompt": {
        "train.optimizer": ("sgd", COCO_PROMPT), "train.lr": (0.02, COCO_PROMPT), "train.weight_decay": (0.001, COCO_PROMPT),
        "train.schedule": ("cosine", COCO_PROMPT), "train.warmup_iters": (100, COCO_PROMPT),
        "train.warmup_factor": (0.005, COCO_PROMPT), "train.batch_size": (32, COCO_PROMPT),
        "train.iterations": (16000, COCO_PROMPT), "train.clip_grad_norm": (0.01, COCO_BASE),
        "data.prompt_crop": ("random", "mask_former_binary_full_dataset_mapper.py"),
        "data.prompt_samples_per_class": (64, COCO_PROMPT), "inference.mask_expand_ratio": (1.0, M2F),
    },
    "voc": {
        "train.lr": (2e-5, VOC), "train.weight_decay": (2e-5, VOC), "train.iterations": (20000, VOC),
        "train.batch_size": (32, VOC), "train.clip_grad_norm": (0.01, VOC_BASE),
        "data.image_size": (512, VOC_BASE), "data.augmentation": ("semantic", VOC),
        "data.short_side_base": (640, VOC_BASE), "data.min_scale": (0.5, VOC_BASE), "data.max_scale": (1.5, VOC_BASE),
        "data.test_short_side": (512, VOC_BASE), "data.prompt_samples_per_class": (128, VOC_PROMPT),
        "inference.tasks": (("semantic",), VOC), "train.tasks": (("semantic",), VOC),
        "inference.clip_weight_unseen": (0.8, VOC),
    },
    "voc_prompt": {
        "train.optimizer": ("sgd", VOC_PROMPT), "train.lr": (0.02, VOC_PROMPT), "train.weight_decay": (0.001, VOC_PROMPT),
        "train.iterations": (3200, VOC_PROMPT), "train.batch_size": (32, VOC_PROMPT),
        "train.warmup_iters": (100, VOC_PROMPT), "train.clip_grad_norm": (0.01, VOC_BASE),
        "data.prompt_crop": ("random", "mask_former_binary_semantic_dataset_mapper.py"),
    },
    "ade": {
        "train.lr": (1e-4, ADE_BASE), "train.weight_decay": (1e-4, ADE_BASE), "train.iterations": (60000, ADE_BASE),
        "train.batch_size": (32, ADE_BASE), "train.clip_grad_norm": (0.01, ADE_BASE),
        "data.image_size": (512, ADE), "data.augmentation": ("semantic", "ade_all_task_dataset_mapper.py"),
        "data.min_scale": (0.5, ADE_BASE), "data.max_scale": (2.0, ADE_BASE), "data.test_short_side": (512, ADE_BASE),
        "data.prompt_samples_per_class": (32, ADE_PROMPT), "inference.tasks": (("semantic", "instance", "panoptic"), ADE),
        "train.tasks": (("semantic", "instance", "panoptic"), ADE),
        "inference.object_mask_threshold": (0.5, ADE), "inference.overlap_threshold": (0.5, ADE),
    },
    "ade_prompt": {
        "train.optimizer": ("sgd", ADE_PROMPT), "train.lr": (0.02, ADE_PROMPT), "train.weight_decay": (5e-4, ADE_PROMPT),
        "train.iterations": (16000, ADE_PROMPT), "train.batch_size": (32, ADE_PROMPT),
        "train.warmup_factor": (0.005, ADE_PROMPT), "train.clip_grad_norm": (0.01, ADE_BASE),
        "data.prompt_crop": ("random", "mask_former_binary_semantic_dataset_mapper.py"),
    },
}


def value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_paper_presets_hold_the_official_numbers(name):
    cfg = get_preset(name)
    wrong = {key: (value(cfg, key), want, source) for key, (want, source) in OFFICIAL[name].items()
             if value(cfg, key) != want}
    assert wrong == {}


def test_semantic_short_sides_are_the_official_lists():
    from freeseg.data.transforms import semantic_short_sides

    for name, base, xs in (("coco", 640, range(5, 16)), ("voc", 640, range(5, 16)), ("ade", 512, range(5, 21))):
        data = get_preset(name).data
        sides = semantic_short_sides(data.short_side_base or data.image_size, data.min_scale, data.max_scale)
        assert sides == [int(x * 0.1 * base) for x in xs]  # the configs' MIN_SIZE_TRAIN expressions


def test_paper_presets_switch_every_extension_off():
    for name in PRESETS:
        if not name.startswith("toy"):
            ext = get_preset(name).extensions
            assert not (ext.coord_masks or ext.coord_values or ext.fine_dim), name


def meta_clip(cfg) -> CLIP:
    """CLIP of the shape the preset loads: OpenAI's ViT-B/16, or the toy world's tiny one."""
    c = cfg.model.clip
    if c.name:
        return CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
    return CLIP(c.embed_dim, c.image_resolution, tuple(c.vision_layers), c.vision_width, None, c.context_length,
                49408, c.text_width, c.text_heads, c.text_layers)


@pytest.mark.parametrize("dataset", ["coco", "voc", "ade", "toy"])
@pytest.mark.parametrize("stage", ["prompt", "alltask"])
def test_every_dataset_and_stage_resolves(dataset, stage):
    """What `train.py --dataset D --stage S` starts from: its config, its data recipe and its
    model (on the meta device: shapes only, no memory)."""
    args = train.parse_args(["--dataset", dataset, "--stage", stage])
    cfg = train.resolve_config(args, stage)
    assert preset_for(dataset, stage) in PRESETS and cfg.train.stage == stage and cfg.data.dataset == dataset
    build_transforms(cfg.data, train=True)
    with torch.device("meta"):
        clip = meta_clip(cfg)
        if stage == "prompt":
            PromptCrop(cfg.data.prompt_crop, clip.input_resolution, cfg.inference.mask_expand_ratio)
            prompts = build_prompts(cfg.model.prompt, clip, default_tokenizer())
            assert sum(p.numel() for p in prompts.parameters() if p.requires_grad) > 0
        else:
            model = build_freeseg(cfg, clip, default_tokenizer())
            assert model.decoder.query_feat.weight.shape[0] == cfg.model.decoder.num_queries
