"""Semantic context interaction: parity with a per-head reference, official names, invariants."""

import torch
import torch.nn.functional as F

from freeseg.modeling.interaction import SemanticContextInteraction


def make(dim=8, text_dim=12, attn_dim=16, heads=4, scale=0.1) -> SemanticContextInteraction:
    torch.manual_seed(0)
    module = SemanticContextInteraction(dim=dim, text_dim=text_dim, attn_dim=attn_dim, num_heads=heads,
                                        layer_scale_init=scale)
    return module.eval()


def reference(m: SemanticContextInteraction, x: torch.Tensor, keys_normed: torch.Tensor) -> torch.Tensor:
    """Loop over images and heads, written from the official MultiHeadAttention description."""
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        q = F.layer_norm(x[b].reshape(C, -1).t(), (C,), m.layer_norm_q_1.weight, m.layer_norm_q_1.bias)  # (S, C)
        qp, kp, vp = m.attn.q_proj(q) * m.head_dim ** -0.5, m.attn.k_proj(keys_normed), m.attn.v_proj(keys_normed)
        heads = []
        for h in range(m.num_heads):
            sl = slice(h * m.head_dim, (h + 1) * m.head_dim)
            heads.append((qp[:, sl] @ kp[:, sl].t()).softmax(-1) @ vp[:, sl])
        delta = m.attn.out_proj(torch.cat(heads, dim=1))  # (S, C)
        out[b] = (q + m.gamma * delta).t().reshape(C, H, W)
    return out


def test_names_match_official_keys():
    names = {k: tuple(v.shape) for k, v in SemanticContextInteraction().state_dict().items()}
    assert names == {
        "gamma": (256,), "layer_norm_q_1.weight": (256,), "layer_norm_q_1.bias": (256,),
        "layer_norm_k_1.weight": (512,), "layer_norm_k_1.bias": (512,),
        "attn.q_proj.weight": (2048, 256), "attn.q_proj.bias": (2048,),
        "attn.k_proj.weight": (2048, 512), "attn.k_proj.bias": (2048,),
        "attn.v_proj.weight": (2048, 512), "attn.v_proj.bias": (2048,),
        "attn.out_proj.weight": (256, 2048), "attn.out_proj.bias": (256,),
    }


def test_matches_reference_and_is_batch_invariant():
    m = make()
    with torch.no_grad():  # non-trivial norms so the test sees them
        for ln in (m.layer_norm_q_1, m.layer_norm_k_1):
            ln.weight.normal_(1, 0.3)
            ln.bias.normal_(0, 0.3)
    x, text = torch.randn(2, 8, 3, 5), torch.randn(7, 12)
    out = m(x, text)
    keys = F.layer_norm(text, (12,), m.layer_norm_k_1.weight, m.layer_norm_k_1.bias)
    torch.testing.assert_close(out, reference(m, x, keys), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x[1:], text), out[1:], atol=1e-6, rtol=1e-5)
    # gamma = 0: the output is the normalised pixels (official residual on LN(x)).
    m.gamma.data.zero_()
    ln_x = F.layer_norm(x.permute(0, 2, 3, 1), (8,), m.layer_norm_q_1.weight, m.layer_norm_q_1.bias)
    torch.testing.assert_close(m(x, text), ln_x.permute(0, 3, 1, 2))


def test_pyramid_renormalises_keys_each_level():
    m = make()
    with torch.no_grad():
        m.layer_norm_k_1.weight.normal_(1, 0.5)
        m.layer_norm_k_1.bias.normal_(0, 0.5)
    feats, text = [torch.randn(1, 8, 2, 2), torch.randn(1, 8, 4, 4)], torch.randn(5, 12)
    out = m.forward_pyramid(feats, text)
    torch.testing.assert_close(out[0], m(feats[0], text))
    twice = m.layer_norm_k_1(m.layer_norm_k_1(text))
    torch.testing.assert_close(out[1], reference(m, feats[1], twice), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[1], m(feats[1], text), atol=1e-4)


def test_every_parameter_gets_gradient_and_text_too():
    m = make().train()
    x, text = torch.randn(2, 8, 3, 3), torch.randn(4, 12, requires_grad=True)
    sum(o.square().mean() for o in m.forward_pyramid([x, x[:, :, :2]], text)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert text.grad.abs().sum() > 0
