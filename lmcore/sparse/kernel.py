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
- backward: ``delta = rowsum(dO * O)`` (a small kernel), then ``dV_j = sum_i P_ij^T dO_i`` and
  ``dK_j = sum_i dS_ij^T Q_i`` per key tile over the *column* list of query blocks that see it,
  and ``dQ_i = sum_j dS_ij K_j`` over the row list, with ``P = exp(S - LSE)`` and
  ``dS = P (dO V^T - delta)``.

Blocks carry a flag: 1 = on the causal diagonal, 2 = sliding-window edge (``|q - k| < window``),
4 = touches the ragged end of the sequence. Each list holds its unflagged ("full") blocks first
and its flagged ("edge") blocks after them, with the number of full ones: every kernel runs two
loops, the first without any mask or bounds check, the second with the element mask, so only
edge blocks pay for masking (as the dense kernel's separate diagonal stage does). Inside a
diagonal block, key slices entirely above a query slice are skipped. A query row with no
allowed key gets output 0 and ``LSE = +inf`` (so its backward terms are 0, never NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmcore.kernels.common import (LOG2E, autotune_bench, head_class, interpreting, precision, rowsum_delta,
                                   seq_bucket, triton)
from lmcore.sparse.patterns import BlockLayout, num_blocks

if triton is not None:
    import triton.language as tl

HEAD_DIMS = (16, 32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------
# The compact index: per query block the list of its key blocks, per key block its query blocks.


@dataclass
class BlockIndex:
    """Row and column lists of a layout, padded to the longest list, as int32 tensors.

    In every list the full (unflagged) blocks come first, in ascending order, then the flagged
    edge blocks, in ascending order; ``*_full`` counts the former, ``*_cnt`` all entries.
    """

    row_idx: torch.Tensor  # (Lb, Lh, nq, max_row) key block of each entry
    row_flag: torch.Tensor  # (Lb, Lh, nq, max_row) mask flags of each entry
    row_cnt: torch.Tensor  # (Lb, Lh, nq) entries per row
    row_full: torch.Tensor  # (Lb, Lh, nq) unflagged entries per row (listed first)
    col_idx: torch.Tensor  # (Lb, Lh, nk, max_col)
    col_flag: torch.Tensor  # (Lb, Lh, nk, max_col)
    col_cnt: torch.Tensor  # (Lb, Lh, nk)
    col_full: torch.Tensor  # (Lb, Lh, nk)
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
    """Per row: full allowed blocks, then flagged allowed blocks (each ascending), cut to the longest row."""
    cnt = blocks.sum(-1, dtype=torch.int32)
    full = (blocks & (flags == 0)).sum(-1, dtype=torch.int32)
    width = max(int(cnt.max().item()) if cnt.numel() else 0, 1)
    rank = torch.where(blocks, (flags != 0).to(torch.int16), torch.full_like(flags, 2, dtype=torch.int16))
    order = torch.sort(rank, dim=-1, stable=True).indices[..., :width]  # 0 full, 1 edge, 2 not allowed
    idx = order.to(torch.int32).contiguous()
    flag = flags.gather(-1, order).to(torch.int32).contiguous()
    return idx, flag, cnt.contiguous(), full.contiguous()


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
    if layout.seq_len % layout.block_size:  # the last block, as keys or as queries, is ragged
        flags = flags + ((kb == n - 1) | (qb == n - 1)).to(torch.int32) * 4
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
    def _keep(q_pos, k_pos, flag, T, window):
        """Element mask inside a flagged block (``q_pos``, ``k_pos`` broadcast to the tile's shape):
        key in range, causal if bit 1, inside the band if bit 2."""
        d = q_pos - k_pos  # query minus key
        ok = k_pos < T
        ok = ok & ((d >= 0) | ((flag & 1) == 0))
        ok = ok & (((d < window) & (d > -window)) | ((flag & 2) == 0))
        return ok

    @triton.jit
    def _fwd_inner(acc, m_i, l_i, q, K, V, base, Idx, Flag, lst, lo, hi, offs_m, offs_d, T, qk_scale, window,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """Online softmax over the BLOCK_N-wide key slices ``lo .. hi`` of the list at ``lst``."""
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
        offs_n0 = tl.arange(0, BLOCK_N)
        for it in range(lo, hi):
            kb = tl.load(Idx + lst + it // SUB)
            offs_n = kb * BLOCK_SIZE + (it % SUB) * BLOCK_N + offs_n0  # (BN,)
            ptrs = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
            if MASKED:  # edge block: keys past the end read as 0 and are masked below
                k = tl.load(K + ptrs, mask=offs_n[:, None] < T, other=0.0)  # (BN, D)
                v = tl.load(V + ptrs, mask=offs_n[:, None] < T, other=0.0)
            else:
                k = tl.load(K + ptrs)
                v = tl.load(V + ptrs)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN) Q K^T, unscaled
            if MASKED:
                flag = tl.load(Flag + lst + it // SUB)
                s = tl.where(_keep(offs_m[:, None], offs_n[None, :], flag, T, window), s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units (qk_scale > 0)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: no inf - inf
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                m_use = m_new
            p = tl.math.exp2(s * qk_scale - m_use[:, None])  # P = exp2(c S - m'): one multiply-add
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # O' = a O + P V
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, RowIdx, RowFlag, RowCnt, RowFull,
                    H, T, qk_scale, window, stride_lb, stride_lh, MAX_ROW, SEQ_BUCKET,
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
        lst = row.to(tl.int64) * MAX_ROW
        cnt = tl.load(RowCnt + row)
        full = tl.load(RowFull + row)
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
        # a causal diagonal block is the last entry: skip its key slices wholly above this tile
        last_flag = tl.load(RowFlag + lst + cnt - 1, mask=cnt > full, other=0)
        r_last = (pid_m * BLOCK_M) % BLOCK_SIZE + BLOCK_M - 1  # this tile's last row inside its block
        hi = cnt * SUB - tl.where((last_flag & 1) != 0, SUB - 1 - r_last // BLOCK_N, 0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (log2 units)
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        # stage 1: full blocks, no mask; stage 2: edge blocks (diagonal, window edge, ragged end)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, base, RowIdx, RowFlag, lst, 0, full * SUB,
                                   offs_m, offs_d, T, qk_scale, window, BLOCK_SIZE, BLOCK_N, HEAD_DIM,
                                   False, PRECISION)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, base, RowIdx, RowFlag, lst, full * SUB, hi,
                                   offs_m, offs_d, T, qk_scale, window, BLOCK_SIZE, BLOCK_N, HEAD_DIM,
                                   True, PRECISION)
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < T)
        tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta, base, row_base, Idx, Flag, lst, lo, hi, offs_n, offs_d,
                    T, qk_scale, window, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """Accumulate dK, dV of one key tile over the BLOCK_M-high query slices ``lo .. hi`` (with P^T)."""
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_M
        offs_m0 = tl.arange(0, BLOCK_M)
        for it in range(lo, hi):
            qb = tl.load(Idx + lst + it // SUB)
            offs_m = qb * BLOCK_SIZE + (it % SUB) * BLOCK_M + offs_m0  # (BM,)
            ptrs = base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
            if MASKED:  # rows past the end: q = dO = 0 and LSE = +inf, so P = 0
                q = tl.load(Q + ptrs, mask=offs_m[:, None] < T, other=0.0)  # (BM, D)
                do = tl.load(DO + ptrs, mask=offs_m[:, None] < T, other=0.0)
                lse = tl.load(LSE + row_base + offs_m, mask=offs_m < T, other=float("inf"))
                delta = tl.load(Delta + row_base + offs_m, mask=offs_m < T, other=0.0)
            else:
                q = tl.load(Q + ptrs)
                do = tl.load(DO + ptrs)
                lse = tl.load(LSE + row_base + offs_m)
                delta = tl.load(Delta + row_base + offs_m)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # S^T (BN, BM), unscaled
            p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # P^T = exp(S - LSE)^T
            if MASKED:
                flag = tl.load(Flag + lst + it // SUB)
                p_t = tl.where(_keep(offs_m[None, :], offs_n[:, None], flag, T, window), p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)  # dV += P^T dO
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO V^T)^T
            ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T (dP^T - delta)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)  # dK += dS^T Q
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, ColIdx, ColFlag, ColCnt, ColFull,
                         H, T, qk_scale, sm_scale, window, stride_lb, stride_lh, MAX_COL, SEQ_BUCKET,
                         BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        base = bh.to(tl.int64) * T * HEAD_DIM
        row_base = bh.to(tl.int64) * T
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kv_mask = offs_n[:, None] < T
        k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        col = b * stride_lb + h * stride_lh + (pid_n * BLOCK_N) // BLOCK_SIZE
        lst = col.to(tl.int64) * MAX_COL
        cnt = tl.load(ColCnt + col)
        full = tl.load(ColFull + col)
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_M
        # a causal diagonal block is the first edge entry: skip its query slices wholly before this tile
        first_flag = tl.load(ColFlag + lst + full, mask=cnt > full, other=0)
        c_first = (pid_n * BLOCK_N) % BLOCK_SIZE  # this tile's first key inside its block
        lo = full * SUB + tl.where((first_flag & 1) != 0, c_first // BLOCK_M, 0)
        dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
        dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta, base, row_base, ColIdx, ColFlag, lst, 0, full * SUB,
                             offs_n, offs_d, T, qk_scale, window, BLOCK_SIZE, BLOCK_M, HEAD_DIM, False, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta, base, row_base, ColIdx, ColFlag, lst, lo, cnt * SUB,
                             offs_n, offs_d, T, qk_scale, window, BLOCK_SIZE, BLOCK_M, HEAD_DIM, True, PRECISION)
        dk = dk * sm_scale
        tl.store(DK + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, K, V, base, Idx, Flag, lst, lo, hi, offs_m, offs_d, T, qk_scale, window,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """Accumulate dQ of one query tile over the key slices ``lo .. hi``."""
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
        offs_n0 = tl.arange(0, BLOCK_N)
        for it in range(lo, hi):
            kb = tl.load(Idx + lst + it // SUB)
            offs_n = kb * BLOCK_SIZE + (it % SUB) * BLOCK_N + offs_n0
            ptrs = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
            if MASKED:
                k = tl.load(K + ptrs, mask=offs_n[:, None] < T, other=0.0)  # (BN, D)
                v = tl.load(V + ptrs, mask=offs_n[:, None] < T, other=0.0)
            else:
                k = tl.load(K + ptrs)
                v = tl.load(V + ptrs)
            p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
            if MASKED:
                flag = tl.load(Flag + lst + it // SUB)
                p = tl.where(_keep(offs_m[:, None], offs_n[None, :], flag, T, window), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # dQ += dS K
        return dq

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, RowIdx, RowFlag, RowCnt, RowFull,
                       H, T, qk_scale, sm_scale, window, stride_lb, stride_lh, MAX_ROW, SEQ_BUCKET,
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
        lst = row.to(tl.int64) * MAX_ROW
        cnt = tl.load(RowCnt + row)
        full = tl.load(RowFull + row)
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
        last_flag = tl.load(RowFlag + lst + cnt - 1, mask=cnt > full, other=0)
        r_last = (pid_m * BLOCK_M) % BLOCK_SIZE + BLOCK_M - 1
        hi = cnt * SUB - tl.where((last_flag & 1) != 0, SUB - 1 - r_last // BLOCK_N, 0)
        dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, base, RowIdx, RowFlag, lst, 0, full * SUB, offs_m, offs_d,
                       T, qk_scale, window, BLOCK_SIZE, BLOCK_N, HEAD_DIM, False, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, base, RowIdx, RowFlag, lst, full * SUB, hi, offs_m, offs_d,
                       T, qk_scale, window, BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, PRECISION)
        dq = dq * sm_scale
        tl.store(DQ + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# Tile sizes: (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel and head-dim class
# ("small": head_dim <= 64, "large": above), led by the winners of the dense kernel's sweep on an
# H100 (lmcore.kernels); a tile never crosses a layout block, so BLOCK_M and BLOCK_N must divide
# block_size. On a GPU each kernel is autotuned over its class's candidates per (block_size,
# head_dim, dtype, sequence-length bucket). Under the interpreter one small tile keeps the CPU
# tests fast and still exercises the loop over slices of a block.
GPU_CONFIGS: dict[str, dict[str, list[tuple[int, int, int, int]]]] = {
    "fwd": {"small": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3)],
            "large": [(128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4)]},
    "dkdv": {"small": [(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (32, 128, 4, 3)],
             "large": [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 2)]},
    "dq": {"small": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
           "large": [(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 3)]},
}


def _configs(kind: str):
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    seen = []
    for group in GPU_CONFIGS[kind].values():
        seen += [e for e in group if e not in seen]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in seen]


def _pruner(kind: str):
    """Keep the candidates of the call's head-dim class whose tiles fit inside one layout block."""

    def prune(configs, named_args, **kwargs):
        bs = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
        if interpreting():
            return configs
        hd = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        wanted = set(GPU_CONFIGS[kind][head_class(hd)])
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= bs and c.kwargs["BLOCK_N"] <= bs
                and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        if not kept:
            bm, bn, w, st = GPU_CONFIGS[kind][head_class(hd)][0]
            kept = [triton.Config({"BLOCK_M": min(bm, bs), "BLOCK_N": min(bn, bs)}, num_warps=w, num_stages=st)]
        return kept

    return prune


if triton is not None:
    _KEY = ["BLOCK_SIZE", "HEAD_DIM", "PRECISION", "SEQ_BUCKET"]

    def _tuned(kind, fn):
        return triton.autotune(_configs(kind), key=_KEY, do_bench=autotune_bench,
                               prune_configs_by={"early_config_prune": _pruner(kind)})(fn)

    _fwd = _tuned("fwd", _fwd_kernel)
    _dkdv = _tuned("dkdv", _bwd_dkdv_kernel)
    _dq = _tuned("dq", _bwd_dq_kernel)


def autotune_choices() -> dict:
    """The tile configuration picked per autotuning key so far, per kernel (for the benchmark's record)."""
    if triton is None:
        return {}
    out = {}
    for name, kernel in (("fwd", _fwd), ("dkdv", _dkdv), ("dq", _dq)):
        out[name] = {str(tuple(k for k in key if "torch." not in str(k))):
                     f"{cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
                     for key, cfg in getattr(kernel, "cache", {}).items()}
    return out


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index: BlockIndex, block_size: int, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        o = torch.empty_like(q)  # (B, H, T, D)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # (B, H, T) log2 units
        slb, slh = index.strides(B, H)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        _fwd[grid](q, k, v, o, lse, index.row_idx, index.row_flag, index.row_cnt, index.row_full,
                   H, T, scale * LOG2E, index.window, slb, slh, index.row_idx.shape[-1], seq_bucket(T),
                   BLOCK_SIZE=block_size, HEAD_DIM=D, PRECISION=precision(q.dtype))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.index, ctx.block_size, ctx.scale = index, block_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        index, block_size, scale = ctx.index, ctx.block_size, ctx.scale
        do = do.contiguous()
        B, H, T, D = q.shape
        delta = rowsum_delta(o, do)  # (B, H, T) rowsum(dO * O), float32
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        slb, slh = index.strides(B, H)
        prec, bucket = precision(q.dtype), seq_bucket(T)
        _dkdv[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, index.col_idx, index.col_flag, index.col_cnt, index.col_full,
            H, T, scale * LOG2E, scale, index.window, slb, slh, index.col_idx.shape[-1], bucket,
            BLOCK_SIZE=block_size, HEAD_DIM=D, PRECISION=prec)
        _dq[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, index.row_idx, index.row_flag, index.row_cnt, index.row_full,
            H, T, scale * LOG2E, scale, index.window, slb, slh, index.row_idx.shape[-1], bucket,
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
