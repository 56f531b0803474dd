"""Named presets: the paper's settings for each dataset and stage, and the tiny `toy` world.

`Config()` (freeseg/config.py) holds the official FreeSeg COCO R101c all-task settings; each
preset here changes what its dataset or stage needs. Every number of a paper preset names the
official file it comes from (bytedance/FreeSeg; paths under configs/ unless they start with
mask2former/); a line marked "Deliberate difference" points to its entry in
docs/differences_presets.md. The toy presets' numbers were chosen on the toy world's validation
set; each cites its section of docs/toy_experiments.md, where the runs are.

    cfg = get_preset("coco")                      # or preset_for("voc", "prompt") -> "voc_prompt"
"""

import typing

from freeseg.config import (
    BackboneConfig,
    ClipConfig,
    Config,
    DataConfig,
    DecoderConfig,
    ExtensionsConfig,
    InferenceConfig,
    InteractionConfig,
    LossConfig,
    PixelDecoderConfig,
    PromptConfig,
    TrainConfig,
)
from freeseg.errors import ConfigKeyError

COCO_ALLTASK = "coco-stuff-164k-156/mask2former_R101c_alltask_bs32_60k.yaml"
COCO_BASE = "coco-stuff-164k-171/Base-COCOStuff164K-171.yaml"
VOC_ALLTASK = "voc-11k-15/mask2former_R101c_bs16_20k.yaml"
VOC_BASE = "voc-11k-20/Base-VOC11K-20.yaml"
ADE_ALLTASK = "ade20k-135/mask2former_R101c_alltask_bs32_60k.yaml"
ADE_BASE = "ade20k-150/Base-ADE20K-150.yaml"


# ---------------------------------------------------------------- COCO-Stuff (156 seen / 15 unseen)


def _coco() -> Config:
    """COCO-Stuff all-task stage, R101c backbone: `Config()`, whose every default names its
    source (COCO_ALLTASK, COCO_BASE, mask2former/config.py). Its augmentation is the one the
    official mapper runs (DataConfig's comment): short sides int(x * 0.1 * 640), x = 5..15
    (COCO_BASE MIN_SIZE_TRAIN), 640 crops (COCO_BASE CROP.SIZE), colour jitter (COLOR_AUG_SSD),
    flip; 64 segments per class for the prompt stage (coco-stuff-164k-156/
    mask2former_learn_prompt_bs32_16k.yaml SAMPLE_PER_CLASS)."""
    return Config()


def _coco_lsj() -> Config:
    """COCO with the large-scale jitter the official all-task config states (INPUT.IMAGE_SIZE 640,
    `coco_full_lsj`, MIN_SCALE 0.1 / MAX_SCALE 2.0 from mask2former/config.py) but its mapper does not run."""
    cfg = _coco()
    cfg.data.augmentation, cfg.data.min_scale, cfg.data.max_scale = "lsj", 0.1, 2.0
    return cfg


def _prompt_stage(cfg: Config, iterations: int, weight_decay: float, checkpoint_every: int) -> Config:
    """The prompt stage (paper section 3.2) of a dataset preset, from its learn_prompt config
    (named where it is called): SGD at lr 0.02 (BASE_LR), cosine schedule (WarmupCosineLR) after 100 iterations
    (WARMUP_ITERS) at 0.005x (WARMUP_FACTOR, WARMUP_METHOD "constant"), batch 32 (IMS_PER_BATCH),
    full-model gradient clipping at 0.01 (CLIP_GRADIENTS, inherited from the dataset's Base
    config). Momentum 0.9 is detectron2's default SOLVER.MOMENTUM."""
    cfg.train = TrainConfig(
        stage="prompt", optimizer="sgd", lr=0.02, weight_decay=weight_decay, momentum=0.9, schedule="cosine",
        warmup_iters=100, warmup_factor=0.005, iterations=iterations, batch_size=32, clip_grad_norm=0.01,
        checkpoint_every=checkpoint_every,
    )
    return cfg


