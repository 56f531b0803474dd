"""What the toy world adds to FreeSeg: mechanisms that neither the paper nor the official code has.

Every one is off in the paper's presets and on in `toy` (config section `extensions`,
`ExtensionsConfig`). Each fixed a failure measured on the toy data, where a tiny, frozen
backbone and a tiny CLIP read scenes of flat shapes; the runs are in docs/toy_experiments.md,
in the section each part below cites. They plug into FreeSeg at small, explicit points, and
with every extension off the model is the paper's:

  - `PositionalMaskDecoder` subclasses the transformer decoder and overrides its two hooks,
    `mask_logits` (a per-query disc, `coord_masks`) and `level_tokens` (pixel positions in the
    attended features, `coord_values`);
  - `StrideTwoRefiner` fills the model's `mask_refiner` slot (`fine_dim`): FreeSeg.extract lets it
    read the image, FreeSeg.decode runs it after the semantic context interaction, and its layers
    are made through the pixel decoder's `make_extra_layers`;
  - `build_pixel_decoder` and `build_transformer_decoder` are what `build_freeseg` calls;
  - `target_task` chooses whose targets a training iteration learns from (train.py);
  - `inference_hooks` fills the extension points of `predict` (inference.Hooks): the region
    classifier's `prepare_masks` (`largest_parts`) and `encode_crops` (`encode_with_mirror`),
    `extra_proposals` (`unclaimed_regions`) and `region_text` (`task_ensemble_text`).

Axis legend: B batch, Q queries, K classes, C channels, E embedding dim, H W spatial (of the
input image), S flattened tokens.
"""

import functools
from collections.abc import Callable

import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeseg.config import Config, ExtensionsConfig
from freeseg.modeling import pixel_decoder, region_classifier, transformer_decoder
from freeseg.modeling.targets import TASKS

# ---------------------------------------------------------------- positional terms of the decoder

# Length unit of the coordinates, in mask-feature cells (2 cells = 8 input pixels). The unit sets
# how fast AdamW can grow the disc terms: 2 cells beat 8, 1 and 0.5 on the toy world
# (docs/toy_experiments.md, section "Positional disc").
COORD_UNIT = 2.0


