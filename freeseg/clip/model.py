"""CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021), written from scratch with OpenAI's state-dict names so that OpenAI's checkpoints load
with `strict=True` and no key remapping.

FreeSeg (paper, section 3) is built around a frozen CLIP ViT-B/16: the prompt learner runs CLIP's
text transformer on learned token *embeddings* (`encode_text_embeddings`), and the region
classifier runs CLIP's image tower on mask crops (`encode_image`).

Two image towers, chosen like OpenAI's `CLIP(...)` by the type of `vision_layers`:
- an int: a Vision Transformer (ViT-B/32, ViT-B/16, ViT-L/14);
- a tuple of four: the "modified ResNet" (RN50, RN101, RN50x4, ...): three-conv stem with an
  average pool, anti-aliased strides (average pool before the strided 1x1 conv), and an
  attention pool instead of the global average pool. The toy world trains a tiny one from scratch.

Differences from OpenAI's `clip/model.py` (same numbers, other code):
- batch-first everywhere; one attention module of our own (`MultiheadAttention`) that keeps the
  parameter names of `torch.nn.MultiheadAttention` (`in_proj_weight`, `in_proj_bias`,
  `out_proj`) and calls `F.scaled_dot_product_attention`;
- the causal text mask is `is_causal=True` rather than a stored -inf matrix;
- `build_model` always returns a float32 model (OpenAI casts to fp16); fp16 checkpoints are
  converted on load;
- `encode_text_embeddings` exposes the text tower after the token lookup (the prompt learner),
  and `encode_text_shared_prefix` runs it on sequences that share their first tokens once.

Axis legend: B batch, C channels, H W spatial, S flattened tokens, T text tokens, M heads,
D head dim, E joint embedding dim.
"""

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# Normalisation of the 0-1 RGB image CLIP was trained with (OpenAI, clip/clip.py, `_transform`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0-255 (any dtype) -> float, normalised as CLIP's image tower expects."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (fp16 LayerNorm loses precision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, S, C = x.shape
    return x.view(B, S, num_heads, C // num_heads).transpose(1, 2)  # (B, M, S, D)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, M, S, D = x.shape
    return x.transpose(1, 2).reshape(B, S, M * D)  # (B, S, C)


class MultiheadAttention(nn.Module):
    """Batch-first self-attention with `torch.nn.MultiheadAttention`'s parameter names.

    `in_proj_weight` (3C, C) stacks the query, key and value projections in that order, as in
    OpenAI's checkpoints. forward: x (B, S, C) -> (B, S, C).
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # torch.nn.MultiheadAttention's initialisation, which OpenAI's image transformer keeps.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, C) -> queries, keys, values, each split into heads (B, M, S, D)."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, S, C)
        return tuple(_split_heads(t, self.num_heads) for t in (q, k, v))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = self._project(x)  # (B, M, S, D)
        # is_causal: token t attends to tokens <= t (OpenAI: a -inf matrix above the diagonal).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, M, S, D)
        return self.out_proj(_merge_heads(y))

    def forward_shared_prefix(self, head: torch.Tensor, tails: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal self-attention over K sequences that begin with the same P tokens.

        head (1, P, C) the shared tokens, tails (K, T, C) each sequence's own tokens -> (head out
        (1, P, C), tails out (K, T, C)): what `forward(cat(head, tails[k]), causal=True)` gives
        for every k. Causally, the head never sees a tail, so it is attended once; tail token t
        sees the whole head and tail tokens up to t (a prefix cache, as in text generation).
        """
        (K, T, _), P = tails.shape, head.shape[1]
        qh, kh, vh = self._project(head)  # (1, M, P, D)
        qt, kt, vt = self._project(tails)  # (K, M, T, D)
        yh = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)  # (1, M, P, D)
        k = torch.cat([kh.expand(K, -1, -1, -1), kt], dim=2)  # (K, M, P + T, D)
        v = torch.cat([vh.expand(K, -1, -1, -1), vt], dim=2)
        sees = torch.ones(T, P + T, dtype=torch.bool, device=tails.device).tril(diagonal=P)  # (T, P + T)
        yt = F.scaled_dot_product_attention(qt, k, v, attn_mask=sees)  # (K, M, T, D)
        return self.out_proj(_merge_heads(yh)), self.out_proj(_merge_heads(yt))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); MLP ratio 4."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=self.causal)
        return x + self.mlp(self.ln_2(x))

    def forward_shared_prefix(self, head: torch.Tensor, tails: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal block over K sequences that begin with the same tokens (see
        `MultiheadAttention.forward_shared_prefix`): head (1, P, C), tails (K, T, C) -> the same shapes."""
        attn_head, attn_tails = self.attn.forward_shared_prefix(self.ln_1(head), self.ln_1(tails))
        head, tails = head + attn_head, tails + attn_tails
        return head + self.mlp(self.ln_2(head)), tails + self.mlp(self.ln_2(tails))


class Transformer(nn.Module):
    """A stack of `layers` residual attention blocks; x (B, S, C) -> (B, S, C)."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """ViT image tower: patchify, [class] token, transformer, LayerNorm on the class token, project.

    forward: images (B, 3, R, R) -> (B, E).
    """

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, S, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+S, C)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, E)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1; expansion 4) with anti-aliased striding: every conv has
    stride 1 and an average pool of size `stride` does the downsampling, on both branches."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            # The key "-1" is OpenAI's: the pool has no parameters, so the checkpoint's
            # downsample.0 (conv) and downsample.1 (bn) keep their indices.
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return self.relu3(y + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean of the feature map, as a query, attends over [mean; map].

    forward: (B, C, H, W) with H = W = `spatial_dim` -> (B, output_dim).
    """

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, S, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1+S, C)
        x = x + self.positional_embedding.to(x.dtype)
        q = _split_heads(self.q_proj(x[:, :1]), self.num_heads)  # (B, M, 1, D)
        k = _split_heads(self.k_proj(x), self.num_heads)  # (B, M, 1+S, D)
        v = _split_heads(self.v_proj(x), self.num_heads)  # (B, M, 1+S, D)
        y = _merge_heads(F.scaled_dot_product_attention(q, k, v))  # (B, 1, C)
        return self.c_proj(y[:, 0])  # (B, output_dim)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet image tower; forward: images (B, 3, R, R) -> (B, E). The total stride is
    32 (stem 4, then layer2..4), so the attention pool sees an (R/32 x R/32) grid."""

    def __init__(self, layers: tuple[int, ...], output_dim: int, heads: int, input_resolution: int = 224,
                 width: int = 64):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        # Stem: three 3x3 convs (the first with stride 2) and a 2x2 average pool: stride 4.
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = width * 2 ** i
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        # layer4 outputs width * 8 * 4 = width * 32 channels.
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))  # (B, width, R/4, R/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 width, R/32, R/32)
        return self.attnpool(x)


class CLIP(nn.Module):
    """Image tower + causal text transformer + projections into a joint E-dim space.

    The signature is OpenAI's: `vision_layers` an int builds a ViT (heads = vision_width / 64),
    a tuple of four builds the modified ResNet (heads = 32 vision_width / 64, one per 64 channels
    of the attention pool).
    """

    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int | tuple[int, ...],
                 vision_width: int, vision_patch_size: int | None, context_length: int, vocab_size: int,
                 transformer_width: int, transformer_heads: int, transformer_layers: int):
        super().__init__()
        # max(1, ...): towers narrower than 64 channels (the toy world's) get one head, not zero.
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(layers=tuple(vision_layers), output_dim=embed_dim,
                                         heads=max(1, vision_width * 32 // 64),
                                         input_resolution=image_resolution, width=vision_width)
        else:
            self.visual = VisionTransformer(input_resolution=image_resolution, patch_size=vision_patch_size,
                                            width=vision_width, layers=vision_layers,
                                            heads=max(1, vision_width // 64), output_dim=embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        # Learned temperature, initialised at 1/0.07 (paper, section 2.5).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation (clip/model.py, `initialize_parameters`), so that a CLIP trained
        from scratch (the toy world) starts where OpenAI's did."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features ** -0.5
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(proj.weight, std=std)
            # Zero-initialised last BatchNorm of each residual branch: every block starts as the
            # identity (Goyal et al. 2017), which stabilises early training.
            for name, param in self.visual.named_parameters():
                if name.startswith("layer") and name.endswith("bn3.weight"):
                    nn.init.zeros_(param)
        width, layers = self.transformer.width, self.transformer.layers
        # GPT-2 style: output projections of the residual branches scaled by 1/sqrt(2 layers).
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def embed_dim(self) -> int:
        return self.text_projection.shape[1]

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def input_resolution(self) -> int:
        return self.visual.input_resolution

    @property
    def vocab_size(self) -> int:
        return self.token_embedding.num_embeddings

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, R, R), CLIP-normalised -> unnormalised features (B, E)."""
        return self.visual(images.to(self.dtype))

    def encode_text(self, tokens: torch.Tensor, length_groups: int = 1) -> torch.Tensor:
        """tokens (B, T) with T <= context_length -> unnormalised features (B, E).

        The feature is read at the end-of-text token, the largest id of the vocabulary, hence argmax.
        Columns after the last end-of-text token of the batch are dropped first: attention is
        causal, so no token can see them, and the result is the same (bit for bit in our tests)
        for a fraction of the work (a 77-token context mostly holds padding).
        With `length_groups` > 1 the texts are sorted by length and encoded in that many groups,
        each cut to its own longest text: the same features up to float rounding (about 1e-6).
        On a toy CLIP batch of 64 captions (mean 9.5 tokens, longest 15-19) two groups took the
        text tower's forward and backward from 65 to 40 ms on this project's 2-core machine.
        """
        if length_groups > 1:
            order = tokens.argmax(dim=-1).argsort(stable=True)  # by end-of-text position
            features = torch.cat([self.encode_text(tokens[group]) for group in order.tensor_split(length_groups)])
            return features[order.argsort()]
        eot_index = tokens.argmax(dim=-1)
        tokens = tokens[:, :int(eot_index.max()) + 1] if len(tokens) else tokens
        return self.encode_text_embeddings(self.token_embedding(tokens), eot_index)

    def encode_text_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """The text tower after the token lookup: x (B, T, C) token embeddings (no positional
        embedding yet), eot_index (B,) position of each sequence's end-of-text token -> (B, E).

        The prompt learner (FreeSeg, section 3.2) feeds learned vectors through this path.
        """
        B, T, C = x.shape
        x = x.to(self.dtype) + self.positional_embedding[:T].to(self.dtype)  # (B, T, C)
        x = self.ln_final(self.transformer(x))  # (B, T, C)
        x = x[torch.arange(B, device=x.device), eot_index]  # (B, C)
        return x @ self.text_projection  # (B, E)

    def encode_text_shared_prefix(self, head: torch.Tensor, tails: torch.Tensor,
                                  eot_index: torch.Tensor) -> torch.Tensor:
        """`encode_text_embeddings` for K sequences that all begin with the same P embeddings:
        head (P, C), tails (K, T, C), eot_index (K,) counted from the start of the whole
        sequence (so >= P) -> (K, E), the features of the sequences cat(head, tails[k]).

        The prompt learner's sequences share their task words, task vectors, start token and class
        context; only the class name, "." and end token differ. The causal tower computes the
        shared part once (up to float rounding, the same features): on the toy preset's 35 prompts
        (10 shared tokens of 14) the forward and backward pass took 11-12 ms instead of 21-23 ms
        on this project's 2-core machine.
        """
        P, (K, T, _) = head.shape[0], tails.shape
        if P == 0:
            return self.encode_text_embeddings(tails, eot_index)
        if bool((eot_index < P).any()):
            raise ValueError(f"encode_text_shared_prefix: an end-of-text index is inside the {P} shared tokens")
        positions = self.positional_embedding.to(self.dtype)
        head = (head.to(self.dtype) + positions[:P])[None]  # (1, P, C)
        tails = tails.to(self.dtype) + positions[P:P + T]  # (K, T, C)
        for block in self.transformer.resblocks:
            head, tails = block.forward_shared_prefix(head, tails)
        x = self.ln_final(tails[torch.arange(K, device=tails.device), eot_index - P])  # (K, C)
        return x @ self.text_projection  # (K, E)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                length_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities: (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img))."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens, length_groups), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


