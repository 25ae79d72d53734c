"""FlashAttention-2 written tile by tile in PyTorch: the readable twin of the Triton kernel.

Forward (for one query tile ``Q_i`` against key/value tiles ``K_j, V_j``), in base 2 with
``c = scale * log2(e)`` folded into the scores::

    S_ij = c * Q_i K_j^T                      scores of the tile, already in log2 units
    m_new = max(m, rowmax(S_ij))              running row maximum
    P_ij = exp2(S_ij - m_new)                 unnormalised probabilities
    alpha = exp2(m - m_new)                   how much the old maximum over-estimated
    l = alpha * l + rowsum(P_ij)              running normaliser
    O_i = alpha * O_i + P_ij V_j              running (unnormalised) output

and at the end ``O_i / l`` and ``L_i = (m + log2 l) * ln 2`` (the natural log-sum-exp). Only ``O``
and ``L`` are kept. Backward recomputes ``P_ij = exp(scale * Q_i K_j^T - L_i)`` tile by tile with
``D_i = rowsum(dO_i * O_i)``::

    dV_j += P_ij^T dO_i      dP_ij = dO_i V_j^T      dS_ij = P_ij * (dP_ij - D_i)
    dQ_i += scale * dS_ij K_j                         dK_j += scale * dS_ij^T Q_i

No ``(T, T)`` matrix is ever formed: the largest temporary is one ``(block_m, block_n)`` tile.
"""

from __future__ import annotations

import math

import torch

from lmcore.kernels.common import LN2, LOG2E


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q, k, v, causal: bool, dtypes=FLOAT_DTYPES) -> None:
    """The contract both FlashAttention implementations share, checked before any work.

    ``q`` of shape ``(B, H, Tq, D)`` or ``(B, Tq, D)``; ``k, v`` the same leading dimensions and
    ``Tk`` rows, or ``H / G`` heads where each key/value head serves a group of ``G`` query heads
    (grouped-query attention); one floating dtype and one device; causal needs ``Tq <= Tk``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != q.dim() or x.dim() not in (3, 4):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (batch, heads, seq, head_dim) "
                             f"or (batch, seq, head_dim) like q {tuple(q.shape)}")
    if q.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"q has dtype {q.dtype}; supported dtypes are {names}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    grouped = q.dim() == 4 and k.shape[0] == q.shape[0] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0
    if k.shape[:-2] != v.shape[:-2] or not (k.shape[:-2] == q.shape[:-2] or grouped):
        raise ValueError(f"batch and heads must match (or q's heads be a multiple of k's and v's, grouped-query "
                         f"attention): q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same sequence length; got {k.shape[-2]} and {v.shape[-2]}")
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"q, k, v must share one head_dim; got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"sequence lengths must be positive; got q {q.shape[-2]}, k {k.shape[-2]}")
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"causal attention needs at least as many keys as queries (the queries are the "
                         f"last {q.shape[-2]} positions); got {q.shape[-2]} queries and {k.shape[-2]} keys")


def _tiles(n: int, block: int):
    """``(start, stop)`` of each tile of ``range(n)``; the last one may be short (the tail)."""
    return [(s, min(s + block, n)) for s in range(0, n, block)]


def _mask(i0: int, i1: int, j0: int, j1: int, offset: int, device) -> torch.Tensor:
    """Causal mask of the tile rows ``i0:i1`` x columns ``j0:j1`` (True = visible).

    Query ``i`` sits at position ``i + offset`` (``offset = Tk - Tq``) and sees keys ``j <= i + offset``.
    """
    rows = torch.arange(i0, i1, device=device)[:, None] + offset
    return torch.arange(j0, j1, device=device)[None, :] <= rows


def flash_forward_torch(q, k, v, causal: bool, scale: float, block_m: int = 64, block_n: int = 64):
    """Tiled forward; returns ``out`` (dtype of q) and ``L`` (float32, ``(B, H, Tq)``)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    off = t_k - t_q  # queries are the last t_q positions
    c = scale * LOG2E
    out = torch.empty_like(q)  # (B, H, Tq, D)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)  # (B, H, Tq)
    for i0, i1 in _tiles(t_q, block_m):
        qi = q[..., i0:i1, :].float()  # (B, H, bm, D)
        m = torch.full(qi.shape[:-1], -math.inf, device=q.device)  # (B, H, bm)
        l = torch.zeros_like(m)  # (B, H, bm)
        acc = torch.zeros_like(qi)  # (B, H, bm, D)
        for j0, j1 in _tiles(t_k, block_n):
            if causal and j0 > i1 - 1 + off:  # tile entirely above the diagonal: skipped
                break
            s = c * (qi @ k[..., j0:j1, :].float().transpose(-2, -1))  # (B, H, bm, bn)
            if causal and j1 - 1 > i0 + off:  # tile crosses the diagonal: mask it
                s = s.masked_fill(~_mask(i0, i1, j0, j1, off, q.device), -math.inf)
            m_new = torch.maximum(m, s.amax(-1))  # (B, H, bm)
            p = torch.exp2(s - m_new[..., None])  # (B, H, bm, bn)
            alpha = torch.exp2(m - m_new)  # (B, H, bm)
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + p @ v[..., j0:j1, :].float()  # (B, H, bm, D)
            m = m_new
        out[..., i0:i1, :] = (acc / l[..., None]).to(q.dtype)
        lse[..., i0:i1] = (m + torch.log2(l)) * LN2
    return out, lse


