"""Prompt learner: parity with plain CLIP, the official token order, frozen CLIP, checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from freeseg.clip import CLIP, default_tokenizer, tokenize
from freeseg.config import PromptConfig
from freeseg.modeling.prompts import PromptLearner, TemplatePrompts, build_prompts, load_prompts, task_sentence

NAMES = ["person", "traffic light", "wall-concrete", "sky"]


@pytest.fixture(scope="module")
def clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(embed_dim=24, image_resolution=32, vision_layers=1, vision_width=32, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2,
                transformer_layers=2).eval()


def test_zero_context_reproduces_clip_text_features(clip):
    learner = PromptLearner(clip, default_tokenizer(), class_ctx=0, task_ctx=0)
    with torch.no_grad():
        ours = learner(NAMES, task=None)
        ref = F.normalize(clip.encode_text(tokenize([f"{n}." for n in NAMES])), dim=-1)
    err = (ours - ref).abs().max().item()
    assert err < 1e-5, err


def test_official_token_order(clip):
    tok = default_tokenizer()
    learner = PromptLearner(clip, tok, class_ctx=3, task_ctx=2)
    x, eot = learner.sequences(["traffic light", "sky"], "instance")
    emb = clip.token_embedding.weight.detach()
    task_ids = tok.encode(task_sentence("instance"))  # "instance segmentation." incl. its "."
    n = len(task_ids)
    torch.testing.assert_close(x[0, :n], emb[task_ids])
    torch.testing.assert_close(x[0, n:n + 2], learner.task_prompt.detach())
    torch.testing.assert_close(x[0, n + 2], emb[tok.sot_token])
    torch.testing.assert_close(x[0, n + 3:n + 6], learner.prefix_prompt.detach())
    name = tok.encode("traffic light")
    torch.testing.assert_close(x[0, n + 6:n + 6 + len(name)], emb[name])
    torch.testing.assert_close(x[0, n + 6 + len(name)], emb[tok.encode(".")[0]])
    assert eot.tolist() == [n + 7 + len(name), n + 7 + len(tok.encode("sky"))]
    torch.testing.assert_close(x[1, eot[1]], emb[tok.eot_token])
    torch.testing.assert_close(x[1, eot[1] + 1:], emb[0].expand(x.shape[1] - eot[1] - 1, -1))


def test_cut_sequence_equals_full_77_padding(clip):
    learner = PromptLearner(clip, default_tokenizer(), class_ctx=4, task_ctx=2)
    x, eot = learner.sequences(NAMES, "panoptic")
    full = torch.cat([x, learner.pad_signal.expand(len(NAMES), 77 - x.shape[1], -1)], dim=1)
    with torch.no_grad():
        a = learner(NAMES, "panoptic")
        b = F.normalize(clip.encode_text_embeddings(full, eot), dim=-1)
    assert (a - b).abs().max() < 1e-5


def test_gradients_reach_only_prompts(clip):
    learner = PromptLearner(clip, default_tokenizer(), class_ctx=4, task_ctx=2)
    feats = learner(NAMES, "semantic")
    assert feats.shape == (4, 24)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4))
    (feats @ torch.randn(24)).sum().backward()
    assert learner.prefix_prompt.grad.abs().sum() > 0 and learner.task_prompt.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in clip.parameters())
    assert {n for n, _ in learner.named_parameters()} == {"prefix_prompt", "task_prompt"}
    assert set(learner.state_dict()) == {"prefix_prompt", "task_prompt", "start_signal", "dot_signal",
                                         "end_signal", "pad_signal"}
    # The task prompt matters: another task gives other features.
    with torch.no_grad():
        assert (learner(NAMES, "instance") - feats).abs().max() > 1e-4


def test_bad_inputs(clip):
    learner = PromptLearner(clip, default_tokenizer(), class_ctx=4, task_ctx=2)
    with pytest.raises(ValueError, match="unknown task"):
        learner(NAMES, "detection")
    with pytest.raises(ValueError, match="needs .* tokens"):
        learner(["word " * 80], "semantic")


def test_load_prompts_round_trip(clip, tmp_path):
    src = PromptLearner(clip, default_tokenizer(), class_ctx=4, task_ctx=2)
    path = tmp_path / "prompt.pt"
    torch.save({"model": {f"prompt_learner.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = PromptLearner(clip, default_tokenizer(), class_ctx=4, task_ctx=2)
    load_prompts(dst, path)
    torch.testing.assert_close(dst.prefix_prompt, src.prefix_prompt)
    torch.testing.assert_close(dst.task_prompt, src.task_prompt)
    with pytest.raises(ValueError, match="class_ctx"):
        load_prompts(PromptLearner(clip, default_tokenizer(), class_ctx=5, task_ctx=2), path)


def test_template_prompts_average(clip):
    templates = ("a photo of a {}.", "there is a {} in the scene.")
    prompts = TemplatePrompts(clip, default_tokenizer(), templates)
    with torch.no_grad():
        per_t = [F.normalize(clip.encode_text(tokenize([t.format(n) for n in NAMES])), dim=-1) for t in templates]
    expected = F.normalize((per_t[0] + per_t[1]) / 2, dim=-1)
    torch.testing.assert_close(prompts(NAMES, "semantic"), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(build_prompts(PromptConfig(learned=False), clip, default_tokenizer()), TemplatePrompts)
    learned = build_prompts(PromptConfig(class_ctx=3, task_ctx=1), clip, default_tokenizer())
    assert learned.prefix_prompt.shape == (3, 32) and learned.task_prompt.shape == (1, 32)


def test_class_prompt_alone_leaves_out_task_words_and_vectors(clip):
    """model.prompt.use_task_prompt=false (the ablation without task prompts): every task gets
    [SOS][class context][class words][.][EOT], the official sequence without its task part."""
    tok = default_tokenizer()
    learner = build_prompts(PromptConfig(class_ctx=3, task_ctx=0, use_task_prompt=False), clip, tok)
    assert learner.task_prompt.shape == (0, 32)  # no task vectors to learn
    emb = clip.token_embedding.weight.detach()
    name = tok.encode("traffic light")
    for task in ("semantic", "instance", "panoptic"):
        x, eot = learner.sequences(["traffic light", "sky"], task)
        torch.testing.assert_close(x[0, 0], emb[tok.sot_token])
        torch.testing.assert_close(x[0, 1:4], learner.prefix_prompt.detach())
        torch.testing.assert_close(x[0, 4:4 + len(name)], emb[name])
        torch.testing.assert_close(x[0, 4 + len(name)], emb[tok.encode(".")[0]])
        torch.testing.assert_close(x[0, 5 + len(name)], emb[tok.eot_token])
        assert eot.tolist() == [5 + len(name), 5 + len(tok.encode("sky"))]
    with torch.no_grad():
        feats = [learner(NAMES, task) for task in ("semantic", "instance", "panoptic")]
    torch.testing.assert_close(feats[0], feats[1])
    torch.testing.assert_close(feats[0], feats[2])
    # With no class context either, it is CLIP's own tokenisation of "name.".
    bare = PromptLearner(clip, tok, class_ctx=0, task_ctx=0, use_task_prompt=False)
    with torch.no_grad():
        ref = F.normalize(clip.encode_text(tokenize([f"{n}." for n in NAMES])), dim=-1)
        assert (bare(NAMES, "instance") - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="task_ctx=0"):
        PromptLearner(clip, tok, class_ctx=3, task_ctx=2, use_task_prompt=False)
    with pytest.raises(ValueError, match="unknown task"):
        learner(NAMES, "detection")


def test_fixed_template_is_a_photo_of_a(clip):
    """model.prompt.learned=false (the fixed-template baseline): CLIP's text feature of "a photo
    of a {class}." and nothing else, whatever the task."""
    assert PromptConfig().templates == ("a photo of a {}.",)
    prompts = build_prompts(PromptConfig(learned=False), clip, default_tokenizer())
    with torch.no_grad():
        ref = F.normalize(clip.encode_text(tokenize([f"a photo of a {n}." for n in NAMES])), dim=-1)
    torch.testing.assert_close(prompts(NAMES, "instance"), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prompts(NAMES, None), ref, atol=1e-5, rtol=1e-5)
