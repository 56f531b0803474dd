"""The FreeSeg model: mask proposal network + task-aware text classifier around a frozen CLIP.

Paper, section 3 (figure 2): a Mask2Former-style network proposes Q masks with one embedding
each; the embeddings are classified by cosine similarity against text features of the class
prompts of the *current task* (section 3.2), after the pixel features have attended to those
same text features (semantic context interaction, section 3.3).

    images (B, 3, H, W) 0-255
      -> normalise -> backbone -> pixel decoder           `extract`  (task independent)
      -> interaction with [text; no-object] (K + 1, E)     \
      -> transformer decoder -> pred_embeds, pred_masks     > `decode`  (per task)
      -> pred_logits = 100 * cos(pred_embeds, [text; no-object])  /

Facts from the official code (bytedance/FreeSeg):
  - the classifier's text matrix is the K class features followed by the L2-normalised learned
    `non_object_embedding` (1, E), initialised N(0, text_width^-0.5)
    (clip_adapter/adapter.py, `MaskFormerClipAdapter.__init__` / `get_text_features`);
  - the logit temperature is 100 (`ClipAdapter.get_sim_logits`), applied to the top-level and
    every auxiliary output, with the query embeddings L2-normalised (open_vocabulary_model.py);
  - the same (K + 1)-row text matrix is what the interaction attends to
    (heads/mask_former_interaction_head.py passes `text_features` from the adapter);
  - one interaction module serves the three multi-scale maps and the mask features.

Deliberate differences: `forward` returns the same output dict in training and evaluation (the
criterion and post-processing are separate objects, inference.py drives evaluation); the image
normalisation pads to a multiple of `size_divisibility` with zeros after normalising, as
detectron2's ImageList does, and reports the unpadded size.
Extension point: an optional `mask_refiner` module (FreeSeg has none; the toy world's stride-2
masks, freeseg/extensions.py) reads the image once (`read_image`) and turns the mask features
into finer ones before the decoder.
Axis legend: B batch, Q queries, K classes, E embedding dim, H W spatial.
"""

import torch
import torch.nn.functional as F
from torch import nn

from freeseg import extensions
from freeseg.config import Config
from freeseg.modeling.backbone import build_backbone
from freeseg.modeling.interaction import SemanticContextInteraction
from freeseg.modeling.prompts import build_prompts


