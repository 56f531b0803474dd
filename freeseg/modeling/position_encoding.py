"""Sine position encoding of a 2-D feature map (DETR, Carion et al. 2020, section A.4).

Used by the pixel decoder's deformable encoder and by the transformer decoder's cross-attention
(Mask2Former, Cheng et al. 2022, section 3.2.1: "sinusoidal positional embedding").
Half of the channels encode the row (y), the other half the column (x); inside each half,
channel pair (2i, 2i+1) holds sin / cos of  pos / temperature^(2i / num_pos_feats).
Positions are normalised to (0, 2*pi] so that the code does not depend on the image size.

Same numbers as Mask2Former's `PositionEmbeddingSine(normalize=True)`; deliberate difference:
no padding mask argument, because nothing in FreeSeg passes one (Mask2Former "disables" it).
"""

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Parameter-free sine encoding: forward(x (B, C, H, W)) -> (B, 2 * num_pos_feats, H, W).

    Only the shape, device and dtype of `x` are used; channels [0, num_pos_feats) encode y,
    [num_pos_feats, 2 * num_pos_feats) encode x, as in DETR.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        # 1-based row / column index divided by the count, times 2*pi: the last row sits at 2*pi.
        # The 1e-6 is DETR's guard against dividing by zero, kept so the values match exactly.
        y = torch.arange(1, H + 1, dtype=torch.float32, device=x.device) / (H + 1e-6) * self.scale  # (H,)
        x_pos = torch.arange(1, W + 1, dtype=torch.float32, device=x.device) / (W + 1e-6) * self.scale  # (W,)
        # The frequency of a sin/cos pair: channel 2i and 2i+1 share temperature^(2i / n).
        idx = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / self.num_pos_feats)  # (n,)
        pos_y = self._interleave(y[:, None] / dim_t)  # (H, n)
        pos_x = self._interleave(x_pos[:, None] / dim_t)  # (W, n)
        pos = torch.cat(
            (pos_y[:, None, :].expand(H, W, -1), pos_x[None, :, :].expand(H, W, -1)), dim=-1
        )  # (H, W, 2n)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(B, -1, -1, -1).to(x.dtype)  # (B, 2n, H, W)

    @staticmethod
    def _interleave(angles: Tensor) -> Tensor:
        """(..., n) angles -> (..., n) with sin on even channels and cos on odd ones."""
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