def cell_coords(size: tuple[int, int], mask_size: tuple[int, int], dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """(u, v), each (h, w): the centre of every cell of an (h, w) = `size` map laid over the
    (H/4, W/4) = `mask_size` mask-feature map, in mask-feature cells from that map's centre,
    divided by COORD_UNIT. On the mask-feature map itself u = (col - (W/4 - 1) / 2) / COORD_UNIT;
    a coarser level's cell sits at the mean of the mask-feature cells it covers."""
    (h, w), (H4, W4) = size, mask_size
    v = ((torch.arange(h, dtype=dtype, device=device) + 0.5) * (H4 / h) - 0.5 - (H4 - 1) / 2) / COORD_UNIT
    u = ((torch.arange(w, dtype=dtype, device=device) + 0.5) * (W4 / w) - 0.5 - (W4 - 1) / 2) / COORD_UNIT
    v, u = torch.meshgrid(v, u, indexing="ij")
    return u, v


class PositionalMaskDecoder(transformer_decoder.MaskedTransformerDecoder):
    """Mask2Former's decoder with two positional terms (toy world).

    `coord_masks` (docs/toy_experiments.md, section "Positional disc"): a linear layer turns each
    query into (a, b, c) and adds a*u + b*v + c*(u^2 + v^2) at pixel position (u, v) to its mask
    logits, a disc of any centre and radius. The mask features of two identical objects on a
    uniform background are identical, so a dot product with them alone draws both objects or
    neither; the disc lets a query keep one. (Mask features of a deep, fine-tuned ImageNet
    backbone carry position through zero padding, Islam et al., ICLR 2020; the toy world's tiny
    frozen backbone hardly does.) Relative-coordinate channels in CondInst (Tian et al., ECCV
    2020) and CoordConv in SOLO play the same role.

    `coord_values` (section "Pixel positions in the attended features"): to place its disc a
    query must know where its object is, and Mask2Former's cross-attention does not tell it:
    positions are added to the keys, never to the values (DETR), so a query that attends to one
    of two identical objects reads the same features whichever it picked. A linear function of
    each pixel's (u, v) is added to the tokens the queries attend to (keys and values alike), so
    the attended object's position reaches the query, and from there its disc.

    Both layers start at zero, so training starts from Mask2Former's decoder; they are made after
    every layer of the paper's decoder.
    """

    def __init__(self, *, coord_masks: bool, coord_values: bool, **kwargs):
        super().__init__(**kwargs)
        hidden_dim = self.query_feat.weight.shape[1]
        self.coord_embed = nn.Linear(hidden_dim, 3) if coord_masks else None
        self.coord_value = nn.Linear(2, hidden_dim) if coord_values else None
        for layer in (self.coord_embed, self.coord_value):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def mask_logits(self, x: Tensor, mask_features: Tensor) -> Tensor:
        """Mask2Former's logits (B, Q, H/4, W/4) plus each query's disc a*u + b*v + c*(u^2 + v^2);
        with c < 0 a disc around (-a/2c, -b/2c)."""
        masks = super().mask_logits(x, mask_features)
        if self.coord_embed is None:
            return masks
        size = tuple(mask_features.shape[-2:])
        u, v = cell_coords(size, size, x.dtype, x.device)
        coords = torch.stack([u, v, u * u + v * v])  # (3, H/4, W/4)
        return masks + torch.einsum("bqk,khw->bqhw", self.coord_embed(x), coords)

    def level_tokens(self, lvl: int, feat: Tensor, mask_size: tuple[int, int]) -> Tensor:
        """The paper's tokens (B, S_l, C) plus a linear function of every pixel's (u, v), in the
        disc's units."""
        src = super().level_tokens(lvl, feat, mask_size)
        if self.coord_value is None:
            return src
        u, v = cell_coords(tuple(feat.shape[-2:]), mask_size, src.dtype, src.device)
        return src + self.coord_value(torch.stack([u, v], -1).flatten(0, 1))  # + (S_l, C)


def build_transformer_decoder(cfg: Config, embed_dim: int) -> transformer_decoder.MaskedTransformerDecoder:
    """The decoder of `cfg.model.decoder`: Mask2Former's, or with `cfg.extensions.coord_masks` /
    `coord_values` the positional one."""
    ext, m = cfg.extensions, cfg.model
    args = (m.decoder, m.pixel_decoder.conv_dim, m.pixel_decoder.mask_dim, embed_dim)
    if not (ext.coord_masks or ext.coord_values):
        return transformer_decoder.build_transformer_decoder(*args)
    return transformer_decoder.build_transformer_decoder(*args, cls=PositionalMaskDecoder,
                                                         coord_masks=ext.coord_masks, coord_values=ext.coord_values)


# ---------------------------------------------------------------- stride-2 mask features


class StrideTwoRefiner(nn.Module):
    """Mask features at stride 2, from a small trainable path over the image (`fine_dim`).

    The toy backbone stays frozen (fine-tuning it wiped out its shape features), so without this
    the masks could only be drawn from frozen stride-4 features and were blurred at the outlines,
    which is where CLIP reads an object's shape (docs/toy_experiments.md, section "Stride-2 mask
    features"). Two convs read the image at stride 2; the stride-4 mask features are reduced to
    `fine_dim` channels, upsampled and added; one 3x3 conv and a 1x1 conv go back to `mask_dim`.
    Its weights are new, so no official checkpoint has them.

    read_image(images (B, 3, H, W) normalised) -> (B, fine_dim, H/2, W/2), once per image;
    forward(mask_features (B, mask_dim, H/4, W/4), that) -> (B, mask_dim, H/2, W/2), per task.

    Its convs keep PyTorch's default initial values until `reset_parameters` draws the final ones
    (build_pixel_decoder calls it).
    """

    def __init__(self, fine_dim: int, mask_dim: int, num_groups: int):
        super().__init__()
        groups = min(num_groups, fine_dim)
        self.image_path = nn.Sequential(
            nn.Conv2d(3, fine_dim, 3, stride=2, padding=1, bias=False), nn.GroupNorm(groups, fine_dim), nn.ReLU(),
            nn.Conv2d(fine_dim, fine_dim, 3, padding=1, bias=False), nn.GroupNorm(groups, fine_dim),
        )
        self.lateral = nn.Sequential(nn.Conv2d(mask_dim, fine_dim, 1, bias=False), nn.GroupNorm(groups, fine_dim))
        self.layer = nn.Sequential(
            nn.Conv2d(fine_dim, fine_dim, 3, padding=1, bias=False), nn.GroupNorm(groups, fine_dim), nn.ReLU()
        )
        self.mask_features = nn.Conv2d(fine_dim, mask_dim, 1)

    def reset_parameters(self) -> None:
        """detectron2's `c2_xavier_fill`, as the pixel decoder's FPN convs."""
        for conv in (self.image_path[0], self.image_path[3], self.lateral[0], self.layer[0], self.mask_features):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    # Both run in float32 under mixed precision, as the pixel decoder they extend.
    def read_image(self, images: Tensor) -> Tensor:
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.image_path(images.float())  # (B, fine_dim, H/2, W/2)

    def forward(self, mask_features: Tensor, image_features: Tensor) -> Tensor:
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            lateral = self.lateral(mask_features.float())  # (B, fine_dim, H/4, W/4)
            up = F.interpolate(lateral, size=image_features.shape[-2:], mode="bilinear", align_corners=False)
            return self.mask_features(self.layer(image_features + up))  # (B, mask_dim, H/2, W/2)


def build_pixel_decoder(cfg: Config, in_channels: dict[str, int], in_strides: dict[str, int]
                        ) -> tuple[pixel_decoder.MSDeformAttnPixelDecoder, StrideTwoRefiner | None]:
    """The pixel decoder of `cfg.model.pixel_decoder`, and the stride-2 refiner when
    `cfg.extensions.fine_dim` > 0 (else None).

    The refiner's layers are made inside the pixel decoder's construction, after its FPN layers
    and before their initialisation, and get their own initial values after it: one fixed order
    of random draws, which keeps the toy world's initial weights, and so its results, reproducible
    (tests/test_init_digests.py)."""
    ext, m = cfg.extensions, cfg.model.pixel_decoder
    made = []

    def make_refiner() -> None:
        made.append(StrideTwoRefiner(ext.fine_dim, m.mask_dim, m.num_groups))

    decoder = pixel_decoder.build_pixel_decoder(m, in_channels, in_strides, make_refiner if ext.fine_dim else None)
    for refiner in made:
        refiner.reset_parameters()
    return decoder, (made[0] if made else None)


# Toy checkpoints whose config has `fine_dim` under model.pixel_decoder (config.MOVED_KEYS) hold
# the refiner's weights under the pixel decoder: old key prefix -> new.
RENAMED_KEYS = {
    "pixel_decoder.image_path.": "mask_refiner.image_path.",
    "pixel_decoder.fine_lateral.": "mask_refiner.lateral.",
    "pixel_decoder.fine_layer.": "mask_refiner.layer.",
    "pixel_decoder.fine_mask_features.": "mask_refiner.mask_features.",
}


def rename_old_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """`load_state_dict` pre-hook of FreeSeg: moves the keys of RENAMED_KEYS to their new names."""
    for key in list(state_dict):
        for old, new in RENAMED_KEYS.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


# ---------------------------------------------------------------- semantic targets from segments


def target_task(task: str, ext: ExtensionsConfig) -> str:
    """Whose targets an all-task iteration of `task` learns from (`semantic_targets`): its own
    (FreeSeg), or with "segments" a semantic iteration takes the panoptic task's segments (things
    one mask per instance instead of one mask per class); its prompt stays semantic. A class
    mask asks the queries to cover two same-class things at once, which the positional disc
    exists to keep apart (docs/toy_experiments.md, "Semantic targets")."""
    if ext.semantic_targets not in ("classes", "segments"):
        raise ValueError(f"extensions.semantic_targets must be 'classes' or 'segments', got {ext.semantic_targets!r}")
    return "panoptic" if task == "semantic" and ext.semantic_targets == "segments" else task


# ---------------------------------------------------------------- inference


def largest_parts(masks: Tensor, erode: int = 0) -> Tensor:
    """masks (N, H, W) bool -> (N, H, W) bool: of each mask, the largest 4-connected part after
    eroding it by `erode` pixels (a (2 erode + 1)-pixel square). Erosion cuts thin bridges and
    spurs first; a mask that it would empty is taken as it is. Ties go to the part whose first
    pixel comes first in row-major order.

    The region classifier's `prepare_masks` with `clip_largest_part` (docs/toy_experiments.md,
    "What CLIP is shown"): stray pixels far from the object would stretch the crop's box and
    shrink the object in it."""
    if erode < 0:
        raise ValueError(f"largest_parts: erode must be >= 0, got {erode}")
    masks = masks.bool()
    if erode > 0 and len(masks):
        # Erosion is a max-pool of the complement; pixels beyond the border count as inside.
        eroded = -F.max_pool2d(-masks[:, None].float(), 2 * erode + 1, stride=1, padding=erode)[:, 0] > 0.5
        kept = eroded.flatten(1).any(dim=1)
        masks = torch.where(kept[:, None, None], eroded, masks)
    parts = []
    for mask in masks.cpu().numpy():
        labels, n = scipy.ndimage.label(mask)  # 4-connectivity
        if n > 1:
            sizes = torch.bincount(torch.from_numpy(labels).flatten(), minlength=n + 1)[1:]
            mask = labels == int(sizes.argmax()) + 1
        parts.append(torch.from_numpy(mask))
    return torch.stack(parts).to(masks.device) if parts else masks


def encode_with_mirror(clip_model: nn.Module, crops: Tensor) -> Tensor:
    """The region classifier's `encode` with `clip_flip`: the normalised mean of CLIP's features
    of each crop (n, 3, R, R) and of its mirror image (horizontal-flip test-time augmentation;
    docs/toy_experiments.md, "What CLIP is shown") -> (n, E)."""
    out = region_classifier.encode_crops(clip_model, crops)
    return F.normalize(out + region_classifier.encode_crops(clip_model, crops.flip(-1)), dim=-1)


def unclaimed_regions(masks: Tensor, objectness: Tensor, min_area: float) -> Tensor:
    """The parts of the image that no proposal claims, as extra proposals: masks (Q, H, W)
    probabilities, objectness (Q,) = 1 - p(no object) -> (n, H, W) float {0, 1}.

    A pixel is claimed when some query's objectness times its mask probability reaches 0.5;
    each 4-connected region of unclaimed pixels covering at least `min_area` of the image becomes
    a proposal. The proposal network is trained on seen classes only, and every pixel of an
    unseen class counts as background for every mask, so it may learn to leave a whole unseen
    region uncovered (on the toy world with `fine_dim`, the water); CLIP can still name such a
    region if it is proposed (docs/toy_experiments.md, "Unclaimed regions").
    """
    H, W = masks.shape[-2:]
    if len(masks):
        claimed = (masks * objectness[:, None, None]).amax(0) >= 0.5
    else:
        claimed = torch.zeros(H, W, dtype=torch.bool, device=masks.device)
    labels, n = scipy.ndimage.label((~claimed).cpu().numpy())  # 4-connectivity
    regions = torch.from_numpy(labels).to(masks.device)
    sizes = torch.bincount(regions.flatten(), minlength=n + 1)[1:]  # pixels of region 1..n
    keep = (torch.nonzero(sizes >= min_area * H * W).flatten() + 1).tolist()
    return torch.stack([regions == k for k in keep]).to(masks.dtype) if keep else masks.new_zeros(0, H, W)


def task_ensemble_text(text_of: Callable[[str], Tensor], task: str, text: Tensor) -> Tensor:
    """`region_text` with `clip_task_ensemble`: the normalised mean (K, E) of the three task
    prompts' text features, `text` for `task` and `text_of(t)` for the others (prompt ensembling,
    as CLIP's paper averages caption templates; CLIP names what a region is, whatever the task;
    docs/toy_experiments.md, "Task-prompt ensemble")."""
    texts = [text if t == task else text_of(t) for t in TASKS]
    return F.normalize(torch.stack(texts).sum(0), dim=-1)


def inference_hooks(ext: ExtensionsConfig):
    """The `inference.Hooks` that `predict` takes for the extensions `ext` switches on (all off:
    FreeSeg's inference)."""
    # Imported here: freeseg/modeling/freeseg.py imports this module, and inference.py imports it.
    from freeseg.modeling.inference import Hooks

    if ext.clip_erode < 0 or (ext.clip_erode > 0 and not ext.clip_largest_part):
        raise ValueError(f"extensions.clip_erode must be >= 0 and needs clip_largest_part, got {ext.clip_erode}")
    return Hooks(
        prepare_masks=functools.partial(largest_parts, erode=ext.clip_erode) if ext.clip_largest_part else None,
        encode_crops=encode_with_mirror if ext.clip_flip else region_classifier.encode_crops,
        extra_proposals=(functools.partial(unclaimed_regions, min_area=ext.unclaimed_min_area)
                         if ext.unclaimed_min_area > 0 else None),
        region_text=task_ensemble_text if ext.clip_task_ensemble else None,
    )


def predict_hooks(cfg):
    """Every extension point of `predict` that the Config `cfg` fills: the toy world's inference
    extensions (`inference_hooks`, cfg.extensions) and fast mode (freeseg/fast_inference.py,
    cfg.fast). All off: FreeSeg's inference."""
    from freeseg.fast_inference import fast_hooks

    return fast_hooks(cfg.fast, inference_hooks(cfg.extensions))
