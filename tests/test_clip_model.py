"""Our CLIP against OpenAI's reference code (the `clip-anytorch` package): same weights, same outputs.

The reference models have the shapes of ViT-B/16 and RN50 with fewer layers / channels to keep
the file fast (every full shape is supported: the slow test runs the whole ViT-B/16). Weights are
random and then perturbed (biases, BatchNorm statistics, the zero-initialised bn3 scales), so no
branch of either network is trivially zero.
"""

import functools
import importlib

import pytest
import torch

from freeseg.clip import CLIP, build_model, load

# Tracing and saving TorchScript (how OpenAI's archives are made) warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning",
                                        "ignore:pkg_resources is deprecated:UserWarning")

reference = importlib.import_module("clip.model")  # OpenAI's CLIP (clip-anytorch, a test dependency)

TOL = 1e-5  # float32, max abs
EOT = 49407

# OpenAI's CLIP(...) arguments: embed_dim, image_resolution, vision_layers, vision_width,
# vision_patch_size, context_length, vocab_size, transformer_width, transformer_heads, transformer_layers.
VIT_B16_REDUCED = (512, 224, 2, 768, 16, 77, 49408, 512, 8, 2)  # ViT-B/16 widths, 2 layers per tower
RN50_REDUCED = (1024, 224, (3, 4, 6, 3), 32, None, 77, 49408, 512, 8, 2)  # RN50 depth, half width
VIT_B16_FULL = (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
TOY = dict(embed_dim=128, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16,
           vision_patch_size=None, context_length=16, vocab_size=800, transformer_width=128,
           transformer_heads=4, transformer_layers=4)


@functools.cache
def reference_model(args: tuple) -> torch.nn.Module:
    """OpenAI's CLIP with perturbed random weights (built once per shape: these are large)."""
    torch.manual_seed(0)
    model = reference.CLIP(*args).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn_like(tensor))
    return model


@functools.cache
def our_model(args: tuple) -> CLIP:
    return build_model(reference_model(args).state_dict())