def _coco_prompt() -> Config:
    # coco-stuff-164k-156/mask2former_learn_prompt_bs32_16k.yaml: MAX_ITER 16000, WEIGHT_DECAY
    # 0.001, CHECKPOINT_PERIOD 2000.
    return _prompt_stage(_coco(), 16000, 0.001, 2000)


# ---------------------------------------------------------------- Pascal VOC 2012 (15 seen / 5 unseen)


def _voc() -> Config:
    """Pascal VOC 2012, R101c, semantic segmentation only."""
    cfg = Config()
    cfg.data = DataConfig(
        dataset="voc",
        image_size=512,  # VOC_BASE CROP.SIZE (512, 512)
        # Short sides int(x * 0.1 * 640), x = 5..15: 320..960 (VOC_BASE MIN_SIZE_TRAIN, based on
        # 640 although the crops are 512); long side at most 2048 (MAX_SIZE_TRAIN, 4 x 512).
        augmentation="semantic", short_side_base=640, min_scale=0.5, max_scale=1.5,
        test_short_side=512,  # VOC_BASE MIN_SIZE_TEST (MAX_SIZE_TEST 2048)
        prompt_samples_per_class=128,  # voc-11k-15/mask2former_learn_prompt_bs16_10k.yaml SAMPLE_PER_CLASS
    )
    # VOC_ALLTASK: BASE_LR 2e-5, WEIGHT_DECAY 2e-5, MAX_ITER 20000, IMS_PER_BATCH 32, no warm-up,
    # TEST.EVAL_PERIOD 2000.
    cfg.train = TrainConfig(lr=2e-5, weight_decay=2e-5, iterations=20000, batch_size=32, eval_every=2000)
    # VOC_ALLTASK: TASK_NAME ["semantic segmentation."] (trained and tested on that task alone);
    # INSTANCE_ON / PANOPTIC_ON False; CLIP_ENSEMBLE_WEIGHT 0.8 (the defaults' 0.2 / 0.8).
    cfg.train.tasks = ("semantic",)
    cfg.inference.tasks = ("semantic",)
    return cfg


def _voc_prompt() -> Config:
    # voc-11k-15/mask2former_learn_prompt_bs16_10k.yaml: MAX_ITER 3200, WEIGHT_DECAY 0.001,
    # CHECKPOINT_PERIOD 1000.
    return _prompt_stage(_voc(), 3200, 0.001, 1000)


# ---------------------------------------------------------------- ADE20K-150 (135 seen / 15 unseen)


def _ade() -> Config:
    """ADE20K-150, R101c, all three tasks."""
    cfg = Config()
    cfg.data = DataConfig(
        dataset="ade",
        image_size=512,  # ADE_ALLTASK INPUT.IMAGE_SIZE 512; ADE_BASE CROP.SIZE (512, 512)
        # Short sides int(x * 0.1 * 512), x = 5..20: 256..1024 (ADE_BASE MIN_SIZE_TRAIN), long side
        # at most 2048 (MAX_SIZE_TRAIN), colour jitter (COLOR_AUG_SSD), flip. ADE_ALLTASK names the
        # mapper "ade20k_full_lsj", which train_net.py does not know; its ADE mapper
        # (mask2former/data/dataset_mappers/ade_all_task_dataset_mapper.py) is the semantic one.
        augmentation="semantic", min_scale=0.5, max_scale=2.0,
        test_short_side=512,  # ADE_BASE MIN_SIZE_TEST (MAX_SIZE_TEST 2048)
        prompt_samples_per_class=32,  # ade20k-135/mask2former_learn_prompt_bs32_16k.yaml SAMPLE_PER_CLASS
    )
    # ADE_BASE: BASE_LR 1e-4, WEIGHT_DECAY 1e-4 (ADE_ALLTASK keeps both), MAX_ITER 60000, IMS_PER_BATCH 32.
    cfg.train = TrainConfig(lr=1e-4, weight_decay=1e-4, iterations=60000, batch_size=32)
    # ADE_ALLTASK: TASK_NAME all three; OBJECT_MASK_THRESHOLD / OVERLAP_THRESHOLD 0.5 (the defaults).
    return cfg


