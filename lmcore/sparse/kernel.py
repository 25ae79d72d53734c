"""A block-sparse attention kernel in Triton that visits only the allowed key blocks.

Masking a dense ``Q K^T`` product sets entries to ``-inf`` *after* computing all of them, so it
saves nothing. This kernel instead gives each query tile a compact list of the key blocks it
may see (built once per layout by :func:`block_index`) and loops over that list only; the work
is proportional to the number of allowed blocks. It is a sibling of FlashAttention-2 (online
softmax, ``exp2`` with a ``log2(e)`` scale, recomputation in the backward pass):

- forward: per query tile, for each listed key block ``j``:
  ``S = Q K_j^T``, ``m' = max(m, rowmax S)``, ``P = exp(S - m')``,
  ``l = l e^{m - m'} + rowsum P``, ``O = O e^{m - m'} + P V_j``; finally ``O / l`` and
  ``LSE = m + log l``;
- backward: ``dV_j = sum_i P_ij^T dO_i`` and ``dK_j = sum_i dS_ij^T Q_i`` per key tile over the
  *column* list of query blocks that see it, ``dQ_i = sum_j dS_ij K_j`` over the row list, with
  ``P = exp(S - LSE)`` and ``dS = P (dO V^T - rowsum(dO * O))``.

Blocks carry a flag: 1 = on the causal diagonal, 2 = sliding-window edge (``|q - k| < window``),
4 = the ragged last block. Only flagged blocks pay for an element mask. A query row with no
allowed key gets output 0 and ``LSE = +inf`` (so its backward terms are 0, never NaN).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from lmcore.sparse.patterns import BlockLayout, num_blocks

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128, 256)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# The compact index: per query block the list of its key blocks, per key block its query blocks.


@dataclass
class BlockIndex:
    """Row and column lists of a layout, padded to the longest list, as int32 tensors."""

    row_idx: torch.Tensor  # (Lb, Lh, nq, max_row) key block of each entry
    row_flag: torch.Tensor  # (Lb, Lh, nq, max_row) mask flags of each entry
    row_cnt: torch.Tensor  # (Lb, Lh, nq) entries per row
    col_idx: torch.Tensor  # (Lb, Lh, nk, max_col)
    col_flag: torch.Tensor  # (Lb, Lh, nk, max_col)
    col_cnt: torch.Tensor  # (Lb, Lh, nk)
    window: int
    causal: bool

    def strides(self, batch: int, heads: int) -> tuple[int, int]:
        """Offsets (in rows) between batch elements and between heads; 0 where the layout is shared."""
        lb, lh, n = self.row_cnt.shape
        if lb not in (1, batch) or lh not in (1, heads):
            raise ValueError(f"a layout for (batch, heads) = ({lb}, {lh}) cannot serve inputs with "
                             f"batch={batch}, heads={heads}")
        return (lh * n if lb > 1 else 0), (n if lh > 1 else 0)


def _lists(blocks: torch.Tensor, flags: torch.Tensor):
    """Sort each row's allowed blocks first (stable, so in ascending order) and keep as many as the longest row."""
    cnt = blocks.sum(-1, dtype=torch.int32)
    width = max(int(cnt.max().item()) if cnt.numel() else 0, 1)
    order = torch.sort(blocks.to(torch.int16), dim=-1, descending=True, stable=True).indices[..., :width]
    return order.to(torch.int32).contiguous(), flags.gather(-1, order).to(torch.int32).contiguous(), cnt.contiguous()


def block_index(layout: BlockLayout, causal: bool = False, device=None) -> BlockIndex:
    """The compact index of ``layout`` (cached on the layout per causality and device)."""
    causal = bool(causal or layout.causal)
    device = torch.device(device) if device is not None else layout.blocks.device
    key = (causal, str(device))
    if key in layout._cache:
        return layout._cache[key]
    blocks, partial = layout.blocks.to(device), layout.partial.to(device)
    while blocks.dim() < 4:
        blocks, partial = blocks[None], partial[None]
    n = blocks.shape[-1]
    qb = torch.arange(n, device=device)[:, None]
    kb = torch.arange(n, device=device)[None, :]
    flags = partial.to(torch.int32) * 2
    if causal:
        blocks = blocks & (kb <= qb)
        flags = flags + (kb == qb).to(torch.int32)
    if layout.seq_len % layout.block_size:
        flags = flags + (kb == n - 1).to(torch.int32) * 4
    flags = flags.expand(blocks.shape)
    row = _lists(blocks, flags)
    col = _lists(blocks.transpose(-1, -2), flags.transpose(-1, -2))
    index = BlockIndex(*row, *col, window=int(layout.window), causal=causal)
    layout._cache[key] = index
    return index


