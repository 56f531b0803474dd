"""Masked-attention transformer decoder (Mask2Former, Cheng et al., CVPR 2022, section 3.2).

Q learnable queries are refined layer by layer. Each layer does
  1. masked cross-attention to one level of the pixel decoder's multi-scale features
     (levels cycle 0, 1, 2, 0, ... = strides 32, 16, 8, ...): a query only sees the pixels
     its previous mask prediction covers (sigmoid >= 0.5), which Mask2Former shows converges
     faster and better than attending everywhere (section 3.2.1);
  2. self-attention among the queries;
  3. a feed-forward network;
each with a residual and (by default) post-LayerNorm. After the query initialisation and after
every layer, shared heads turn the (LayerNorm-ed) queries into
  - an embedding (class_embed MLP, E = CLIP's text dimension): FreeSeg (section 3.2) classifies
    it against the text embeddings of the class prompts instead of a fixed linear classifier;
  - a mask: mask_embed MLP dotted with every pixel of the stride-4 mask features.
Two small methods, `mask_logits` and `level_tokens`, are where a subclass can add terms of its
own (the toy world's positional terms, freeseg/extensions.py); here they are Mask2Former's.

Shapes (axis legend: B batch, Q queries, C channels, E embedding dim, M heads, S flattened
tokens, H W spatial):
    forward(multi_scale [3 x (B, C_in, H_l, W_l)], mask_features (B, mask_dim, H/4, W/4)) -> {
        "pred_embeds": (B, Q, E)          last layer, not normalised (FreeSeg does the cosine),
        "pred_masks":  (B, Q, H/4, W/4)   mask logits of the last layer,
        "aux_outputs": [{"pred_embeds", "pred_masks"}] x num_layers   (query init + layers 1..L-1)
    }

Parameter names are Mask2Former's / FreeSeg's `OpenTransformerPredictor`, so the official
checkpoint loads without renames. Deliberate differences from the official code: batch-first
tensors; the attention/FFN dropout comes from the config (the official layers hard-code 0.0,
the config default here); `num_layers` counts real layers (FreeSeg's predictor builds
DEC_LAYERS = 10 layers; Mask2Former's own decoder builds DEC_LAYERS - 1).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeseg.config import DecoderConfig
from freeseg.modeling.position_encoding import PositionEmbeddingSine

NUM_LEVELS = 3  # Mask2Former always attends to three scales (res5, res4, res3 levels)


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (not after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class AttentionLayer(nn.Module):
    """Residual multi-head attention with LayerNorm after (post-norm) or before (pre-norm).

    forward(x (B, Q, C), memory (B, S, C) or None for self-attention, pos (B, S, C) (for
            self-attention: query_pos again), query_pos (B, Q, C),
            mask (B*M, Q, S) bool or None, True = may not attend) -> (B, Q, C)
    Positions are added to queries and keys, never to values (DETR).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, pre_norm: bool, attn_name: str):
        super().__init__()
        # The attribute name differs between the self- and cross-attention layers in the
        # official checkpoint (`self_attn` / `multihead_attn`); keep it for loading.
        self.attn_name = attn_name
        self.add_module(attn_name, nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, memory: Tensor | None, pos: Tensor | None, query_pos: Tensor,
                mask: Tensor | None = None) -> Tensor:
        attn = getattr(self, self.attn_name)
        q = self.norm(x) if self.pre_norm else x
        kv = q if memory is None else memory  # self-attention reads the (normed) queries themselves
        k = kv if pos is None else kv + pos
        out = attn(q + query_pos, k, kv, attn_mask=mask, need_weights=False)[0]
        x = x + self.dropout(out)
        return x if self.pre_norm else self.norm(x)


class FFNLayer(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x) if self.pre_norm else x
        x = x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(h)))))
        return x if self.pre_norm else self.norm(x)


