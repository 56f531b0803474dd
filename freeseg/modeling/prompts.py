"""Adaptive prompts: learned task and class context vectors fed through CLIP's text tower.

Paper, section 3.2 ("adaptive prompt learning"): the text embedding of class k for task t is
CLIP's text feature of a token sequence that mixes fixed word embeddings with learnable vectors.
The official code (bytedance/FreeSeg, mask2former/modeling/clip_adapter/text_prompt.py,
`LearnablePromptExtractor`) builds ONE sequence per (class, task), in this order:

    [task-name tokens][task vectors (8)][SOS][class context vectors (16)][class-name tokens][.][EOT][pad ...]

  - task names are the sentences of cfg.INPUT.TASK_NAME, "semantic segmentation." etc.
    (configs/coco-stuff-164k-156/mask2former_R101c_alltask_bs32_60k.yaml), tokenised without
    SOS/EOT (so their own "." is included);
  - the task-name tokens come first, *before* SOS;
  - SOS, ".", EOT and the padding token are token embeddings kept as buffers named
    `start_signal`, `dot_signal`, `end_signal`, `pad_signal` (1, C) (`init_buffer`, from the
    tokenisation of "X.");
  - the text feature is read at the EOT position (the sequence length - 1), through ln_final
    and text_projection, then L2-normalised.
The learnable vectors are `prefix_prompt` (class context, (16, C)) and `task_prompt` ((8, C)),
names and shapes as in tests/data/official_freeseg_r101c_keys.tsv.

Deliberate differences from the official code:
  - sequences are cut after the longest EOT of the batch instead of padded to 77 tokens. CLIP's
    text transformer is causal, so positions after EOT never influence the EOT feature: the
    result is the same, the text tower runs 2-3x faster.
  - `task_prompt` is initialised with N(0, init_std) like `prefix_prompt` (official: kaiming
    normal with a=2, std ~0.028 for C = 512); a trained checkpoint overrides either.
  - the CLIP model is held by reference, not registered as a sub-module, so the learner's
    state dict holds only its own tensors (the FreeSeg model registers CLIP once itself).
Axis legend: K classes, T text tokens, C token width, E embedding dim.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from freeseg.config import PromptConfig


def task_sentence(task: str) -> str:
    """The task name as the official config words it: "semantic" -> "semantic segmentation."."""
    return f"{task} segmentation."


def _freeze(clip_model: nn.Module) -> None:
    for p in clip_model.parameters():
        p.requires_grad_(False)


class PromptLearner(nn.Module):
    """forward(class_names: list[str], task: str | None) -> text features (K, E), L2-normalised.

    `task=None` leaves out the task part (task-name tokens and task vectors); with class_ctx = 0
    the sequence is then exactly CLIP's tokenisation of "class name.". `use_task_prompt=False`
    leaves it out for every task (the class prompt alone, the paper's ablation of the task
    prompt); it has no task vectors, so `task_ctx` must be 0.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, class_ctx: int = 16, task_ctx: int = 8,
                 init_std: float = 0.02, tasks: tuple[str, ...] = ("semantic", "instance", "panoptic"),
                 ctx_init: str = "", use_task_prompt: bool = True):
        super().__init__()
        if not use_task_prompt and task_ctx:
            raise ValueError(f"PromptLearner: without the task prompt there are no task vectors; "
                             f"set model.prompt.task_ctx=0 (got {task_ctx})")
        _freeze(clip_model)
        self.__dict__["clip_model"] = clip_model  # a reference, not a sub-module (see file header)
        self.tokenizer = tokenizer
        self.tasks = tuple(tasks)
        self.use_task_prompt = use_task_prompt
        width = clip_model.token_embedding.weight.shape[1]
        self.prefix_prompt = nn.Parameter(torch.randn(class_ctx, width) * init_std)  # (class_ctx, C)
        self.task_prompt = nn.Parameter(torch.randn(task_ctx, width) * init_std)  # (task_ctx, C)
        if ctx_init:  # CoOp's initialisation: start the class context as the words of a template
            init_ids = torch.tensor(tokenizer.encode(ctx_init), dtype=torch.long)
            if len(init_ids) != class_ctx:
                raise ValueError(f"PromptLearner: ctx_init {ctx_init!r} has {len(init_ids)} tokens, "
                                 f"class_ctx is {class_ctx}")
            with torch.no_grad():
                self.prefix_prompt.copy_(clip_model.token_embedding(init_ids.to(clip_model.token_embedding.weight.device)))
        dot = tokenizer.encode(".")
        if len(dot) != 1:
            raise ValueError(f"PromptLearner: the tokenizer splits '.' into {len(dot)} tokens, expected 1")
        # CLIP pads with token id 0 (freeseg.clip.tokenize), whose embedding fills the tail.
        ids = torch.tensor([tokenizer.sot_token, dot[0], tokenizer.eot_token, 0])
        with torch.no_grad():
            emb = clip_model.token_embedding(ids.to(clip_model.token_embedding.weight.device)).float()
        self.register_buffer("start_signal", emb[0:1].clone())  # (1, C)
        self.register_buffer("dot_signal", emb[1:2].clone())
        self.register_buffer("end_signal", emb[2:3].clone())
        self.register_buffer("pad_signal", emb[3:4].clone())
        self._word_cache: dict[str, torch.Tensor] = {}  # text -> (n, C) token embeddings, CLIP frozen

    def clear_cache(self) -> None:
        """Forget cached word embeddings (needed only if CLIP's token embedding changes)."""
        self._word_cache.clear()

    def _words(self, text: str) -> torch.Tensor:
        """Token embeddings of `text` without SOS/EOT: (n, C)."""
        if text not in self._word_cache:
            ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
            if len(ids) == 0:
                raise ValueError(f"PromptLearner: class or task name {text!r} has no tokens")
            with torch.no_grad():
                emb = self.clip_model.token_embedding(ids.to(self.clip_model.token_embedding.weight.device))
            self._word_cache[text] = emb.float()
        return self._word_cache[text].to(self.start_signal.device)

    def parts(self, class_names: list[str], task: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The token-embedding sequences in the official order, split where they part:
        -> (head (P, C) shared by every class: [task words][task vectors][SOS][class context];
            tails (K, T, C): [class words][.][EOT][padding];
            eot_index (K,): each end-of-text token's position in the whole sequence, >= P)."""
        head = []
        if task is not None and task not in self.tasks:
            raise ValueError(f"PromptLearner: unknown task {task!r}; known: {', '.join(self.tasks)}")
        if task is not None and self.use_task_prompt:
            head += [self._words(task_sentence(task)), self.task_prompt]
        head = torch.cat(head + [self.start_signal, self.prefix_prompt])  # (P, C)
        names = [self._words(name) for name in class_names]
        lengths = [n.shape[0] + 2 for n in names]  # + "." and EOT
        limit = self.clip_model.context_length
        for name, length in zip(class_names, lengths):
            if head.shape[0] + length > limit:
                raise ValueError(f"PromptLearner: prompt for class {name!r} needs {head.shape[0] + length} tokens, "
                                 f"CLIP's context holds {limit}")
        T = max(lengths)  # cut after the longest EOT: the causal text tower ignores later tokens
        tails = torch.stack([torch.cat([n, self.dot_signal, self.end_signal, self.pad_signal.expand(T - L, -1)])
                             for n, L in zip(names, lengths)])  # (K, T, C)
        return head, tails, torch.tensor(lengths, device=tails.device) + head.shape[0] - 1

    def sequences(self, class_names: list[str], task: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole token-embedding sequences -> (x (K, T, C), eot_index (K,))."""
        head, tails, eot = self.parts(class_names, task)
        return torch.cat([head.expand(len(tails), -1, -1), tails], dim=1), eot

    def forward(self, class_names: list[str], task: str | None = None) -> torch.Tensor:
        if len(class_names) == 0:
            raise ValueError("PromptLearner: empty class list")
        # The K sequences share their first tokens; the text tower computes those once.
        features = self.clip_model.encode_text_shared_prefix(*self.parts(class_names, task))  # (K, E)
        return F.normalize(features.float(), dim=-1)


class TemplatePrompts(nn.Module):
    """Hand-written prompts: mean of the L2-normalised CLIP features of each template, renormalised
    (official `PredefinedPromptExtractor`). forward(class_names, task=None) -> (K, E); the task
    is ignored. Features are cached per class name (nothing here is trained)."""

    def __init__(self, clip_model: nn.Module, tokenizer, templates: tuple[str, ...]):
        super().__init__()
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"TemplatePrompts: every template needs a '{{}}' slot, got {templates!r}")
        _freeze(clip_model)
        self.__dict__["clip_model"] = clip_model
        self.tokenizer = tokenizer
        self.templates = tuple(templates)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, name: str) -> torch.Tensor:
        tokens = self.tokenizer([t.format(name) for t in self.templates],
                                context_length=self.clip_model.context_length)
        feats = F.normalize(self.clip_model.encode_text(tokens.to(self.clip_model.positional_embedding.device)).float(),
                            dim=-1)  # (templates, E)
        return F.normalize(feats.mean(dim=0), dim=-1)

    def forward(self, class_names: list[str], task: str | None = None) -> torch.Tensor:
        for name in class_names:
            if name not in self._cache:
                self._cache[name] = self._encode(name)
        return torch.stack([self._cache[name] for name in class_names])  # (K, E)


def load_prompts(learner: PromptLearner, path: str | Path) -> None:
    """Copy `prefix_prompt` and `task_prompt` from a prompt-stage checkpoint into `learner`.

    Accepts a plain state dict or a checkpoint dict with a "model" entry; keys may carry any
    prefix (e.g. "prompt_learner.prefix_prompt" or the official "clip_adapter.prompt_learner.").
    """
    from freeseg.serialization import load_torch_file

    ckpt = load_torch_file(path, "prompt checkpoint")  # tensors only: never runs code from the file
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"load_prompts: {path} holds no state dict")
    for name in ("prefix_prompt", "task_prompt"):
        found = [k for k in state if k == name or k.endswith("." + name)]
        if len(found) != 1:
            raise KeyError(f"load_prompts: {path} has {len(found)} entries named *{name} (need exactly 1)")
        value, target = state[found[0]], getattr(learner, name)
        if value.shape != target.shape:
            raise ValueError(f"load_prompts: {path} {found[0]} has shape {tuple(value.shape)}, the learner "
                             f"expects {tuple(target.shape)} (model.prompt.class_ctx / task_ctx)")
        with torch.no_grad():
            target.copy_(value)


def build_prompts(cfg: PromptConfig, clip_model: nn.Module, tokenizer) -> nn.Module:
    if not cfg.learned:
        return TemplatePrompts(clip_model, tokenizer, cfg.templates)
    return PromptLearner(clip_model, tokenizer, class_ctx=cfg.class_ctx, task_ctx=cfg.task_ctx,
                         init_std=cfg.init_std, tasks=cfg.tasks, ctx_init=cfg.ctx_init,
                         use_task_prompt=cfg.use_task_prompt)
