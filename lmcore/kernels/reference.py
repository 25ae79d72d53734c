"""The written-out attention every fast version is checked against.

``softmax(Q K^T * scale + mask) V`` with the full ``(T_q, T_k)`` score matrix in memory: the
textbook formula, and the memory cost (``O(T^2)`` per head) that FlashAttention removes.
"""

from __future__ import annotations

import math

import torch


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """Boolean ``(t_q, t_k)`` mask, True where query ``i`` may see key ``j``.

    The queries are the last ``t_q`` of ``t_k`` positions (as with a KV cache, and in ``lmcore.nn``):
    query ``i`` sees keys ``j <= i + t_k - t_q``. For ``t_q == t_k`` this is the usual lower triangle.
    """
    if t_q > t_k:
        raise ValueError(f"causal attention needs at least as many keys as queries; got {t_q} and {t_k}")
    i = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)  # (Tq, 1)
    j = torch.arange(t_k, device=device)[None, :]  # (1, Tk)
    return j <= i  # (Tq, Tk)


def attention_reference(q, k, v, causal: bool = False, scale: float | None = None,
                        return_lse: bool = False, upcast: bool = True):
    """Attention with the score matrix written out; ``q, k, v`` of shape ``(B, H, T, D)``.

    ``upcast`` computes in float32 (float64 inputs stay float64) and casts the output back;
    ``return_lse`` also returns the row log-sum-exp ``L`` (natural log, float32), shape ``(B, H, Tq)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), -math.inf)
    lse = torch.logsumexp(s.float(), dim=-1)  # (B, H, Tq)
    p = torch.softmax(s, dim=-1)  # (B, H, Tq, Tk)
    out = (p @ v).to(dtype)  # (B, H, Tq, D)
    return (out, lse) if return_lse else out


def attention_flops(batch: int, heads: int, t_q: int, t_k: int, head_dim: int, causal: bool,
                    backward: bool = False) -> float:
    """Matrix-multiply FLOPs of attention: ``4 B H Tq Tk D`` forward, 2.5x that for the backward.

    Causal attention does about half the work (the exact count of visible pairs is used).
    """
    pairs = t_q * t_k
    if causal:  # query i sees i + 1 + (t_k - t_q) keys
        pairs = t_q * (t_k - t_q) + t_q * (t_q + 1) // 2
    fwd = 4.0 * batch * heads * pairs * head_dim
    return fwd * (1.0 + 2.5) if backward else fwd