def _ade_prompt() -> Config:
    # ade20k-135/mask2former_learn_prompt_bs32_16k.yaml: MAX_ITER 16000, WEIGHT_DECAY 0.0005,
    # CHECKPOINT_PERIOD 1000.
    return _prompt_stage(_ade(), 16000, 0.0005, 1000)


# ---------------------------------------------------------------- the miniature world


def _toy() -> Config:
    """The miniature world: the same modules at tiny widths, sized to train on a laptop CPU, with
    the extensions of freeseg/extensions.py on."""
    cfg = Config()
    # Starts from the backbone stage (`toy_backbone`, the toy world's ImageNet; train.py sets
    # `weights`) and stays frozen: fine-tuning it in the all-task stage wiped out its shape
    # features (docs/toy_experiments.md, "Frozen backbone").
    cfg.model.backbone = BackboneConfig(depth=18, stem="basic", width=16, res5_multi_grid=(1, 1, 1), norm="gn",
                                        freeze_at=5)
    cfg.model.pixel_decoder = PixelDecoderConfig(
        conv_dim=64, mask_dim=64, num_encoder_layers=1, num_heads=4, num_points=4, ffn_dim=128, num_groups=8,
        dropout=0.0,
    )
    cfg.model.decoder = DecoderConfig(
        hidden_dim=64, num_queries=20, num_layers=3, num_heads=4, ffn_dim=128, class_mlp_hidden=128,
    )
    cfg.model.interaction = InteractionConfig(attn_dim=128, num_heads=4, dropout=0.0)
    # Every extension (the mechanisms: freeseg/extensions.py; the runs: docs/toy_experiments.md):
    # the positional disc, the positions in the attended tokens and the stride-2 masks
    # ("Positional disc", "Pixel positions in the attended features", "Stride-2 mask features");
    # semantic iterations learn from segments, not one mask per class ("Semantic targets");
    # unclaimed regions proposed to CLIP ("Unclaimed regions"); CLIP shown the largest part of
    # each mask after a 1-pixel erosion, and its mirror image ("What CLIP is shown"); CLIP names
    # the regions against the mean of the three task prompts ("Task-prompt ensemble").
    cfg.extensions = ExtensionsConfig(coord_masks=True, coord_values=True, fine_dim=32, semantic_targets="segments",
                                      unclaimed_min_area=0.01, clip_largest_part=True, clip_erode=1, clip_flip=True,
                                      clip_task_ensemble=True)
    # The tiny CLIP has only ever read captions: random context vectors start it far from
    # anything it knows, so the class context starts as the words "a photo of a" (CoOp;
    # docs/toy_experiments.md, "Prompt context from words").
    cfg.model.prompt = PromptConfig(class_ctx=4, task_ctx=2, ctx_init="a photo of a")
    # 24 tokens hold a full prompt (task words + 2 task vectors + SOS + 4 class vectors + class
    # words + "." + EOT: EOT at position 13-14), and the tiny CLIP's captions reach such positions
    # too (toy_world.THING_TEMPLATES). 32x32 CLIP inputs: shape is what the tiny tower learns
    # slowly, and it learns it faster at 32 px than at 64 (docs/toy_experiments.md, "Tiny CLIP").
    cfg.model.clip = ClipConfig(name="", context_length=24, image_resolution=32)
    # Mask losses at every pixel, as FreeSeg's criterion (docs/toy_experiments.md, "Point losses").
    cfg.loss = LossConfig()
    # Chosen on toy val, as all toy settings (docs/toy_experiments.md, section of the same name):
    # crop boxes grown 1.5x for the region classifier and the prompt stage alike, as the tiny
    # CLIP learned from crops grown 1.2-2x (toy_world.region_crops) ("Crop boxes"); CLIP weight
    # 0.5 for seen classes, as the toy mask classifier names fewer seen things than CLIP ("CLIP
    # weight for seen classes"); masks upsampled with pixel centres aligned, as the training loss
    # upsamples them ("Mask upsampling").
    cfg.inference = InferenceConfig(mask_expand_ratio=1.5, clip_chunk=64, instance_topk=20, clip_weight_seen=0.5,
                                    mask_align_corners=False)
    # Scenes of 96 px tested at 1.5x (144 px), trained on 96-px crops of scenes scaled 0.75-1.75x,
    # centred nearer the test scale (docs/toy_experiments.md, "Test and training scales").
    cfg.data = DataConfig(
        dataset="toy", image_size=96, augmentation="lsj", min_scale=0.75, max_scale=1.75, test_short_side=144,
        num_workers=0, prompt_samples_per_class=200,
        # Deliberate difference: the region classifier's crop (docs/differences_presets.md, "Toy prompt stage").
        prompt_crop="region",
    )
    # 1,500 steps: docs/toy_experiments.md, "Training steps".
    cfg.train = TrainConfig(
        batch_size=8, iterations=1500, lr=1e-3, weight_decay=0.05, backbone_lr_mult=1.0,
        clip_grad_norm=1.0, amp=False, log_every=50, eval_every=0, checkpoint_every=500,
    )
    return cfg