class FreeSeg(nn.Module):
    """See the module docstring.

    Output of `decode` / `forward` (the same in train and eval):
        {"pred_logits": (B, Q, K + 1) scaled cosine similarities, last column = no object,
         "pred_masks": (B, Q, H/4, W/4) mask logits (at the `mask_refiner`'s stride if any),
         "pred_embeds": (B, Q, E) raw query embeddings,
         "aux_outputs": [{"pred_logits", "pred_masks", "pred_embeds"}, ...] earlier layers}
    """

    def __init__(self, backbone: nn.Module, pixel_decoder: nn.Module, interaction: SemanticContextInteraction | None,
                 decoder: nn.Module, prompt_learner: nn.Module, clip_model: nn.Module,
                 pixel_mean: tuple[float, ...] = (123.675, 116.280, 103.530),
                 pixel_std: tuple[float, ...] = (58.395, 57.120, 57.375), logit_scale: float = 100.0,
                 size_divisibility: int = 32, trainable_prompts: bool = False, mask_refiner: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.mask_refiner = mask_refiner  # registered here: its parameters follow the pixel decoder's
        self.interaction = interaction
        self.decoder = decoder
        self.prompt_learner = prompt_learner
        self.clip_model = clip_model
        for p in clip_model.parameters():
            p.requires_grad_(False)
        self.logit_scale = logit_scale
        self.size_divisibility = size_divisibility
        text_width = clip_model.token_embedding.weight.shape[1]
        self.non_object_embedding = nn.Parameter(torch.randn(1, clip_model.embed_dim) * text_width ** -0.5)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        if not trainable_prompts:
            self.freeze_prompts()

    def freeze_prompts(self) -> None:
        """All-task stage (paper, section 3.4): the prompts learned in the prompt stage stay fixed."""
        for p in self.prompt_learner.parameters():
            p.requires_grad_(False)

    @property
    def prompts_trainable(self) -> bool:
        return any(p.requires_grad for p in self.prompt_learner.parameters())

    def train(self, mode: bool = True) -> "FreeSeg":
        super().train(mode)
        self.clip_model.eval()  # frozen CLIP: no dropout, whatever the mode of the rest
        return self

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) -> (H', W'), rounded up to a multiple of `size_divisibility`: the size `extract`
        pads its input to, so mask logits at stride 4 cover (H'/4, W'/4) and training targets must
        be padded to (H', W') to line up with them (train.py)."""
        d = self.size_divisibility
        return size[0] + (-size[0]) % d, size[1] + (-size[1]) % d

    def extract(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W) float 0-255 -> {"mask_features": (B, C, H'/4, W'/4),
        "multi_scale": 3 x (B, C, h_l, w_l) lowest resolution first, "image_size": (H, W)}, where
        H', W' are H, W padded up to a multiple of `size_divisibility`; with a `mask_refiner`
        also "refiner_input", what it read from the padded, normalised image."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FreeSeg.extract: images must be (B, 3, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        x = (images.float() - self.pixel_mean) / self.pixel_std
        Hp, Wp = self.padded_size((H, W))
        x = F.pad(x, (0, Wp - W, 0, Hp - H))  # (B, 3, H', W'), zeros = the mean colour
        mask_features, multi_scale = self.pixel_decoder(self.backbone(x))
        out = {"mask_features": mask_features, "multi_scale": list(multi_scale), "image_size": (H, W)}
        if self.mask_refiner is not None:  # once per image; decode refines once per task
            out["refiner_input"] = self.mask_refiner.read_image(x)
        return out

    def text_features(self, class_names: list[str], task: str | None) -> torch.Tensor:
        """The class prompts' CLIP text features (K, E), L2-normalised. No graph is kept when the
        prompts are frozen (the all-task stage), which saves the text tower's activations."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.prompts_trainable):
            return self.prompt_learner(class_names, task)

    def classifier_weights(self, text_features: torch.Tensor) -> torch.Tensor:
        """[text; no-object] (K + 1, E), every row L2-normalised."""
        return torch.cat([text_features, F.normalize(self.non_object_embedding, dim=-1)], dim=0)

    def decode(self, features: dict, text_features: torch.Tensor) -> dict:
        """features from `extract`, text_features (K, E) L2-normalised -> output dict (class docstring)."""
        weights = self.classifier_weights(text_features)  # (K + 1, E)
        multi_scale, mask_features = features["multi_scale"], features["mask_features"]
        if self.interaction is not None:
            *multi_scale, mask_features = self.interaction.forward_pyramid(multi_scale + [mask_features], weights)
        if self.mask_refiner is not None:  # after the interaction, which so keeps to stride 4
            mask_features = self.mask_refiner(mask_features, features["refiner_input"])
        out = self.decoder(multi_scale, mask_features)
        for pred in [out] + out["aux_outputs"]:
            embeds = F.normalize(pred["pred_embeds"], dim=-1)  # (B, Q, E)
            pred["pred_logits"] = self.logit_scale * embeds @ weights.t()  # (B, Q, K + 1)
        return out

    def forward(self, images: torch.Tensor, class_names: list[str], task: str,
                text_features: torch.Tensor | None = None) -> dict:
        """`text_features`: the prompts' features of `class_names` and `task` if the caller
        already has them (frozen prompts: the all-task stage computes them once per task)."""
        if text_features is None:
            text_features = self.text_features(class_names, task)
        return self.decode(self.extract(images), text_features)


def build_freeseg(cfg: Config, clip_model: nn.Module, tokenizer) -> FreeSeg:
    """The full model of `cfg.model` around an already built CLIP (freeseg.clip.load / build_model).
    The two builders from freeseg/extensions.py give the paper's pixel decoder and transformer
    decoder, and no mask refiner, unless `cfg.extensions` switches the toy world's on."""
    m = cfg.model
    backbone = build_backbone(m.backbone)
    pixel_decoder, mask_refiner = extensions.build_pixel_decoder(cfg, backbone.out_channels, backbone.out_strides)
    embed_dim = clip_model.embed_dim
    decoder = extensions.build_transformer_decoder(cfg, embed_dim)
    interaction = None
    if m.interaction.enabled:
        if m.pixel_decoder.conv_dim != m.pixel_decoder.mask_dim:
            raise ValueError("model.interaction needs model.pixel_decoder.conv_dim == mask_dim: one module "
                             f"serves both (got {m.pixel_decoder.conv_dim} and {m.pixel_decoder.mask_dim})")
        interaction = SemanticContextInteraction(dim=m.pixel_decoder.conv_dim, text_dim=embed_dim,
                                                 attn_dim=m.interaction.attn_dim, num_heads=m.interaction.num_heads,
                                                 layer_scale_init=m.interaction.layer_scale_init,
                                                 dropout=m.interaction.dropout)
    model = FreeSeg(backbone=backbone, pixel_decoder=pixel_decoder, interaction=interaction, decoder=decoder,
                    prompt_learner=build_prompts(m.prompt, clip_model, tokenizer), clip_model=clip_model,
                    pixel_mean=tuple(m.pixel_mean), pixel_std=tuple(m.pixel_std), logit_scale=m.logit_scale,
                    size_divisibility=m.size_divisibility, mask_refiner=mask_refiner)
    # Toy checkpoints that name the refiner's layers under the pixel decoder load too.
    model.register_load_state_dict_pre_hook(extensions.rename_old_keys)
    return model
