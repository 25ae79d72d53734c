"""The written-out attention every fast version is checked against.

``softmax(Q K^T * scale + mask) V`` with the full ``(T_q, T_k)`` score matrix in memory: the
textbook formula, and the memory cost (``O(T^2)`` per head) that FlashAttention removes. The math
is :func:`lmcore.nn.scaled_dot_product_attention`; this adds the causal flag and the upcast the
kernel tests compare against.
"""

from __future__ import annotations

import torch

from lmcore.nn.attention import causal_mask, scaled_dot_product_attention


def attention_reference(q, k, v, causal: bool = False, scale: float | None = None,
                        return_lse: bool = False, upcast: bool = True):
    """Attention with the score matrix written out; ``q, k, v`` of shape ``(..., T, D)``.

    ``upcast`` computes in float32 (float64 inputs stay float64) and casts the output back;
    ``return_lse`` also returns the row log-sum-exp ``L`` (natural log, float32), shape ``q.shape[:-1]``.
    With ``causal`` the queries are the last ``Tq`` of ``Tk`` positions (query ``i`` sees keys
    ``j <= i + Tk - Tq``).
    """
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device) if causal else None
    out, lse = scaled_dot_product_attention(q, k, v, mask, scale, return_lse=True)
    out = out.to(dtype)
    return (out, lse.float()) if return_lse else out
