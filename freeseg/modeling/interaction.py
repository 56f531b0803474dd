"""Semantic context interaction: pixel features attend to the task's class text embeddings.

Paper, section 3.3 ("semantic context interaction"): before the transformer decoder, every
feature map of the pixel decoder is enriched with the text embeddings of the current task's
class prompts through cross-attention, pixels as queries and texts as keys/values.

Facts from the official code (bytedance/FreeSeg, mask2former/modeling/heads/module.py,
`ContextInteraction` and `MultiHeadAttention`; shapes from tests/data/official_freeseg_r101c_keys.tsv):
  - ONE module (`sem_seg_head.interaction`) is shared by the three multi-scale features and the
    mask features (mask_former_interaction_head.py applies it to all four in a loop);
  - pre-LayerNorm on both sides (`layer_norm_q_1` (256), `layer_norm_k_1` (512)), q/k/v
    projections to 2048 with 8 heads, `out_proj` 2048 -> 256, xavier-uniform weights and zero
    biases, dropout 0.1 on the attention probabilities, queries scaled by head_dim^-0.5;
  - layer scale `gamma` (256,) initialised at 0.1;
  - the residual is added to the *normalised* pixels: out = LN(x) + gamma * attn(LN(x), LN(t)),
    so the output is a normalised feature map plus a small text-conditioned correction;
  - the keys are the class text features followed by the no-object embedding (K + 1 rows,
    `MaskFormerClipAdapter.get_text_features`).
One quirk is reproduced in `forward_pyramid` only, because official weights were trained with
it: the loop re-applies `layer_norm_k_1` to the already-normalised keys before each of the four
feature maps, so the i-th map (0-based) sees the keys normalised i + 1 times. `forward` (one
map) normalises once.

Deliberate difference: none in the computation; the official attention-mask argument (always
None in FreeSeg) is left out.
"""

import torch
from torch import nn


class SemanticContextInteraction(nn.Module):
    """Cross-attention from pixels (queries) to class text embeddings (keys/values).

    forward(x (B, C, H, W), text (K, E)) -> (B, C, H, W)
    dim = C (pixel features), text_dim = E (CLIP embedding), attn_dim = M * D.
    """

    def __init__(self, dim: int = 256, text_dim: int = 512, attn_dim: int = 2048, num_heads: int = 8,
                 layer_scale_init: float = 0.1, dropout: float = 0.1):
        super().__init__()
        if attn_dim % num_heads:
            raise ValueError(f"SemanticContextInteraction: attn_dim {attn_dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = attn_dim // num_heads
        self.dropout = dropout
        self.layer_norm_q_1 = nn.LayerNorm(dim)
        self.layer_norm_k_1 = nn.LayerNorm(text_dim)
        self.attn = nn.Module()  # a namespace, so parameter names match the official `attn.q_proj...`
        self.attn.q_proj = nn.Linear(dim, attn_dim)
        self.attn.k_proj = nn.Linear(text_dim, attn_dim)
        self.attn.v_proj = nn.Linear(text_dim, attn_dim)
        self.attn.out_proj = nn.Linear(attn_dim, dim)
        # Layer scale (Touvron et al., CaiT): the text correction starts small, so training begins
        # close to the plain Mask2Former features.
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))
        for proj in (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _attend(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) raw pixels, keys (K, E) already normalised -> (B, C, H, W)."""
        B, C, H, W = x.shape
        M, D = self.num_heads, self.head_dim
        q = self.layer_norm_q_1(x.flatten(2).transpose(1, 2))  # (B, S, C), S = H * W
        k = self.attn.k_proj(keys).view(-1, M, D).transpose(0, 1)  # (M, K, D)
        v = self.attn.v_proj(keys).view(-1, M, D).transpose(0, 1)  # (M, K, D)
        qh = self.attn.q_proj(q).view(B, H * W, M, D).transpose(1, 2)  # (B, M, S, D)
        logits = torch.einsum("bmsd,mkd->bmsk", qh, k) * D ** -0.5  # (B, M, S, K)
        probs = nn.functional.dropout(logits.softmax(dim=-1), p=self.dropout, training=self.training)
        out = torch.einsum("bmsk,mkd->bmsd", probs, v)  # (B, M, S, D)
        out = self.attn.out_proj(out.transpose(1, 2).reshape(B, H * W, M * D))  # (B, S, C)
        out = q + self.gamma * out  # residual on the normalised pixels (official ContextInteraction)
        return out.transpose(1, 2).reshape(B, C, H, W)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if text.dim() != 2 or text.shape[-1] != self.layer_norm_k_1.normalized_shape[0]:
            raise ValueError(f"SemanticContextInteraction: text must be (K, {self.layer_norm_k_1.normalized_shape[0]}), "
                             f"got {tuple(text.shape)}")
        return self._attend(x, self.layer_norm_k_1(text))

    def forward_pyramid(self, features: list[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """The official order: features [f_0, f_1, ...] (each (B, C, H_i, W_i)), text (K, E);
        before map i the keys are normalised once more (see the module docstring)."""
        keys, out = text, []
        for x in features:
            keys = self.layer_norm_k_1(keys)
            out.append(self._attend(x, keys))
        return out
