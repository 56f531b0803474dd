"""Region classification with frozen CLIP and the seen/unseen geometric ensemble.

FreeSeg (paper, section 3.3 and eq. 6) classifies every mask proposal twice: once by the mask
classifier (query embedding vs. prompt text features) and once by CLIP itself, which sees the
image region cut out by the mask. The two distributions are combined geometrically, trusting
CLIP more for classes the segmenter never saw in training.

Region crop: the mask probabilities are binarised at `mask_threshold` (official MASK_THR 0.5),
then each binary mask's region is cut out as the official code does it (freeseg/crops.py: box
grown by `expand_ratio`, CLIP's mean colour outside the mask, bicubic resize).

Ensemble (official mask2former/open_vocabulary_model.py, `semantic_inference`): the mask
classifier's softmax over K+1 classes with the no-object column dropped (not renormalised),
CLIP's softmax(scale * cos) over the K classes only, and per class
    p = p_mask^(1 - w) * p_clip^w,   w = w_seen (0.2) for seen, w_unseen (0.8) for unseen classes.
The scale is the official constant 100 (clip_adapter/adapter.py, `get_sim_logits`) under
`inference.protocol = "official"`, and CLIP's own learned logit scale under "mask2former": the
same for OpenAI's models (their scale is capped at 100), but the toy world's tiny CLIP learned
about 15, and its cosines x 100 would be far too peaked.

Extension points (FreeSeg has neither; freeseg/extensions.py fills them for the toy world):
`prepare_masks`, a callable that turns the binary masks into the masks that are cropped, and
`encode`, the callable that turns crops into CLIP features (default `encode_crops`).

Deliberate differences from the official code:
  - under "mask2former", a query whose binary mask is empty gets a uniform CLIP row (1/K); the
    official code (and the "official" protocol) uses a row of ones. Both leave that query's
    ranking of classes to the mask classifier; ours keeps every row a probability distribution
    (the two differ by the factor K^-w, which is not the same for seen and unseen classes).
  - crops are encoded in chunks of `chunk` instead of all at once, to bound memory;
  - a binary mask that occurs more than once (within a task, or across the three tasks when
    inference.py stacks them) is cropped and encoded once (`shared_masks`): the same crop gives
    the same features, so the outputs do not change. With `share_iou` < 1 (fast mode) masks that
    nearly agree share one crop too, an approximation.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from freeseg.clip import CLIP_MEAN, normalize_pixels
from freeseg.crops import crop_masked_regions


def clip_logit_scale(clip_model: nn.Module) -> float:
    """CLIP's own learned similarity scale: 100 for OpenAI's models (the cap they reach, and the
    constant of the official adapter's `get_sim_logits`); about 15 for the toy world's tiny CLIP,
    whose cosines x 100 would be far too peaked."""
    return float(clip_model.logit_scale.exp())


# The official region classifier's similarity temperature, a constant whatever CLIP's own learned
# scale (clip_adapter/adapter.py, `ClipAdapter.get_sim_logits(..., temperature=100)`).
OFFICIAL_TEMPERATURE = 100.0


def encode_crops(clip_model: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """crops (n, 3, R, R) in CLIP's normalisation -> CLIP's image features (n, E), L2-normalised."""
    return F.normalize(clip_model.encode_image(crops).float(), dim=-1)


def shared_masks(binary: torch.Tensor, share_iou: float | None = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Which binary masks (N, H, W) can share one crop -> (first (U,) long: the index of each
    group's first mask, in order; inverse (N,) long: each mask's group, so binary[first][inverse]
    stands for binary). share_iou 1: identical masks only (exact); < 1: a mask joins the first
    earlier group whose first mask overlaps it with IoU >= share_iou; None: no sharing."""
    N = binary.shape[0]
    if share_iou is None or N == 0:
        return torch.arange(N, device=binary.device), torch.arange(N, device=binary.device)
    flat = binary.flatten(1)  # (N, H*W)
    inverse = torch.empty(N, dtype=torch.long)
    first: list[int] = []
    if share_iou >= 1:
        # Identical masks have equal areas: only masks of equal area are compared pixel by pixel
        # (one pass over the masks for the areas, instead of hashing every mask).
        groups_of_area: dict[int, list[int]] = {}
        areas = flat.view(torch.uint8).sum(1, dtype=torch.int32)  # (N,); bool's own sum is slower
        for n, area in enumerate(areas.tolist()):
            groups = groups_of_area.setdefault(area, [])
            match = next((g for g in groups if torch.equal(flat[first[g]], flat[n])), None)
            if match is None:
                match = len(first)
                groups.append(match)
                first.append(n)
            inverse[n] = match
    else:
        # IoU on every second row and column: a quarter of the work, and an approximation anyway.
        f = binary[:, ::2, ::2].flatten(1).float()  # (N, H*W / 4); counts below 2^24 are exact
        inter = f @ f.t()  # (N, N) pixels in common
        area = inter.diagonal()
        iou = (inter / (area[:, None] + area[None, :] - inter).clamp_min(1)).cpu().numpy()
        for n in range(N):
            match = np.flatnonzero(iou[n, first] >= share_iou)  # groups, in order
            if len(match):
                inverse[n] = int(match[0])
            else:
                inverse[n] = len(first)
                first.append(n)
    return torch.tensor(first, dtype=torch.long, device=binary.device), inverse.to(binary.device)


class RegionClassifier(nn.Module):
    """Classify mask proposals with frozen CLIP (paper, section 3.3).

    forward(image (3, H, W) 0-255, mask_probs (Q, H, W) in [0, 1], text_features (K, E) L2-normalised)
    -> probs (Q, K): softmax over K of scale * cos(CLIP region feature, text feature), scale =
    `temperature`, or CLIP's own logit scale when None (100 for OpenAI's models).
    Queries whose binarised mask is empty get the row `empty_fill`, or the uniform row 1/K when
    None (the official code: ones).
    `share_iou`: which masks share one crop (`shared_masks`): 1 identical ones (the default,
    exact), < 1 also those that nearly agree (fast mode), None none (every crop encoded).
    Extension points: `prepare_masks` (binary masks (n, H, W) bool -> the (n, H, W) bool masks to
    crop; None: the binary masks themselves, as FreeSeg) and `encode` ((clip_model, crops) ->
    (n, E) L2-normalised features; FreeSeg: `encode_crops`).
    """

    def __init__(self, clip_model: nn.Module, mask_threshold: float = 0.5, expand_ratio: float = 1.0,
                 chunk: int = 32, temperature: float | None = None, empty_fill: float | None = None,
                 prepare_masks: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 encode: Callable[[nn.Module, torch.Tensor], torch.Tensor] = encode_crops,
                 share_iou: float | None = 1.0):
        super().__init__()
        if chunk < 1:
            raise ValueError(f"RegionClassifier: chunk must be >= 1, got {chunk}")
        self.clip_model = clip_model
        self.mask_threshold = mask_threshold
        self.expand_ratio = expand_ratio
        self.chunk = chunk
        self.prepare_masks = prepare_masks
        self.encode = encode
        self.temperature = temperature
        self.empty_fill = empty_fill
        self.share_iou = share_iou
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)

    @torch.no_grad()
    def encode_regions(self, image: torch.Tensor, mask_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mask_probs (Q, H, W) probabilities, or binary masks -> (features (Q, E) L2-normalised,
        zero rows for empty masks; valid (Q,) bool)."""
        valid = (mask_probs > self.mask_threshold).flatten(1).any(dim=1)  # (Q,)
        features = image.new_zeros(mask_probs.shape[0], self.clip_model.embed_dim, dtype=torch.float32)
        binary = mask_probs[valid] > self.mask_threshold
        # Shared masks are found before `prepare_masks`: identical masks prepare identically.
        first, inverse = shared_masks(binary, self.share_iou)
        binary, unique = binary[first], image.new_zeros(len(first), self.clip_model.embed_dim, dtype=torch.float32)
        if self.prepare_masks is not None:
            binary = self.prepare_masks(binary)
        size = self.clip_model.input_resolution
        fill = self.clip_mean.flatten()
        for start in range(0, binary.shape[0], self.chunk):
            crops = crop_masked_regions(image, binary[start:start + self.chunk], size, self.expand_ratio, fill)
            crops = normalize_pixels(crops)  # CLIP's normalisation
            unique[start:start + self.chunk] = self.encode(self.clip_model, crops)  # (n, E)
        features[valid] = unique[inverse]
        return features, valid

    def classify(self, features: torch.Tensor, valid: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """features (Q, E), valid (Q,), text_features (K, E) -> probs (Q, K). Differentiable in
        `text_features`, which test-time prompt tuning needs."""
        if self.temperature is None:
            logits = clip_logit_scale(self.clip_model) * features @ text_features.t()  # (Q, K)
        else:  # scaled after the product, in the official order, so its logits match to the bit
            logits = self.temperature * (features @ text_features.t())  # (Q, K)
        probs = logits.softmax(dim=-1)
        fill = 1.0 / max(text_features.shape[0], 1) if self.empty_fill is None else self.empty_fill
        return torch.where(valid[:, None], probs, torch.full_like(probs, fill))

    def forward(self, image: torch.Tensor, mask_probs: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        features, valid = self.encode_regions(image, mask_probs)
        return self.classify(features, valid, text_features)


def geometric_ensemble(p_mask: torch.Tensor, p_clip: torch.Tensor, unseen: torch.Tensor,
                       w_seen: float, w_unseen: float) -> torch.Tensor:
    """Paper eq. 6: p_mask (Q, K), p_clip (Q, K), unseen (K,) bool -> (Q, K)
    p = p_mask^(1 - w) * p_clip^w with w = w_unseen on unseen classes and w_seen on seen ones.

    The official weight CLIP_ENSEMBLE_WEIGHT 0.8 is the exponent of CLIP for unseen classes and
    of the mask classifier for seen ones (open_vocabulary_model.py, `trained_mask` branch).
    """
    if p_mask.shape != p_clip.shape or p_mask.shape[-1] != unseen.shape[0]:
        raise ValueError(f"geometric_ensemble: shapes differ: p_mask {tuple(p_mask.shape)}, "
                         f"p_clip {tuple(p_clip.shape)}, unseen {tuple(unseen.shape)}")
    w = torch.where(unseen.bool().to(p_mask.device), w_unseen, w_seen).to(p_mask.dtype)  # (K,)
    return p_mask.pow(1 - w) * p_clip.pow(w)