def _toy_prompt() -> Config:
    cfg = _toy()
    # Deliberate difference: no gradient clipping, 300 steps of 64 (docs/differences_presets.md, "Toy prompt stage").
    cfg.train = TrainConfig(
        stage="prompt", optimizer="sgd", lr=0.02, weight_decay=0.001, schedule="cosine",
        warmup_iters=10, warmup_factor=0.005, iterations=300, batch_size=64, clip_grad_norm=0.0,
        amp=False, log_every=20, eval_every=0, checkpoint_every=100,
    )
    return cfg


def _toy_clip() -> Config:
    """Contrastive pre-training of the toy world's tiny CLIP (docs/design.md, "The toy world")."""
    cfg = _toy()
    cfg.train = TrainConfig(
        stage="clip", optimizer="adamw", lr=3e-3, weight_decay=0.05, schedule="cosine",
        warmup_iters=30, warmup_factor=0.01, iterations=1800, batch_size=64, clip_grad_norm=0.0,
        amp=False, log_every=100, eval_every=0, checkpoint_every=300,
    )
    return cfg


def _toy_backbone() -> Config:
    """Pre-training of the toy backbone on shape/texture and colour labels: the toy world's
    ImageNet (FreeSeg starts from an ImageNet-pretrained ResNet-101, paper section 4.1)."""
    cfg = _toy()
    cfg.model.backbone.freeze_at = 0
    cfg.data.image_size = 48  # objects 22-48 px across, off centre (toy_world.attribute_batch)
    # 1,500 steps: docs/toy_experiments.md, "Backbone pre-training".
    cfg.train = TrainConfig(
        stage="backbone", optimizer="adamw", lr=3e-3, weight_decay=0.05, schedule="cosine",
        warmup_iters=20, warmup_factor=0.01, iterations=1500, batch_size=64, backbone_lr_mult=1.0,
        clip_grad_norm=0.0, amp=False, log_every=50, eval_every=0, checkpoint_every=200,
    )
    return cfg


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "coco": _coco,
    "coco_lsj": _coco_lsj,
    "coco_prompt": _coco_prompt,
    "voc": _voc,
    "voc_prompt": _voc_prompt,
    "ade": _ade,
    "ade_prompt": _ade_prompt,
    "toy": _toy,
    "toy_prompt": _toy_prompt,
    "toy_clip": _toy_clip,
    "toy_backbone": _toy_backbone,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigKeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def preset_for(dataset: str, stage: str) -> str:
    """The preset `train.py --dataset D --stage S` starts from."""
    if stage == "alltask":
        return dataset
    name = f"{dataset}_{stage}"
    if name not in PRESETS:
        raise ConfigKeyError(f"no preset for dataset {dataset!r} and stage {stage!r}")
    return name
