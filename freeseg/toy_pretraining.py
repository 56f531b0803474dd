"""The toy world's two pre-trainings, stand-ins for what FreeSeg takes from elsewhere.

- `train_clip` (`train.py --dataset toy --stage clip`): a tiny CLIP learns contrastively from
  captioned toy images of ALL classes, as OpenAI's CLIP learned from the web
  (`toy_world.sample_clip_batch`); its BPE merges are learned from the toy captions and saved
  with it. Zero-shot accuracy is measured on single objects and on segments cut out of scenes.
- `train_backbone` (`--stage backbone`): the segmentation backbone learns shape/texture and
  colour labels of single toy objects, as FreeSeg's ResNet-101 learned ImageNet
  (`toy_world.attribute_batch`); it writes `resnet.pth`, which `model.backbone.weights` loads.

Both draw their images on the fly (`toy_batches`), seeded by (seed, iteration, rank), and
follow the same loop as the stages in `train.py`.
"""

import multiprocessing
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from freeseg import clip
from freeseg import config as C
from freeseg import distributed as dist
from freeseg import engine
from freeseg.data import toy_world
from freeseg.engine import mean_over_ranks, start_from
from freeseg.modeling.backbone import build_backbone
from freeseg.modeling.prompts import task_sentence
from freeseg.modeling.targets import TASKS


# ---------------------------------------------------------------- the tiny CLIP (the web)


def _draw_batch(job: tuple) -> tuple:
    """One toy batch, in a worker process: draw(generator seeded (seed, it, rank), batch, size)."""
    draw, seed, it, rank, batch, size = job
    return draw(np.random.default_rng([seed, it, rank]), batch, size=size)


def _one_thread() -> None:
    torch.set_num_threads(1)  # a drawing process uses one core, as a DataLoader worker does


def toy_batches(draw, cfg: C.Config, start: int, size: int, chunk: int = 300):
    """Yield the toy batches of iterations start .. cfg.train.iterations - 1, batch `it` being
    draw(generator seeded (seed, it, rank), batch size / ranks, size), numpy arrays as tensors.

    They are drawn `chunk` at a time by one worker process per thread of this process while the
    training waits, then trained on with every thread: the batches depend only on (seed,
    iteration, rank), so the weights are the same as if they were drawn one by one. A
    DataLoader worker drawing beside the training took more time from it than it saved
    (docs/toy_experiments.md, "Drawing the pre-training batches"). A chunk of CLIP batches
    holds 60 MB, of backbone batches 130 MB.
    """
    batch = cfg.train.batch_size // dist.get_world_size()
    jobs = [(draw, cfg.train.seed, it, dist.get_rank(), batch, size) for it in range(start, cfg.train.iterations)]
    with multiprocessing.Pool(max(1, torch.get_num_threads()), initializer=_one_thread) as pool:
        for first in range(0, len(jobs), chunk):
            for arrays in pool.map(_draw_batch, jobs[first:first + chunk]):
                yield tuple(torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in arrays)


def toy_class_caption(name: str) -> str:
    """The caption zero-shot classification compares an image with ("a photo of a red circle.")."""
    return f"a photo of {toy_world.with_article(name) if name in toy_world.THING_NAMES else name}."


def toy_caption_key(caption: str) -> str:
    """The classes a toy caption names, sorted: what makes two captions mean the same image content."""
    words = caption.rstrip(".")
    named = sorted(n for n in toy_world.NAMES if re.search(rf"\b{n}\b", words))
    return "|".join(named)


def toy_caption_corpus() -> list[str]:
    """Every caption form the toy world writes, once per class: the text the BPE merges are learned on."""
    corpus = [t.format(toy_world.with_article(n)) for n in toy_world.THING_NAMES for t in toy_world.THING_TEMPLATES]
    corpus += [t.format(n) for n in toy_world.STUFF for t in toy_world.STUFF_TEMPLATES]
    names = toy_world.THING_NAMES
    corpus += [f"a photo of {toy_world.with_article(a)}, {toy_world.with_article(b)} and {toy_world.with_article(c)} on {s}."
               for a, b, c, s in zip(names, names[1:], names[2:], toy_world.STUFF * 6)]
    # The task sentences the prompt learner puts in front of every prompt ("semantic segmentation.")
    # should be words of the vocabulary too, not strings of single bytes.
    corpus += [task_sentence(t) for t in TASKS] * 4
    return corpus


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, seed: int, per_class: int = 20) -> dict[str, float]:
    """Top-1 zero-shot classification over ALL toy classes of held-out images:
    "single": one object or stuff patch per image (what the zero-shot target counts);
    "regions": segments cut out of scenes as the region classifier cuts them (35 * per_class)."""
    model.eval()  # BatchNorm with its running statistics, as the frozen CLIP is used later
    device = model.logit_scale.device
    tokens = tokenizer([toy_class_caption(n) for n in toy_world.NAMES], context_length=model.context_length)
    text = F.normalize(model.encode_text(tokens.to(device)), dim=-1)  # (K, E)
    sets = {
        "single": toy_world.zero_shot_eval_set(seed, per_class, size=model.input_resolution),
        "regions": toy_world.region_crops(np.random.default_rng([seed, 11]), len(toy_world.NAMES) * per_class,
                                          model.input_resolution, expand=(1.5, 1.5), jitter=False),
    }
    accuracy = {}
    for name, (images, labels) in sets.items():
        images = clip.normalize_pixels(torch.as_tensor(images, device=device))
        image = torch.cat([F.normalize(model.encode_image(x), dim=-1) for x in images.split(256)])  # (N, E)
        accuracy[name] = ((image @ text.t()).argmax(-1).cpu() == torch.as_tensor(labels)).float().mean().item()
    return accuracy


