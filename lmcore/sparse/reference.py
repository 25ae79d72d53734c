"""Block-sparse attention in PyTorch: the same sparse work as the kernel, and the dense reference.

- :func:`block_sparse_attention_torch` gathers each query block's listed key blocks and attends
  to them only (work and memory proportional to the longest row list); autograd gives the
  backward pass. Readable, and the fallback where Triton cannot run.
- :func:`masked_attention` is the written-out dense math with the element mask (``T x T``
  work), served by lmcore's one reference attention,
  :func:`lmcore.nn.scaled_dot_product_attention`; everything sparse is checked against it.
"""

from __future__ import annotations

import math

import torch

from lmcore.nn.attention import scaled_dot_product_attention
from lmcore.sparse.index import block_index
from lmcore.sparse.patterns import BlockLayout, num_blocks


def block_sparse_attention_torch(q, k, v, layout: BlockLayout, causal: bool = False,
                                 scale: float | None = None) -> torch.Tensor:
    """Gather each query block's listed key blocks, attend to them with their element mask, scatter back."""
    B, H, T, D = q.shape
    bs = layout.block_size
    n = num_blocks(T, bs)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    index = block_index(layout, causal, q.device)
    index.strides(B, H)  # the layout's batch and heads must fit the inputs'
    pad = n * bs - T
    qp, kp, vp = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))  # (B, H, n*bs, D)
    Lb, Lh = index.row_cnt.shape[:2]
    idx = index.row_idx.expand(B if Lb == 1 else Lb, H if Lh == 1 else Lh, -1, -1).long()  # (B, H, n, R)
    flag = index.row_flag.expand(idx.shape)
    R = idx.shape[-1]
    valid = torch.arange(R, device=q.device) < index.row_cnt.expand(idx.shape[:-1])[..., None]  # (B, H, n, R)
    kb = kp.reshape(B, H, n, bs, D)
    vb = vp.reshape(B, H, n, bs, D)
    gather = idx.reshape(B, H, n * R, 1, 1).expand(-1, -1, -1, bs, D)
    k_sel = kb.gather(2, gather).reshape(B, H, n, R * bs, D)  # (B, H, n, R*bs, D)
    v_sel = vb.gather(2, gather).reshape(B, H, n, R * bs, D)
    qb = qp.reshape(B, H, n, bs, D)
    q_pos = (torch.arange(n, device=q.device)[:, None] * bs + torch.arange(bs, device=q.device))  # (n, bs)
    k_pos = idx[..., None] * bs + torch.arange(bs, device=q.device)  # (B, H, n, R, bs)
    d = q_pos[None, None, :, :, None, None] - k_pos[:, :, :, None]  # (B, H, n, bs, R, bs) query - key
    fl = flag[:, :, :, None, :, None]  # (B, H, n, 1, R, 1)
    ok = valid[:, :, :, None, :, None] & (k_pos[:, :, :, None] < T)
    ok = ok & ((d >= 0) | ((fl & 1) == 0)) & ((d.abs() < index.window) | ((fl & 2) == 0))
    ok = ok.reshape(B, H, n, bs, R * bs)
    out = scaled_dot_product_attention(qb.float(), k_sel.float(), v_sel.float(), ok, scale)  # (B, H, n, bs, D)
    return out.reshape(B, H, n * bs, D)[:, :, :T].to(q.dtype)


def masked_attention(q, k, v, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense reference in float32: full ``Q K^T`` (T x T work), then the element mask; empty rows give 0."""
    return scaled_dot_product_attention(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)


def block_sparse_attention_reference(q, k, v, layout: BlockLayout, causal: bool = False,
                                     scale: float | None = None) -> torch.Tensor:
    """:func:`masked_attention` with the layout's element mask (also causal when ``causal``)."""
    mask = layout.element_mask().to(q.device)  # (..., T, T)
    if causal:
        mask = mask & torch.ones(mask.shape[-2:], dtype=torch.bool, device=q.device).tril()
    return masked_attention(q, k, v, mask, scale)
