"""Pixel decoder: a multi-scale deformable-attention encoder over res3..res5 plus an FPN step to res2.

Mask2Former (Cheng et al., CVPR 2022, section 4 "pixel decoder") and FreeSeg (section 3.2) use
the encoder of Deformable DETR (Zhu et al., ICLR 2021, section 4.1): every pixel of the three
coarse levels (strides 32, 16, 8) attends to P learned sampling points per head on each level,
so information flows across scales at a cost linear in the number of pixels. Then one FPN
step (lateral 1x1 conv on res2 + upsampled stride-8 output, 3x3 conv) gives the stride-4 map
from which a 1x1 conv makes the per-pixel mask features.

Shapes (axis legend: B batch, C channels, S flattened tokens of all levels, M heads, D head
dim, L levels, P points, H W spatial):
    forward({"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)})
      -> mask_features (B, mask_dim, H/4, W/4),
         multi_scale [(B, C, H/32, W/32), (B, C, H/16, W/16), (B, C, H/8, W/8)]  (lowest res first)

Parameter names follow Mask2Former's `MSDeformAttnPixelDecoder` except two spots the official
converter (`checkpoint_official.py`) renames: `transformer.layers.N` (official:
`transformer.encoder.layers.N`) and the FPN convs as `nn.Sequential`s (`adapter_1.0` / `adapter_1.1`;
official: `adapter_1` / `adapter_1.norm`).

Deliberate differences from the official code: no padding masks / valid ratios (FreeSeg never
pads inside a batch: LSJ crops are square, test images run one at a time), so reference points
are plain pixel centres; exactly one FPN level (res2), which is what the fixed res3..res5 encoder
input implies; the feed-forward width comes from the config instead of a hard-coded 1024.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeseg.config import PixelDecoderConfig
from freeseg.modeling.position_encoding import PositionEmbeddingSine
from freeseg.ops import ms_deform_attn

ENCODER_LEVELS = ("res5", "res4", "res3")  # lowest resolution first, as the official input_proj


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR, Eq. 3).

    forward(query (B, Lq, C), reference_points (B, Lq, L, 2) in [0, 1] (x, y), value (B, S, C),
            spatial_shapes (L, 2) long (H, W), level_start_index (L,)) -> (B, Lq, C)

    Each head predicts, from its query, P offsets per level (in pixels of that level) around
    the reference point and L * P attention weights (softmax over all L * P points).
    """

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MSDeformAttn: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: at the start every head looks in its own direction
        (head m along angle 2*pi*m/M), its point p at distance p+1 pixels on every level, and
        all points are weighted equally (zero attention logits)."""
        M, L, P = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (M, 2)
        grid = grid / grid.abs().max(-1, keepdim=True).values  # onto the square: the nearest pixel
        grid = grid[:, None, None, :] * torch.arange(1, P + 1, dtype=torch.float32)[None, None, :, None]  # (M, 1, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(M, L, P, 2).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor
    ) -> Tensor:
        B, Lq, C = query.shape
        S = value.shape[1]
        M, L, P = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(B, S, M, C // M)  # (B, S, M, D)
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2)  # (B, Lq, M, L, P, 2) in pixels
        weights = self.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)
        # Offsets are in pixels of each level; divide by (W, H) to move in normalised coordinates.
        normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (W, H)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights, backend="auto")  # (B, Lq, C)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Self deformable attention, then a ReLU FFN; both residual with post-LayerNorm."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, shapes: Tensor, starts: Tensor) -> Tensor:
        # The position enters the queries (where to look, with which weights) but not the values.
        x = self.norm1(x + self.dropout(self.self_attn(x + pos, reference_points, x, shapes, starts)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ffn))  # (B, S, C)


class DeformableEncoder(nn.Module):
    """Flattens L levels into one token sequence and runs the encoder layers over it.

    forward(srcs: list of L (B, C, H_l, W_l), pos: same shapes) -> list of L (B, C, H_l, W_l)
    """

    def __init__(self, dim: int, num_layers: int, ffn_dim: int, dropout: float, num_levels: int,
                 num_heads: int, num_points: int):
        super().__init__()
        # One learned vector per level tells tokens of different levels apart (the sine
        # encoding alone is identical on every level, being normalised to the map size).
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, ffn_dim, dropout, num_levels, num_heads, num_points) for _ in range(num_layers)
        )
        for p in self.layers.parameters():  # Mask2Former: Xavier for every matrix, then MSDeformAttn's own init
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.layers:
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
        """Pixel centres ((i + 0.5) / W, (j + 0.5) / H) of every token of every level: (S, 2) as (x, y)."""
        points = []
        for h, w in shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
            points.append(torch.stack((grid_x, grid_y), -1).flatten(0, 1))  # (H*W, 2)
        return torch.cat(points)  # (S, 2)

    def forward(self, srcs: list[Tensor], pos: list[Tensor]) -> list[Tensor]:
        B, C = srcs[0].shape[:2]
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        x = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, C)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(pos)], 1
        )  # (B, S, C)
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=x.device)  # (L, 2)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))  # (L,)
        # Without padding the reference point of a token is its own centre on every level.
        ref = self.reference_points(shapes, x.device).to(x.dtype)  # (S, 2)
        ref = ref[None, :, None, :].expand(B, -1, len(srcs), -1)  # (B, S, L, 2)
        for layer in self.layers:
            x = layer(x, pos_flat, ref, spatial_shapes, level_start_index)
        return [
            t.transpose(1, 2).reshape(B, C, h, w)  # (B, C, H_l, W_l)
            for t, (h, w) in zip(x.split(sizes.tolist(), dim=1), shapes)
        ]


class MSDeformAttnPixelDecoder(nn.Module):
    """See the module docstring. `in_channels` / `in_strides` are the backbone's dicts.

    `make_extra_layers`: called once every layer of this decoder exists and before its FPN convs
    get their initial values; a builder that adds layers of its own to the model (the toy world's,
    freeseg/extensions.py) makes them there, so that all random initial values are drawn in one
    fixed order. FreeSeg has none.
    """

    def __init__(
        self,
        in_channels: dict[str, int],
        in_strides: dict[str, int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_encoder_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        num_groups: int = 32,
        make_extra_layers: Callable[[], None] | None = None,
    ):
        super().__init__()
        expected = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        if {k: in_strides.get(k) for k in expected} != expected:
            raise ValueError(f"MSDeformAttnPixelDecoder: needs res2..res5 at strides 4..32, got strides {in_strides}")
        # 1x1 conv + GroupNorm brings each encoder level to conv_dim; index 0 is res5.
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], conv_dim, 1), nn.GroupNorm(num_groups, conv_dim))
            for name in ENCODER_LEVELS
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        self.transformer = DeformableEncoder(
            conv_dim, num_encoder_layers, ffn_dim, dropout, len(ENCODER_LEVELS), num_heads, num_points
        )
        # FPN step to stride 4 (no conv bias: the GroupNorm that follows would cancel it).
        self.adapter_1 = nn.Sequential(
            nn.Conv2d(in_channels["res2"], conv_dim, 1, bias=False), nn.GroupNorm(num_groups, conv_dim)
        )
        self.layer_1 = nn.Sequential(
            nn.Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False), nn.GroupNorm(num_groups, conv_dim), nn.ReLU()
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        if make_extra_layers is not None:
            make_extra_layers()
        for conv in (self.adapter_1[0], self.layer_1[0], self.mask_features):
            # detectron2's `c2_xavier_fill`: Caffe2's "Xavier" is He-uniform with a = 1.
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        # Mask2Former runs the pixel decoder in float32 even under mixed precision (its
        # deformable-attention kernel had no half path); kept, so AMP does not change this part.
        with torch.autocast(device_type=features["res2"].device.type, enabled=False):
            return self._forward(features)

    def _forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        srcs = [proj(features[name].float()) for proj, name in zip(self.input_proj, ENCODER_LEVELS)]
        pos = [self.pe_layer(s) for s in srcs]  # (B, C, H_l, W_l) each
        multi_scale = self.transformer(srcs, pos)  # [res5, res4, res3] levels, (B, C, H_l, W_l)
        lateral = self.adapter_1(features["res2"].float())  # (B, C, H/4, W/4)
        # Mask2Former upsamples bilinearly here (its comment says "nearest"; its code is bilinear).
        up = F.interpolate(multi_scale[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        fpn = self.layer_1(lateral + up)  # (B, C, H/4, W/4)
        return self.mask_features(fpn), multi_scale  # (B, mask_dim, H/4, W/4), 3 x (B, C, H_l, W_l)


def build_pixel_decoder(
    cfg: PixelDecoderConfig, in_channels: dict[str, int], in_strides: dict[str, int],
    make_extra_layers: Callable[[], None] | None = None,
) -> MSDeformAttnPixelDecoder:
    return MSDeformAttnPixelDecoder(
        in_channels=in_channels,
        in_strides=in_strides,
        conv_dim=cfg.conv_dim,
        mask_dim=cfg.mask_dim,
        num_encoder_layers=cfg.num_encoder_layers,
        num_heads=cfg.num_heads,
        num_points=cfg.num_points,
        ffn_dim=cfg.ffn_dim,
        dropout=cfg.dropout,
        num_groups=cfg.num_groups,
        make_extra_layers=make_extra_layers,
    )