def train_clip(cfg: C.Config, out_dir: Path, resume: bool) -> Path:
    """Contrastive pre-training of a tiny CLIP on captioned toy scenes of ALL classes."""
    device = dist.init_distributed()[3]
    engine.seed_everything(cfg.train.seed)  # the same initial weights on every rank and every run
    c = cfg.model.clip
    merges = clip.learn_bpe(toy_caption_corpus(), c.bpe_merges)  # a vocabulary from the toy captions
    tokenizer = clip.Tokenizer(merges=merges)
    model = clip.CLIP(
        embed_dim=c.embed_dim, image_resolution=c.image_resolution, vision_layers=tuple(c.vision_layers),
        vision_width=c.vision_width, vision_patch_size=None, context_length=c.context_length,
        vocab_size=tokenizer.vocab_size, transformer_width=c.text_width, transformer_heads=c.text_heads,
        transformer_layers=c.text_layers,
    ).to(device)
    optimizer = engine.build_optimizer(model, cfg.train)
    start = start_from(out_dir, resume, {"model": model}, optimizer, cfg)
    logger = engine.Logger(out_dir, cfg.train.iterations, start)
    logger.truncate_after(start)

    for it, (images, captions) in enumerate(toy_batches(toy_world.sample_clip_batch, cfg, start, c.image_resolution), start):
        engine.set_lr(optimizer, engine.lr_factor(it, cfg.train))
        images = clip.normalize_pixels(images.to(device))  # (B, 3, R, R)
        tokens = tokenizer(captions, context_length=c.context_length).to(device)  # (B, T)
        image_features = F.normalize(model.encode_image(images), dim=-1)  # (b, E), b = B / ranks
        # Captions in two groups of similar length: most are short (CLIP.encode_text).
        text_features = F.normalize(model.encode_text(tokens, length_groups=2), dim=-1)
        # Under torchrun every image is compared with every caption of the whole batch, not only
        # those of its own rank (as CLIP itself was trained): the same B x B logits on every rank.
        image_features, text_features = dist.gather_rows(image_features), dist.gather_rows(text_features)
        logits_per_image = model.logit_scale.exp() * image_features @ text_features.t()  # (B, B)
        # Symmetric InfoNCE; two pairs whose captions name the same classes ("a red circle." and
        # "a photo of a red circle.") are positives of each other, not negatives.
        keys = [key for part in dist.all_gather_object([toy_caption_key(t) for t in captions]) for key in part]
        _, caption_id = np.unique(keys, return_inverse=True)
        caption_id = torch.as_tensor(caption_id, device=device)
        positives = (caption_id[:, None] == caption_id[None, :]).float()
        targets = positives / positives.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets))
        optimizer.zero_grad(set_to_none=True)
        # Each rank's gradient is the part flowing through its own rows (dist.gather_rows); their
        # sum, not their mean, is the gradient of the whole batch's loss.
        (loss * dist.get_world_size()).backward()
        engine.average_gradients(model)
        optimizer.step()
        engine.check_finite(it, {"loss": loss / dist.get_world_size()}, out_dir / "checkpoint.pt")
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))  # CLIP caps the temperature at 100

        if (it + 1) % cfg.train.log_every == 0 or it + 1 == cfg.train.iterations:
            logger.log(it, {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                            "logit_scale": model.logit_scale.exp().item()})
        if (it + 1) % cfg.train.checkpoint_every == 0 or it + 1 == cfg.train.iterations:
            engine.save_checkpoint(out_dir / "checkpoint.pt", model=model.state_dict(), merges=merges,
                                   optimizer=optimizer.state_dict(), iteration=it + 1, rng=engine.rng_state(),
                                   config=C.to_dict(cfg))
    accuracy = zero_shot_accuracy(model, tokenizer, seed=cfg.train.seed + 1)
    dist.print0(f"tiny CLIP zero-shot accuracy over all toy classes: {100 * accuracy['single']:.2f}% "
                f"(segments cut out of scenes: {100 * accuracy['regions']:.2f}%)")
    engine.save_checkpoint(out_dir / "checkpoint.pt", model=model.state_dict(), merges=merges,
                           optimizer=optimizer.state_dict(), iteration=cfg.train.iterations,
                           rng=engine.rng_state(), config=C.to_dict(cfg), zero_shot_accuracy=accuracy['single'],
                           region_accuracy=accuracy['regions'])
    return out_dir / "checkpoint.pt"


