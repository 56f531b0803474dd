"""Test-time prompt tuning (TTPT) on unseen classes.

Paper, section 3.4: at test time the class prompt is adapted to each image without labels.
Each query's predicted distribution over the *unseen* classes is measured by its entropy; the
confident queries (low entropy) are kept, and their mean entropy is minimised with respect to
the class prompt only. The paper gives no step count, learning rate or threshold and the
official release has no TTPT code, so these are choices exposed in TTPTConfig:

    p_q      = softmax over the unseen columns of the mask classifier's logits (Q, K_u)
    H_q      = -sum_k p_q(k) log p_q(k)
    selected = {q : H_q < entropy_threshold * log K_u}   (log K_u is the entropy of a uniform guess)
    loss     = mean_{q in selected} H_q,   minimised over `prefix_prompt` for `steps` AdamW steps.

The distribution is the mask classifier's (query embeddings against the tuned text features,
through the interaction as well), not the CLIP region classifier's: CLIP's region features do
not depend on the prompt's effect on the masks, and the text features reach both anyway.

The tuned prompt is used for this image only: the original prompt is restored afterwards, even
if tuning fails, so results never depend on the order images are seen in.
Axis legend: Q queries, K classes, K_u unseen classes, E embedding dim.
"""

import contextlib
import math

import torch

from freeseg.config import TTPTConfig
from freeseg.modeling.prompts import PromptLearner


def unseen_entropy(logits: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """logits (Q, K + 1) (last = no object), unseen (K,) bool -> entropy over the unseen classes (Q,)."""
    columns = unseen.nonzero().flatten().to(logits.device)
    logp = logits[:, columns].log_softmax(dim=-1)  # (Q, K_u)
    return -(logp.exp() * logp).sum(dim=-1)


@contextlib.contextmanager
def tuned_prompt(model, features: dict, class_names: list[str], task: str, unseen: torch.Tensor,
                 cfg: TTPTConfig, stats: dict | None = None):
    """Tune the class prompt on one image's features (from `model.extract`, batch of one) for
    the duration of a `with` block: inside it, `model.prompt_learner` gives the tuned prompt's
    text features for any task; on exit the prompt is restored, even if the block fails.
    Yields the queries kept (Q,) bool, or None if tuning never ran (`cfg.steps` 0). `stats`, if
    given, receives {"selected": number kept, "entropy_before": their mean unseen entropy}.
    """
    learner = model.prompt_learner
    if not isinstance(learner, PromptLearner):
        raise TypeError("tuned_prompt: test-time prompt tuning needs learned prompts (model.prompt.learned)")
    num_unseen = int(unseen.sum())
    prompt = learner.prefix_prompt
    saved, saved_flag = prompt.detach().clone(), prompt.requires_grad
    stats = {} if stats is None else stats
    try:
        prompt.requires_grad_(True)
        opt = torch.optim.AdamW([prompt], lr=cfg.lr, weight_decay=0.0)
        selected = None
        with torch.enable_grad():
            for step in range(cfg.steps):
                logits = model.decode(features, learner(class_names, task))["pred_logits"][0]  # (Q, K + 1)
                entropy = unseen_entropy(logits, unseen)  # (Q,)
                if selected is None:  # the confident queries are chosen once, before tuning
                    selected = entropy.detach() < cfg.entropy_threshold * math.log(max(num_unseen, 1))
                    stats["selected"] = int(selected.sum())
                    stats["entropy_before"] = float(entropy.detach()[selected].mean()) if selected.any() else math.nan
                if not selected.any():
                    break
                loss = entropy[selected].mean()
                # autograd.grad, not backward: only the prompt's gradient is computed, and no
                # .grad is left behind on the model's own parameters.
                (prompt.grad,) = torch.autograd.grad(loss, [prompt])
                opt.step()
        prompt.grad = None
        prompt.requires_grad_(saved_flag)
        yield selected
    finally:
        with torch.no_grad():
            prompt.copy_(saved)
        prompt.grad = None
        prompt.requires_grad_(saved_flag)


def tune_text_features(model, features: dict, class_names: list[str], task: str, unseen: torch.Tensor,
                       cfg: TTPTConfig, measure_after: bool = False) -> tuple[torch.Tensor, dict]:
    """Tune the class prompt on one image's features (from `model.extract`, batch of one).
    -> (text features (K, E) from the tuned prompt, detached;
        stats {"selected": number of queries kept, "entropy_before", "entropy_after": mean
        unseen entropy of the kept queries before / after tuning (nan if none kept, or if not
        `measure_after`: measuring it costs one more decoder pass)}).
    The model's prompt is unchanged on return.
    """
    stats = {"selected": 0, "entropy_before": math.nan, "entropy_after": math.nan}
    with tuned_prompt(model, features, class_names, task, unseen, cfg, stats) as selected, torch.no_grad():
        text = model.prompt_learner(class_names, task)
        if measure_after and selected is not None and selected.any():
            logits = model.decode(features, text)["pred_logits"][0]
            stats["entropy_after"] = float(unseen_entropy(logits, unseen)[selected].mean())
    return text.detach(), stats