class MaskedTransformerDecoder(nn.Module):
    """See the module docstring.

    Args:
        in_channels: channels of the multi-scale features (the pixel decoder's conv_dim).
        hidden_dim: query width C. num_queries: Q. num_layers: decoder layers (not counting the
        query init). mask_dim: channels of the mask features. mask_mlp_layers: depth of mask_embed.
        embed_dim: E, the output of class_embed (CLIP's text width). class_mlp_hidden / class_mlp_layers:
        class_embed's hidden width and depth (official: 1024, 2 layers).
    """

    def __init__(
        self,
        in_channels: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_layers: int = 10,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        pre_norm: bool = False,
        mask_dim: int = 256,
        mask_mlp_layers: int = 3,
        embed_dim: int = 512,
        class_mlp_hidden: int = 1024,
        class_mlp_layers: int = 2,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.transformer_cross_attention_layers = nn.ModuleList(
            AttentionLayer(hidden_dim, num_heads, dropout, pre_norm, "multihead_attn") for _ in range(num_layers)
        )
        self.transformer_self_attention_layers = nn.ModuleList(
            AttentionLayer(hidden_dim, num_heads, dropout, pre_norm, "self_attn") for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, ffn_dim, dropout, pre_norm) for _ in range(num_layers)
        )
        for layers in (self.transformer_cross_attention_layers, self.transformer_self_attention_layers,
                       self.transformer_ffn_layers):
            for p in layers.parameters():  # Mask2Former: Xavier-uniform for every matrix
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # what each query starts as
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # its positional embedding
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(NUM_LEVELS):
            if in_channels == hidden_dim:
                self.input_proj.append(nn.Identity())
            else:
                conv = nn.Conv2d(in_channels, hidden_dim, 1)
                nn.init.kaiming_uniform_(conv.weight, a=1)  # detectron2's c2_xavier_fill
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
        self.class_embed = MLP(hidden_dim, class_mlp_hidden, embed_dim, class_mlp_layers)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, mask_mlp_layers)

    def mask_logits(self, x: Tensor, mask_features: Tensor) -> Tensor:
        """Normed queries (B, Q, C) and mask features (B, mask_dim, H/4, W/4) -> mask logits
        (B, Q, H/4, W/4): each query's mask embedding dotted with every pixel's features."""
        return torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)

    def level_tokens(self, lvl: int, feat: Tensor, mask_size: tuple[int, int]) -> Tensor:
        """Level `lvl` of the multi-scale features (B, C_in, h, w) -> the tokens (B, h*w, C) its
        cross-attention layers read (keys and values). `mask_size` (H/4, W/4) of the mask features
        is for subclasses that place the tokens on the mask grid."""
        return self.input_proj[lvl](feat).flatten(2).transpose(1, 2)  # (B, S_l, C)

    def prediction_heads(self, x: Tensor, mask_features: Tensor, attn_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, Q, C) -> embeds (B, Q, E), mask logits (B, Q, H/4, W/4) and the attention
        mask (B*M, Q, h*w) for the next layer's level of size `attn_size`."""
        x = self.decoder_norm(x)
        embeds = self.class_embed(x)  # (B, Q, E)
        masks = self.mask_logits(x, mask_features)  # (B, Q, H/4, W/4)
        # Masked attention: the mask is predicted at stride 4 and resized to the attended level;
        # pixels where it says "not this segment" (sigmoid < 0.5) are hidden from the query.
        small = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)  # (B, Q, h, w)
        hidden = small.sigmoid().flatten(2) < 0.5  # (B, Q, h*w)
        # A query whose mask is empty would attend to nothing (softmax of all -inf = NaN):
        # let it see the whole level instead, as Mask2Former does.
        hidden = hidden & ~hidden.all(-1, keepdim=True)
        attn_mask = hidden.repeat_interleave(self.num_heads, dim=0)  # (B*M, Q, h*w), batch-major like MHA
        return embeds, masks, attn_mask.detach()

    def forward(self, multi_scale: list[Tensor], mask_features: Tensor) -> dict:
        if len(multi_scale) != NUM_LEVELS:
            raise ValueError(f"MaskedTransformerDecoder: expects {NUM_LEVELS} feature levels, got {len(multi_scale)}")
        B, mask_size = mask_features.shape[0], tuple(mask_features.shape[-2:])
        sizes, srcs, pos = [], [], []
        for lvl, feat in enumerate(multi_scale):
            sizes.append(tuple(feat.shape[-2:]))
            pos.append(self.pe_layer(feat).flatten(2).transpose(1, 2))  # (B, S_l, C)
            srcs.append(self.level_tokens(lvl, feat, mask_size) + self.level_embed.weight[lvl])  # (B, S_l, C)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # (B, Q, C)
        x = self.query_feat.weight.unsqueeze(0).expand(B, -1, -1)  # (B, Q, C)

        embeds, masks, attn_mask = self.prediction_heads(x, mask_features, sizes[0])
        predictions = [{"pred_embeds": embeds, "pred_masks": masks}]
        for i in range(self.num_layers):
            lvl = i % NUM_LEVELS
            x = self.transformer_cross_attention_layers[i](x, srcs[lvl], pos[lvl], query_pos, attn_mask)
            x = self.transformer_self_attention_layers[i](x, None, query_pos, query_pos)
            x = self.transformer_ffn_layers[i](x)
            # The heads' attention mask is sized for the level the *next* layer attends to.
            embeds, masks, attn_mask = self.prediction_heads(x, mask_features, sizes[(i + 1) % NUM_LEVELS])
            predictions.append({"pred_embeds": embeds, "pred_masks": masks})
        return {**predictions[-1], "aux_outputs": predictions[:-1]}


def build_transformer_decoder(cfg: DecoderConfig, in_channels: int, mask_dim: int, embed_dim: int,
                              cls: type = MaskedTransformerDecoder, **extra) -> MaskedTransformerDecoder:
    """The decoder of `cfg`; `cls` and `extra` (its further arguments) build a subclass."""
    return cls(
        in_channels=in_channels,
        hidden_dim=cfg.hidden_dim,
        num_queries=cfg.num_queries,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        ffn_dim=cfg.ffn_dim,
        dropout=cfg.dropout,
        pre_norm=cfg.pre_norm,
        mask_dim=mask_dim,
        mask_mlp_layers=cfg.mask_mlp_layers,
        embed_dim=embed_dim,
        class_mlp_hidden=cfg.class_mlp_hidden,
        **extra,
    )