# Keys every CLIP state dict has, whatever its image tower.
_REQUIRED_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
                  "logit_scale", "visual.conv1.weight")
# The image tower is told apart by one key: a ViT has `visual.proj`, a ResNet an attention pool.
_VIT_KEY, _RESNET_KEY = "visual.proj", "visual.attnpool.positional_embedding"
# Non-tensor attributes that OpenAI's TorchScript archives carry in their state dict
# (OpenAI's build_model deletes them as well).
TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def missing_clip_keys(state_dict: dict) -> list[str]:
    """The keys that keep `state_dict` from being a CLIP state dict (empty if it is one)."""
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if _VIT_KEY not in state_dict and _RESNET_KEY not in state_dict:
        missing.append(f"{_VIT_KEY} or {_RESNET_KEY}")
    return missing


def _count_blocks(state_dict: dict, prefix: str) -> int:
    """Number of distinct block indices i among the keys `prefix.i.*`."""
    return len({k[len(prefix):].split(".")[1] for k in state_dict if k.startswith(prefix + ".")})


def build_model(state_dict: dict, transformer_heads: int | None = None) -> CLIP:
    """Build a CLIP whose every hyper-parameter is inferred from the tensor shapes, load the
    weights strictly and return it in eval mode, float32 (fp16 checkpoints are converted).

    `transformer_heads` is the one number shapes cannot tell; OpenAI's models all use one head
    per 64 channels (the default); a CLIP trained with another head count must say it.
    """
    missing = missing_clip_keys(state_dict)
    if missing:
        raise ValueError(f"not a CLIP state dict: missing keys {missing}")
    state_dict = {k: v for k, v in state_dict.items() if k not in TORCHSCRIPT_EXTRA_KEYS}
    if _VIT_KEY in state_dict:
        vision_width, _, vision_patch_size, _ = state_dict["visual.conv1.weight"].shape
        vision_layers = _count_blocks(state_dict, "visual.transformer.resblocks")
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        image_resolution = vision_patch_size * grid
    else:
        vision_layers = tuple(_count_blocks(state_dict, f"visual.layer{i}") for i in range(1, 5))
        vision_width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        vision_patch_size = None
        grid = round((state_dict[_RESNET_KEY].shape[0] - 1) ** 0.5)
        image_resolution = 32 * grid  # total stride of the ResNet
    width = state_dict["ln_final.weight"].shape[0]
    model = CLIP(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=image_resolution,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=vision_patch_size,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=width,
        transformer_heads=transformer_heads or width // 64,
        transformer_layers=_count_blocks(state_dict, "transformer.resblocks"),
    )
    # load_state_dict copies into the float32 parameters, which converts fp16 tensors.
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
