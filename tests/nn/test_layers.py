"""The layers of lmcore.nn against their definitions and torch's own versions."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmcore.nn import (Embedding, Linear, RMSNorm, RotaryEmbedding, SwiGLU, scaled_dot_product_attention, silu,
                       softmax)


def test_linear_matches_formula_and_init_scale():
    torch.manual_seed(0)
    layer = Linear(300, 200)
    x = torch.randn(3, 5, 300)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    std = math.sqrt(2 / 500)
    assert abs(layer.weight.std().item() - std * 0.986) < 0.03 * std  # truncating at 3 sigma shrinks the std by 1.4%
    assert layer.weight.abs().max().item() <= 3 * std + 1e-6


def test_embedding_is_a_lookup():
    emb = Embedding(10, 4)
    ids = torch.tensor([[1, 9], [0, 1]])
    out = emb(ids)
    assert out.shape == (2, 2, 4)
    torch.testing.assert_close(out[0, 0], emb.weight[1])
    torch.testing.assert_close(out, F.embedding(ids, emb.weight))


def test_rmsnorm_matches_definition_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.randn(8)
    x = torch.randn(2, 3, 8) * 100
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)


def test_softmax_is_stable_and_matches_torch():
    x = torch.tensor([[1.0, 2.0, 3.0], [1e4, 1e4 + 1, -1e4], [-float("inf")] * 3])
    out = softmax(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], torch.softmax(x[:2], -1))
    assert out[2].sum().item() == 0.0  # nothing to attend to: zeros, not NaN


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 40)
    x = torch.randn(2, 3, 16)
    w1, w3 = ffn.w13.weight[:40], ffn.w13.weight[40:]
    expected = (silu(x @ w1.T) * (x @ w3.T)) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected)
    torch.testing.assert_close(silu(x), F.silu(x))


def test_sdpa_with_boolean_mask_matches_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def _rope_complex(x, base, style):
    """RoPE as complex multiplication, the form in the RoFormer paper."""
    T, D = x.shape[-2], x.shape[-1]
    freqs = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), freqs))
    x = x.double()
    if style == "interleaved":
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2).contiguous())
        return torch.view_as_real(z * rot).flatten(-2).float()
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    r = z * rot
    return torch.cat([r.real, r.imag], -1).float()


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_matches_complex_rotation(style):
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 32, base=10000.0, style=style)
    x = torch.randn(2, 3, 32, 16)
    torch.testing.assert_close(rope(x), _rope_complex(x, 10000.0, style), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope(x[..., 5:9, :], start_pos=5), rope(x)[..., 5:9, :])


def test_rope_conventions_are_a_channel_permutation_of_each_other():
    torch.manual_seed(0)
    D = 8
    half, inter = RotaryEmbedding(D, 16, style="half"), RotaryEmbedding(D, 16, style="interleaved")
    x = torch.randn(1, 2, 16, D)
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])  # pairs (2i, 2i+1) -> (i, i + D/2)
    torch.testing.assert_close(half(x[..., perm]), inter(x)[..., perm])


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_scores_depend_only_on_relative_position(style):
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 64, style=style)
    q, k = torch.randn(8), torch.randn(8)
    rows = lambda v: v.expand(64, 8)  # noqa: E731 - the same vector at every position
    rq, rk = rope(rows(q)), rope(rows(k))
    torch.testing.assert_close(rq[10] @ rk[7], rq[40] @ rk[37], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rq[10] @ rk[7], rq[10] @ rk[3])


def test_rope_refuses_odd_dims_and_positions_beyond_table():
    with pytest.raises(ValueError, match="even head dimension"):
        RotaryEmbedding(7, 8)
    with pytest.raises(ValueError, match="style"):
        RotaryEmbedding(8, 8, style="sideways")
    with pytest.raises(ValueError, match="exceed"):
        RotaryEmbedding(8, 8)(torch.randn(1, 1, 4, 8), start_pos=6)