def flash_backward_torch(q, k, v, out, lse, dout, causal: bool, scale: float,
                         block_m: int = 64, block_n: int = 64):
    """Tiled backward from ``L``: recomputes each probability tile, returns ``dq, dk, dv``."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    off = t_k - t_q
    delta = (dout.float() * out.float()).sum(-1)  # (B, H, Tq): D_i = rowsum(dO * O)
    dq = torch.zeros_like(q, dtype=torch.float32)
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32)
    for j0, j1 in _tiles(t_k, block_n):
        kj, vj = k[..., j0:j1, :].float(), v[..., j0:j1, :].float()  # (B, H, bn, D)
        for i0, i1 in _tiles(t_q, block_m):
            if causal and j0 > i1 - 1 + off:
                continue
            qi, doi = q[..., i0:i1, :].float(), dout[..., i0:i1, :].float()  # (B, H, bm, D)
            s = scale * (qi @ kj.transpose(-2, -1))  # (B, H, bm, bn)
            if causal and j1 - 1 > i0 + off:
                s = s.masked_fill(~_mask(i0, i1, j0, j1, off, q.device), -math.inf)
            p = torch.exp(s - lse[..., i0:i1, None])  # (B, H, bm, bn)
            dv[..., j0:j1, :] += p.transpose(-2, -1) @ doi
            dp = doi @ vj.transpose(-2, -1)  # (B, H, bm, bn)
            ds = p * (dp - delta[..., i0:i1, None])  # (B, H, bm, bn)
            dq[..., i0:i1, :] += scale * (ds @ kj)
            dk[..., j0:j1, :] += scale * (ds.transpose(-2, -1) @ qi)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _repeat_kv(x, q):
    """``(B, Hkv, T, D)`` -> ``(B, H, T, D)`` with each head repeated for its group of query heads."""
    return x if x.dim() == 3 or x.shape[1] == q.shape[1] else x.repeat_interleave(q.shape[1] // x.shape[1], dim=1)


def _sum_groups(grad, kv_heads):
    """The gradient of ``_repeat_kv``: the sum over each group's copies."""
    if grad.dim() == 3 or grad.shape[1] == kv_heads:
        return grad
    b, h, t, d = grad.shape
    return grad.view(b, kv_heads, h // kv_heads, t, d).sum(2)


class FlashAttentionTorch(torch.autograd.Function):
    """FlashAttention-2 in plain PyTorch: ``FlashAttentionTorch.apply(q, k, v, causal, scale)``.

    ``q`` of shape ``(B, H, Tq, D)`` or ``(B, Tq, D)``, ``k, v`` likewise with ``Tk`` rows. Saves only
    ``q, k, v, out`` and ``L``; the backward recomputes probabilities tile by tile. Returns ``out``
    and ``L`` (natural log, fp32, shape ``q.shape[:-1]``; no gradient).
    """

    @staticmethod
    def forward(ctx, q, k, v, causal: bool = False, scale: float | None = None,
                block_m: int = 64, block_n: int = 64):
        check_inputs(q, k, v, causal)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        ctx.kv_heads = k.shape[1] if k.dim() == 4 else None
        k, v = _repeat_kv(k, q), _repeat_kv(v, q)  # grouped-query heads: each K, V head serves its group
        out, lse = flash_forward_torch(q, k, v, causal, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.blocks = causal, scale, (block_m, block_n)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward_torch(q, k, v, out, lse, dout, ctx.causal, ctx.scale, *ctx.blocks)
        dk, dv = _sum_groups(dk, ctx.kv_heads), _sum_groups(dv, ctx.kv_heads)
        return dq, dk, dv, None, None, None, None
