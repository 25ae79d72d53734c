"""Attention: the math, three interchangeable backends, and the causal self-attention layer.

Backends are registered by name in :mod:`lmcore.nn.registry`; every backend has the signature
``fn(q, k, v, causal=True, **options)`` on tensors of shape (batch, heads, seq, head_dim).
When ``k`` is longer than ``q`` (decoding with a KV cache), the queries are the *last*
``q.shape[-2]`` positions, so query ``i`` may attend keys ``0 .. Tk - Tq + i``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmcore.nn.layers import Linear, RMSNorm, softmax
from lmcore.nn.registry import attention_capabilities, get_attention_backend, register_attention_backend


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True = may attend; queries are the last ``t_q`` of ``t_k`` positions."""
    if t_q > t_k:
        raise ValueError(f"causal attention needs at least as many keys as queries, got {t_q} queries "
                         f"and {t_k} keys")
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, scale: float | None = None,
                                 return_lse: bool = False):
    """``softmax(q k^T * scale + mask) v``, the score matrix written out; ``mask`` is boolean, True = may attend.

    Shapes: ``q`` (..., Tq, D), ``k`` (..., Tk, D), ``v`` (..., Tk, Dv), ``mask`` broadcastable to
    (..., Tq, Tk). ``scale`` defaults to ``1/sqrt(D)``. Returns (..., Tq, Dv); a row whose mask
    allows no key gets zeros. With ``return_lse`` also the row log-sum-exp of the scaled scores
    ``L = log sum_j exp(s_j)`` (natural log, float32, (..., Tq); ``-inf`` for a row with no key).
    Every other attention in lmcore is checked against this one.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., Tq, Tk)
    empty = None
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
        empty = ~mask.any(-1, keepdim=True)  # (..., Tq, 1) rows that see no key
        if empty.any():
            scores = scores.masked_fill(empty, 0.0)  # finite, so the softmax below stays NaN-free
        else:
            empty = None
    probs = softmax(scores, dim=-1)  # (..., Tq, Tk)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    out = probs @ v  # (..., Tq, Dv)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores.float(), dim=-1)  # (..., Tq)
    if empty is not None:
        lse = lse.masked_fill(empty.squeeze(-1), float("-inf"))
    return out, lse


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grouped: bool = False) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (batch, heads, seq, head_dim) tensors, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    heads_ok = q.shape[1] == k.shape[1] or (grouped and k.shape[1] and q.shape[1] % k.shape[1] == 0)
    if k.shape != v.shape[:-1] + (k.shape[-1],) or q.shape[0] != k.shape[0] or not heads_ok \
            or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible attention shapes q={tuple(q.shape)} k={tuple(k.shape)} "
                         f"v={tuple(v.shape)}" + (" (k, v heads must divide q heads)" if grouped else ""))


@register_attention_backend("reference", kv_offsets=True, stores_scores=True)
def reference_attention(q, k, v, causal: bool = True, **options):
    """The written-out math, one (batch, head) at a time: slow, and obviously right."""
    _check(q, k, v)
    B, H, Tq, _ = q.shape
    mask = causal_mask(Tq, k.shape[-2], q.device) if causal else None
    out = torch.empty(B, H, Tq, v.shape[-1], dtype=q.dtype, device=q.device)  # (B, H, Tq, D)
    for b in range(B):
        for h in range(H):
            out[b, h] = scaled_dot_product_attention(q[b, h], k[b, h], v[b, h], mask)  # (Tq, D)
    return out


@register_attention_backend("vectorized", kv_offsets=True, stores_scores=True)
def vectorized_attention(q, k, v, causal: bool = True, **options):
    """The same math on all batches and heads at once (batched matmuls)."""
    _check(q, k, v)
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device) if causal else None
    return scaled_dot_product_attention(q, k, v, mask)  # (B, H, Tq, D)


@register_attention_backend("sdpa", kv_offsets=True, grouped_kv=True)
def sdpa_attention(q, k, v, causal: bool = True, **options):
    """``torch.nn.functional.scaled_dot_product_attention`` (fused kernels such as FlashAttention).

    ``k, v`` may have fewer heads than ``q`` (grouped-query attention, ``enable_gqa``).
    """
    _check(q, k, v, grouped=True)
    t_q, t_k = q.shape[-2], k.shape[-2]
    if k.shape[1] != q.shape[1]:
        options = {**options, "enable_gqa": True}
    if causal and t_q != t_k:
        if t_q == 1:  # one new query sees every cached key
            return F.scaled_dot_product_attention(q, k, v, is_causal=False, **options)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_q, t_k, q.device), **options)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **options)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions and optional grouped-query heads.

    ``n_kv_heads < n_heads`` shares each key/value head among ``n_heads // n_kv_heads`` query heads
    (grouped-query attention), which shrinks the KV cache by that factor. A backend registered with
    ``grouped_kv`` receives the ``n_kv_heads`` heads as they are; for any other the model repeats
    each one over its group. ``qk_norm`` normalises every query and key head (RMSNorm over
    ``head_dim``) before the rotation, as Qwen3 does.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 backend: str = "sdpa", backend_options: dict | None = None, device=None, dtype=None,
                 head_dim: int | None = None, bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        # q, k and v projections stacked in one matrix: one matmul instead of three, same math
        self.qkv_sizes = [n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2
        self.qkv_proj = Linear(d_model, sum(self.qkv_sizes), std=math.sqrt(2.0 / (2 * d_model)), bias=bias,
                               device=device, dtype=dtype)
        self.o_proj = Linear(n_heads * self.head_dim, d_model, bias=bias, device=device, dtype=dtype)
        self.q_norm = RMSNorm(self.head_dim, norm_eps, device=device, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps, device=device, dtype=dtype) if qk_norm else None
        self.backend_name = backend
        self.attend = get_attention_backend(backend)
        capabilities = attention_capabilities(backend)
        self.kv_offsets, self.grouped_kv = capabilities.kv_offsets, capabilities.grouped_kv
        self.backend_options = dict(backend_options or {})

    def forward(self, x: torch.Tensor, rope=None, start_pos: int = 0, cache=None, layer: int = 0):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)  # (B, T, H*D), (B, T, Hkv*D) x 2
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # each head scaled to unit RMS, then by its gain
        if rope is not None:
            q, k = rope(q, start_pos), rope(k, start_pos)
        if cache is not None:
            k, v = cache.update(layer, k, v, start_pos)  # (B, Hkv, start_pos + T, D): only the KV heads
            k, v = k.to(q.dtype), v.to(q.dtype)  # a float32 cache read under autocast
        if self.n_kv_heads != self.n_heads and not self.grouped_kv:
            repeat = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeat, dim=1)  # (B, H, Tk, D)
            v = v.repeat_interleave(repeat, dim=1)  # (B, H, Tk, D)
        if k.shape[-2] != T and not self.kv_offsets:
            y = sdpa_attention(q, k, v, causal=True)  # decoding with a cache: queries are the last positions
        else:
            y = self.attend(q, k, v, causal=True, **self.backend_options)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, d)