# ---------------------------------------------------------------------------------------------
# Triton kernels.

if triton is not None:

    @triton.jit
    def _element_mask(offs_m, offs_n, flag, T, window):
        """(BLOCK_M, BLOCK_N) mask inside a flagged block: in range, causal if bit 1, in the band if bit 2."""
        d = offs_m[:, None] - offs_n[None, :]  # query minus key
        ok = offs_n[None, :] < T
        ok = ok & ((d >= 0) | ((flag & 1) == 0))
        ok = ok & (((d < window) & (d > -window)) | ((flag & 2) == 0))
        return ok

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, RowIdx, RowFlag, RowCnt,
                    H, T, qk_scale, window, stride_lb, stride_lh, MAX_ROW,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # late (causally heavy) query tiles first
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        base = bh.to(tl.int64) * T * HEAD_DIM
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
        row = b * stride_lb + h * stride_lh + (pid_m * BLOCK_M) // BLOCK_SIZE  # this tile's layout row
        cnt = tl.load(RowCnt + row)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (log2 units)
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
        for it in range(0, cnt * SUB):  # only the listed key blocks, in BLOCK_N-wide slices
            kb = tl.load(RowIdx + row * MAX_ROW + it // SUB)
            flag = tl.load(RowFlag + row * MAX_ROW + it // SUB)
            offs_n = kb * BLOCK_SIZE + (it % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_mask = offs_n[:, None] < T
            k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # S = Q K^T / sqrt(d), log2 units
            if flag != 0:
                s = tl.where(_element_mask(offs_m, offs_n, flag, T, window), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row so far: avoid inf - inf
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < T)
        tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, ColIdx, ColFlag, ColCnt,
                         H, T, qk_scale, sm_scale, window, stride_lb, stride_lh, MAX_COL,
                         BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        base = bh.to(tl.int64) * T * HEAD_DIM
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kv_mask = offs_n[:, None] < T
        k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        col = b * stride_lb + h * stride_lh + (pid_n * BLOCK_N) // BLOCK_SIZE
        cnt = tl.load(ColCnt + col)
        dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
        dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_M
        for it in range(0, cnt * SUB):  # the query blocks that see this key block
            qb = tl.load(ColIdx + col * MAX_COL + it // SUB)
            flag = tl.load(ColFlag + col * MAX_COL + it // SUB)
            offs_m = qb * BLOCK_SIZE + (it % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
            q_mask = offs_m[:, None] < T
            q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("inf"))
            delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # S^T (BLOCK_N, BLOCK_M)
            p_t = tl.math.exp2(s_t - lse[None, :])  # P^T = exp(S - LSE)^T
            if flag != 0:
                p_t = tl.where(tl.trans(_element_mask(offs_m, offs_n, flag, T, window)), p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # dV += P^T dO
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO V^T)^T
            ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T (dP^T - delta)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # dK += dS^T Q
        dk = dk * sm_scale
        tl.store(DK + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, RowIdx, RowFlag, RowCnt,
                       H, T, qk_scale, sm_scale, window, stride_lb, stride_lh, MAX_ROW,
                       BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # late (causally heavy) query tiles first
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        base = bh.to(tl.int64) * T * HEAD_DIM
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_mask = offs_m[:, None] < T
        q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
        row = b * stride_lb + h * stride_lh + (pid_m * BLOCK_M) // BLOCK_SIZE
        cnt = tl.load(RowCnt + row)
        dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
        for it in range(0, cnt * SUB):
            kb = tl.load(RowIdx + row * MAX_ROW + it // SUB)
            flag = tl.load(RowFlag + row * MAX_ROW + it // SUB)
            offs_n = kb * BLOCK_SIZE + (it % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_mask = offs_n[:, None] < T
            k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if flag != 0:
                p = tl.where(_element_mask(offs_m, offs_n, flag, T, window), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # dQ += dS K
        dq = dq * sm_scale
        tl.store(DQ + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# Tile sizes. A tile never crosses a layout block: BLOCK_M and BLOCK_N must divide block_size.
# On a GPU each kernel is autotuned over a few (BLOCK_M, BLOCK_N, num_warps, num_stages) per
# (block_size, head_dim, dtype); under the interpreter one small tile keeps the CPU tests fast
# and still exercises the loop over slices of a block.
GPU_CONFIGS: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
}


def _configs(kind: str):
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in GPU_CONFIGS[kind]]


def _prune(configs, named_args, **kwargs):
    """Keep tiles that fit inside one layout block (and at least one config)."""
    bs = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= bs and c.kwargs["BLOCK_N"] <= bs]
    if not kept:
        c = configs[0]
        kept = [triton.Config({"BLOCK_M": min(c.kwargs["BLOCK_M"], bs), "BLOCK_N": min(c.kwargs["BLOCK_N"], bs)},
                              num_warps=c.num_warps, num_stages=c.num_stages)]
    return kept


if triton is not None:
    _KEY = ["BLOCK_SIZE", "HEAD_DIM", "PRECISION"]
    _fwd = triton.autotune(_configs("fwd"), key=_KEY, prune_configs_by={"early_config_prune": _prune})(_fwd_kernel)
    _dkdv = triton.autotune(_configs("dkdv"), key=_KEY,
                            prune_configs_by={"early_config_prune": _prune})(_bwd_dkdv_kernel)
    _dq = triton.autotune(_configs("dq"), key=_KEY, prune_configs_by={"early_config_prune": _prune})(_bwd_dq_kernel)


def autotune_choices() -> dict:
    """The tile configuration picked per autotuning key so far, per kernel (for the benchmark's record)."""
    if triton is None:
        return {}
    out = {}
    for name, kernel in (("fwd", _fwd), ("dkdv", _dkdv), ("dq", _dq)):
        out[name] = {str(key): f"{cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
                     for key, cfg in getattr(kernel, "cache", {}).items()}
    return out


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index: BlockIndex, block_size: int, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        o = torch.empty_like(q)  # (B, H, T, D)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # log2 units
        slb, slh = index.strides(B, H)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        _fwd[grid](q, k, v, o, lse, index.row_idx, index.row_flag, index.row_cnt,
                   H, T, scale * LOG2E, index.window, slb, slh, index.row_idx.shape[-1],
                   BLOCK_SIZE=block_size, HEAD_DIM=D, PRECISION=_precision(q.dtype))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.index, ctx.block_size, ctx.scale = index, block_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        index, block_size, scale = ctx.index, ctx.block_size, ctx.scale
        do = do.contiguous()
        B, H, T, D = q.shape
        delta = (do.float() * o.float()).sum(-1)  # (B, H, T) rowsum(dO * O)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        slb, slh = index.strides(B, H)
        prec = _precision(q.dtype)
        _dkdv[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, index.col_idx, index.col_flag, index.col_cnt,
            H, T, scale * LOG2E, scale, index.window, slb, slh, index.col_idx.shape[-1],
            BLOCK_SIZE=block_size, HEAD_DIM=D, PRECISION=prec)
        _dq[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, index.row_idx, index.row_flag, index.row_cnt,
            H, T, scale * LOG2E, scale, index.window, slb, slh, index.row_idx.shape[-1],
            BLOCK_SIZE=block_size, HEAD_DIM=D, PRECISION=prec)
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------------------------
# Public entry points.


def _as_layout(layout, block_size: int | None, seq_len: int) -> BlockLayout:
    if isinstance(layout, BlockLayout):
        if block_size is not None and block_size != layout.block_size:
            raise ValueError(f"block_size={block_size} differs from the layout's block_size={layout.block_size}")
        if layout.seq_len != seq_len:
            raise ValueError(f"the layout was built for seq_len={layout.seq_len}, the inputs have {seq_len}")
        return layout
    if block_size is None:
        raise ValueError("block_size is required when the layout is a tensor")
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
        raise TypeError(f"layout must be a BlockLayout or a bool tensor, got {type(layout).__name__}")
    return BlockLayout(layout, block_size, seq_len)


def _check_inputs(q, k, v, block_size: int) -> None:
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"q, k, v must be (batch, heads, seq, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"block-sparse attention needs q, k, v of one shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[-1]} is not supported by the kernel; expected one of {HEAD_DIMS}")
    _check_block_size(block_size)


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size!r} must be a power of two >= 16 (the kernel's tile sizes)")


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, block_size: int | None = None,
                           causal: bool = False, scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Attention restricted to a block layout, computing only the allowed blocks.

    ``q, k, v``: ``(B, H, T, D)``. ``layout``: a :class:`BlockLayout` or a bool tensor
    ``(nq, nk)`` / ``(H, nq, nk)`` / ``(B, H, nq, nk)`` of allowed blocks. ``causal=True`` (or a
    causal layout) also masks keys after each query. ``impl``: ``"triton"``, ``"torch"`` (the
    gather version below, for CPUs without the interpreter) or ``"auto"`` (Triton on CUDA or
    under ``TRITON_INTERPRET=1``, else torch). Rows with no allowed key return 0.
    """
    T = q.shape[-2]
    if block_size is not None:
        _check_block_size(block_size)
    lay = _as_layout(layout, block_size, T)
    _check_inputs(q, k, v, lay.block_size)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "auto":
        impl = "triton" if triton is not None and (q.is_cuda or interpreting()) else "torch"
    if impl == "torch":
        return block_sparse_attention_torch(q, k, v, lay, causal=causal, scale=scale)
    if impl != "triton":
        raise ValueError(f"impl={impl!r}; expected 'auto', 'triton' or 'torch'")
    if triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    index = block_index(lay, causal, q.device)
    return _BlockSparseAttention.apply(q, k, v, index, lay.block_size, float(scale))


def block_sparse_attention_torch(q, k, v, layout: BlockLayout, causal: bool = False,
                                 scale: float | None = None) -> torch.Tensor:
    """The same computation in PyTorch: gather each query block's listed key blocks, attend, scatter.

    Work and memory are proportional to the longest row list, not to ``T^2``; autograd gives
    the backward pass. Readable, and the fallback where Triton cannot run.
    """
    B, H, T, D = q.shape
    bs = layout.block_size
    n = num_blocks(T, bs)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    index = block_index(layout, causal, q.device)
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
    s = (qb.float() @ k_sel.float().transpose(-1, -2)) * scale  # (B, H, n, bs, R*bs)
    q_pos = (torch.arange(n, device=q.device)[:, None] * bs + torch.arange(bs, device=q.device))  # (n, bs)
    k_pos = idx[..., None] * bs + torch.arange(bs, device=q.device)  # (B, H, n, R, bs)
    d = q_pos[None, None, :, :, None, None] - k_pos[:, :, :, None]  # (B, H, n, bs, R, bs) query - key
    fl = flag[:, :, :, None, :, None]  # (B, H, n, 1, R, 1)
    ok = valid[:, :, :, None, :, None] & (k_pos[:, :, :, None] < T)
    ok = ok & ((d >= 0) | ((fl & 1) == 0)) & ((d.abs() < index.window) | ((fl & 2) == 0))
    ok = ok.reshape(B, H, n, bs, R * bs)
    p = _masked_softmax(s, ok)
    out = (p @ v_sel.float()).reshape(B, H, n * bs, D)[:, :, :T]
    return out.to(q.dtype)


def _masked_softmax(s: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed entries; rows with none are 0 (with finite gradients)."""
    any_ok = ok.any(-1, keepdim=True)
    s = s.masked_fill(~ok, float("-inf")).masked_fill(~any_ok, 0.0)
    return torch.softmax(s, -1) * ok


def masked_attention(q, k, v, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense reference: full ``Q K^T`` (T x T work), then the element mask; empty rows give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, T)
    return (_masked_softmax(s, mask) @ v.float()).to(q.dtype)
