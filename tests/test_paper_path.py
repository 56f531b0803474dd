"""The paper's configuration end to end: the COCO preset at tiny width, every toy extension off."""

import dataclasses

import torch
import torch.nn.functional as F

from freeseg.clip import CLIP, default_tokenizer
from freeseg.config import Config, apply_overrides
from freeseg.modeling.freeseg import FreeSeg, build_freeseg
from freeseg.presets import get_preset

# Widths only: depth, stem, layer counts, heads, prompt lengths and every other setting stay the
# COCO preset's (R101c backbone, 6 encoder and 10 decoder layers, 16 + 8 prompt vectors).
TINY_WIDTHS = ["model.backbone.width=8", "model.pixel_decoder.conv_dim=32", "model.pixel_decoder.mask_dim=32",
               "model.pixel_decoder.ffn_dim=64", "model.decoder.hidden_dim=32", "model.decoder.num_queries=10",
               "model.decoder.ffn_dim=64", "model.decoder.class_mlp_hidden=64", "model.interaction.attn_dim=64"]


def tiny_paper_config() -> Config:
    return apply_overrides(get_preset("coco"), TINY_WIDTHS)


def tiny_vit_clip() -> CLIP:
    """A ViT CLIP of OpenAI's layout (patch 16, context 77, OpenAI's vocabulary) at tiny width."""
    return CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=32, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2, transformer_layers=1)


def tiny_paper_model(seed: int = 0) -> FreeSeg:
    torch.manual_seed(seed)
    clip = tiny_vit_clip()
    return build_freeseg(tiny_paper_config(), clip, default_tokenizer())


NAMES = ["red circle", "blue star", "sky", "grass"]
UNSEEN = torch.tensor([False, True, False, True])
IS_THING = torch.tensor([True, True, False, False])


def test_paper_configuration_is_freeseg_alone():
    """The COCO preset builds Mask2Former's decoder, stride-4 masks and no toy layer."""
    from freeseg.modeling.pixel_decoder import MSDeformAttnPixelDecoder
    from freeseg.modeling.transformer_decoder import MaskedTransformerDecoder

    model = tiny_paper_model()
    assert type(model.decoder) is MaskedTransformerDecoder and type(model.pixel_decoder) is MSDeformAttnPixelDecoder
    assert model.mask_refiner is None and model.interaction is not None
    assert not [k for k in model.state_dict() if "coord" in k or "refiner" in k or "fine" in k]
    cfg = tiny_paper_config()
    assert len(model.decoder.transformer_cross_attention_layers) == cfg.model.decoder.num_layers == 10
    assert len(model.pixel_decoder.transformer.layers) == 6 and model.prompt_learner.prefix_prompt.shape[0] == 16
    assert model.backbone.out_channels["res5"] == 32 * cfg.model.backbone.width  # R101's bottleneck at width 8


def test_paper_training_step_and_all_three_tasks_of_inference():
    """One all-task training step of the paper's configuration per task (the code train.py runs:
    targets padded as the model pads, the preset's criterion, optimiser and clipping), then
    `predict` for the preset's three tasks with CLIP's ensemble."""
    import train
    from freeseg import engine
    from freeseg.modeling.criterion import build_criterion
    from freeseg.modeling.inference import predict
    from freeseg.modeling.targets import TASKS
    from test_freeseg_model import synthetic_batch

    torch.set_num_threads(1)
    cfg = tiny_paper_config()
    model = tiny_paper_model().train()
    images, samples = synthetic_batch()  # two 64 x 64 images of 4 classes, 2 things and 2 stuff
    criterion = build_criterion(cfg.loss)
    optimizer = engine.build_optimizer(model, cfg.train)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("clip_model.", "prompt_learner.")) for n in trainable)
    for task in TASKS:
        targets = train.alltask_targets(samples, task, torch.arange(4), model.padded_size(images.shape[-2:]),
                                        torch.device("cpu"))
        text = model.text_features(NAMES, task)
        loss, losses = engine.alltask_step(model, criterion, optimizer, images, targets, NAMES, task, text,
                                           amp=False, clip_grad_norm=cfg.train.clip_grad_norm)
        assert torch.isfinite(loss) and {"loss_ce", "loss_focal", "loss_dice", "loss_ce_9"} <= set(losses)  # deep supervision: 10 earlier outputs
        without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert without_grad == []
    moved = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert len(moved) == len(trainable)

    model.eval()
    image = images[0, :, :50, :60].to(torch.uint8)  # not a multiple of 32: padded inside
    out = predict(model, image, NAMES, UNSEEN, IS_THING, cfg=cfg.inference)
    assert set(out) == set(cfg.inference.tasks) == set(TASKS)
    assert out["semantic"].shape == (4, 50, 60) and (out["semantic"] >= 0).all()
    inst = out["instance"]
    assert inst["masks"].shape[1:] == (50, 60) and len(inst["scores"]) == len(inst["labels"]) <= cfg.inference.instance_topk
    assert all(IS_THING[int(k)] for k in inst["labels"])  # instances of things only
    pan, segments = out["panoptic"]
    assert pan.shape == (50, 60) and set(pan.unique().tolist()) <= {0} | {s["id"] for s in segments}

    # The mask classifier alone, by hand: masks at stride 4, upsampled with aligned corners (the
    # official inference, `mask_align_corners`), then sum_q p(class) * p(mask).
    with torch.no_grad():
        raw = model(image[None].float(), NAMES, "semantic")
    assert raw["pred_masks"].shape[-2:] == (16, 16)  # stride 4 of the padded 64 x 64 input
    plain = predict(model, image, NAMES, UNSEEN, IS_THING, ("semantic",),
                    dataclasses.replace(cfg.inference, use_clip=False))["semantic"]
    masks = F.interpolate(raw["pred_masks"], size=(64, 64), mode="bilinear", align_corners=True)[0, :, :50, :60]
    expected = torch.einsum("qk,qhw->khw", raw["pred_logits"][0].softmax(-1)[:, :4], masks.sigmoid())
    torch.testing.assert_close(plain, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, out["semantic"])  # CLIP's vote changes the scores