# ---------------------------------------------------------------- the backbone (ImageNet)


class AttributeClassifier(torch.nn.Module):
    """The segmentation backbone plus a linear head on its pooled res5: form (shape or texture)
    logits, then colour logits."""

    def __init__(self, backbone: torch.nn.Module, num_forms: int, num_colours: int):
        super().__init__()
        self.backbone, self.num_forms = backbone, num_forms
        self.fc = torch.nn.Linear(backbone.out_channels["res5"], num_forms + num_colours)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(self.backbone(images)["res5"].mean(dim=(2, 3)))  # (B, forms + colours)
        return logits[:, :self.num_forms], logits[:, self.num_forms:]


@torch.no_grad()
def attribute_accuracy(model: AttributeClassifier, normalise, seed: int, size: int, n: int = 700) -> dict[str, float]:

    model.eval()
    images, form, colour = toy_world.attribute_batch(np.random.default_rng([seed, 13]), n, size)
    device = next(model.parameters()).device
    form_logits, colour_logits = model(normalise(torch.as_tensor(images, device=device)))
    things = colour >= 0
    model.train()
    return {"form": (form_logits.argmax(-1).cpu().numpy() == form).mean().item(),
            "colour": (colour_logits.argmax(-1).cpu().numpy() == colour)[things].mean().item()}


def train_backbone(cfg: C.Config, out_dir: Path, resume: bool) -> Path:
    """Pre-train the segmentation backbone on attribute classification of toy images: what
    ImageNet pre-training is to FreeSeg's ResNet-101. Writes `resnet.pth`, a plain ResNet state
    dict that `model.backbone.weights` loads."""
    device = dist.init_distributed()[3]
    engine.seed_everything(cfg.train.seed)
    model = AttributeClassifier(build_backbone(cfg.model.backbone), len(toy_world.SHAPES) + len(toy_world.STUFF),
                                len(toy_world.COLORS)).to(device)
    mean = torch.tensor(cfg.model.pixel_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.pixel_std, device=device).view(1, 3, 1, 1)

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return (images.to(device).float() - mean) / std  # FreeSeg's input normalisation

    optimizer = engine.build_optimizer(model, cfg.train)
    start = start_from(out_dir, resume, {"model": model}, optimizer, cfg)
    logger = engine.Logger(out_dir, cfg.train.iterations, start)
    logger.truncate_after(start)
    size = cfg.data.image_size
    for it, (images, form, colour) in enumerate(toy_batches(toy_world.attribute_batch, cfg, start, size), start):
        engine.set_lr(optimizer, engine.lr_factor(it, cfg.train))
        form_logits, colour_logits = model(normalise(images))
        loss = F.cross_entropy(form_logits, form.to(device)) + F.cross_entropy(colour_logits, colour.to(device),
                                                                              ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        engine.average_gradients(model)
        optimizer.step()
        engine.check_finite(it, {"loss": loss}, out_dir / "checkpoint.pt")

        if (it + 1) % cfg.train.log_every == 0 or it + 1 == cfg.train.iterations:
            logger.log(it, {**mean_over_ranks({"loss": loss.detach()}), "lr": optimizer.param_groups[0]["lr"]})
        if (it + 1) % cfg.train.checkpoint_every == 0 or it + 1 == cfg.train.iterations:
            engine.save_checkpoint(out_dir / "checkpoint.pt", model=model.state_dict(),
                                   optimizer=optimizer.state_dict(), iteration=it + 1,
                                   rng=engine.rng_state(), config=C.to_dict(cfg))
    accuracy = attribute_accuracy(model, normalise, cfg.train.seed + 1, size)
    dist.print0(f"backbone pre-training, held-out accuracy: form {100 * accuracy['form']:.2f}%, "
                f"colour {100 * accuracy['colour']:.2f}%")
    engine.save_checkpoint(out_dir / "resnet.pth", **model.backbone.state_dict())
    return out_dir / "resnet.pth"