def inputs(resolution: int = 224, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    images = torch.randn(batch, 3, resolution, resolution)
    tokens = torch.zeros(batch + 1, 77, dtype=torch.long)
    for i, length in enumerate([5, 40, 77][: batch + 1]):
        tokens[i, 0] = EOT - 1
        tokens[i, 1:length - 1] = torch.randint(0, EOT - 1, (length - 2,))
        tokens[i, length - 1] = EOT
    return images, tokens


def max_differences(ours: CLIP, ref: torch.nn.Module, images, tokens) -> list[float]:
    with torch.no_grad():
        pairs = [(ours.encode_image(images), ref.encode_image(images)),
                 (ours.encode_text(tokens), ref.encode_text(tokens)),
                 (ours(images, tokens)[0], ref(images, tokens)[0]),
                 (ours(images, tokens)[1], ref(images, tokens)[1])]
    for a, b in pairs:
        assert a.shape == b.shape
    return [(a - b).abs().max().item() for a, b in pairs]


def save_torchscript(ref: torch.nn.Module, path, images, tokens) -> None:
    """An archive like OpenAI's: a traced CLIP whose state dict also holds the three integer
    attributes OpenAI's archives carry (input_resolution, context_length, vocab_size)."""
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(ref, name):
            delattr(ref, name)
        ref.register_buffer(name, torch.tensor(value))
    with torch.no_grad():
        traced = torch.jit.trace(ref, (images[:1], tokens[:2]), check_trace=False)
    torch.jit.save(traced, str(path))


@pytest.mark.parametrize("args", [VIT_B16_REDUCED, RN50_REDUCED], ids=["ViT-B16-2layers", "RN50-halfwidth"])
def test_parity_from_state_dict_and_torchscript(args, tmp_path):
    ref = reference_model(args)
    images, tokens = inputs()
    torch.save(ref.state_dict(), tmp_path / "plain.pt")
    save_torchscript(ref, tmp_path / "jit.pt", images, tokens)
    for name in ("plain.pt", "jit.pt"):
        ours, _ = load(tmp_path / name)
        assert not ours.training and ours.dtype == torch.float32
        assert max(max_differences(ours, ref, images, tokens)) < TOL, name


def test_hyper_parameters_inferred_from_shapes():
    ours = our_model(RN50_REDUCED)
    assert (ours.embed_dim, ours.input_resolution, ours.context_length, ours.vocab_size) == (1024, 224, 77, 49408)
    assert [len(getattr(ours.visual, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert ours.visual.attnpool.num_heads == 32 * 32 // 64
    vit = our_model(VIT_B16_REDUCED)
    assert vit.visual.conv1.kernel_size == (16, 16) and len(vit.visual.transformer.resblocks) == 2
    assert vit.transformer.resblocks[0].attn.num_heads == 8


def test_text_embedding_path_equals_encode_text():
    ours = our_model(VIT_B16_REDUCED)
    _, tokens = inputs()
    with torch.no_grad():
        direct = ours.encode_text(tokens)
        via_embeddings = ours.encode_text_embeddings(ours.token_embedding(tokens), tokens.argmax(-1))
        # A shorter context (T < 77) reads the first T positional embeddings, as OpenAI does.
        short = ours.encode_text_embeddings(ours.token_embedding(tokens[:1, :5]), torch.tensor([4]))
    assert (direct - via_embeddings).abs().max() < 1e-6
    assert (short - direct[:1]).abs().max() < TOL


def test_padding_cut_and_length_groups_equal_the_full_context():
    """encode_text cuts the padding after the longest text and, with length_groups, encodes texts
    of similar length together (the toy CLIP stage); the full 16-token context is the reference."""
    torch.manual_seed(0)
    model = CLIP(**TOY).eval()
    lengths = torch.tensor([3, 15, 7, 4, 12, 5, 9])
    tokens = torch.randint(1, 798, (len(lengths), 16)) * (torch.arange(16) < lengths[:, None])
    tokens[torch.arange(len(lengths)), lengths - 1] = 799  # end of text
    with torch.no_grad():
        full = model.encode_text_embeddings(model.token_embedding(tokens), lengths - 1)
        for groups in (1, 2, 3):
            assert (model.encode_text(tokens, length_groups=groups) - full).abs().max() < 1e-5


def test_shared_prefix_path_equals_whole_sequences_with_gradients():
    """encode_text_shared_prefix (the prompt learner's path) against encode_text_embeddings on the
    concatenated sequences: values and gradients of the shared and the own tokens (float32; the
    LayerNorms compute in float32 whatever the model's dtype, as OpenAI's do)."""
    torch.manual_seed(0)
    model = CLIP(**TOY).eval()
    P, K, T = 6, 5, 4
    head = torch.randn(P, 128, requires_grad=True)
    tails = torch.randn(K, T, 128, requires_grad=True)
    eot = torch.tensor([6, 9, 7, 8, 9])  # in the whole sequence; later tokens are padding
    weights = torch.randn(K, 128)
    whole = model.encode_text_embeddings(torch.cat([head.expand(K, -1, -1), tails], dim=1), eot)
    grads_whole = torch.autograd.grad((whole * weights).sum(), [head, tails])
    shared = model.encode_text_shared_prefix(head, tails, eot)
    grads_shared = torch.autograd.grad((shared * weights).sum(), [head, tails])
    torch.testing.assert_close(shared, whole, rtol=0, atol=1e-5)
    for a, b in zip(grads_shared, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert a.abs().max() > 1e-3  # every token, shared or own, gets a gradient
    with pytest.raises(ValueError, match="end-of-text index is inside the 6 shared tokens"):
        model.encode_text_shared_prefix(head, tails, torch.tensor([5, 9, 7, 8, 9]))


def test_text_is_causal():
    """Tokens after the EOT (padding) cannot change the text feature."""
    ours = our_model(VIT_B16_REDUCED)
    _, tokens = inputs()
    changed = tokens.clone()
    changed[0, 10:] = 123
    with torch.no_grad():
        assert torch.equal(ours.encode_text(tokens)[0], ours.encode_text(changed)[0])


def test_fp16_checkpoint_loads_as_float32():
    state = {k: v.half() if v.is_floating_point() else v for k, v in reference_model(RN50_REDUCED).state_dict().items()}
    ours = build_model(state)
    for name, tensor in ours.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
            assert torch.equal(tensor, state[name].float()), name


def test_initialisation_equals_openai():
    """Same seed, same initial weights: construction order and initialize_parameters follow OpenAI's,
    which is what a CLIP trained from scratch (the toy world) relies on."""
    for args in [tuple(TOY.values()), (64, 64, 2, 128, 16, 16, 800, 128, 2, 2)]:
        torch.manual_seed(0)
        ref = reference.CLIP(*args).state_dict()
        torch.manual_seed(0)
        ours = CLIP(*args).state_dict()
        assert ref.keys() == ours.keys()
        for name in ref:
            assert torch.equal(ref[name], ours[name]), name


def test_toy_clip_trains():
    """The toy world's CLIP: a tiny modified ResNet on 64x64 images (2x2 attention-pool grid)."""
    torch.manual_seed(0)
    model = CLIP(**TOY).train()
    assert model.visual.attnpool.positional_embedding.shape == (2 * 2 + 1, 16 * 32)
    images = torch.randn(4, 3, 64, 64)
    tokens = torch.randint(1, 798, (4, 16))
    tokens[:, 6] = 799
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        logits, _ = model(images, tokens)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_parity_full_vit_b16(tmp_path):
    ref = reference_model(VIT_B16_FULL)
    images, tokens = inputs()
    save_torchscript(ref, tmp_path / "jit.pt", images, tokens)
    ours, _ = load(tmp_path / "jit.pt")
    assert max(max_differences(ours, ref, images, tokens)) < TOL
