"""A block-sparse attention kernel in Triton that visits only the allowed key blocks.

Masking a dense ``Q K^T`` product sets entries to ``-inf`` *after* computing all of them, so it
saves nothing. This kernel instead gives each query tile a compact list of the key blocks it
may see (built once per layout by :func:`lmcore.sparse.index.block_index`) and loops over that
list only; the work is proportional to the number of allowed blocks. It is a sibling of
FlashAttention-2 (online softmax, ``exp2`` with a ``log2(e)`` scale, recomputation in the
backward pass):

- forward: per query tile, for each listed key block ``j``:
  ``S = Q K_j^T``, ``m' = max(m, rowmax S)``, ``P = exp(S - m')``,
  ``l = l e^{m - m'} + rowsum P``, ``O = O e^{m - m'} + P V_j``; finally ``O / l`` and
  ``LSE = m + log l``;
- backward: ``delta = rowsum(dO * O)`` (a small kernel), then ``dV_j = sum_i P_ij^T dO_i`` and
  ``dK_j = sum_i dS_ij^T Q_i`` per key tile over the *column* list of query blocks that see it,
  and ``dQ_i = sum_j dS_ij K_j`` over the row list, with ``P = exp(S - LSE)`` and
  ``dS = P (dO V^T - delta)``.

Each list holds its full blocks first and its flagged edge blocks (causal diagonal, window edge,
ragged end) after them: every kernel runs two loops, the first without any mask or bounds check,
the second with the element mask, so only edge blocks pay for masking (as the dense kernel's
separate diagonal stage does). Inside a diagonal block, key slices entirely above a query slice
are skipped. A query row with no allowed key gets output 0 and ``LSE = +inf`` (so its backward
terms are 0, never NaN).
"""

from __future__ import annotations

import math

import torch

from lmcore.kernels.common import (LOG2E, autotune_bench, head_class, interpreting, precision, rowsum_delta,
                                   seq_bucket, triton)
from lmcore.sparse.index import BlockIndex, block_index
from lmcore.sparse.patterns import BlockLayout
from lmcore.sparse.reference import block_sparse_attention_reference, block_sparse_attention_torch

if triton is not None:
    import triton.language as tl

HEAD_DIMS = (16, 32, 64, 128, 256)

#: The implementations every sparse attention function takes as ``impl``: ``"triton"`` the Triton
#: kernels, ``"torch"`` PyTorch doing the same sparse work (gathering the listed blocks),
#: ``"reference"`` dense attention written out with the element mask (``T x T`` work), and
#: ``"auto"`` Triton on a GPU or under ``TRITON_INTERPRET=1``, else torch.
IMPLS = ("auto", "triton", "torch", "reference")


# ---------------------------------------------------------------------------------------------
# Triton kernels.

if triton is not None:

    @triton.jit
    def _keep(Flag, entry, q_pos, k_pos, T, window):
        """Element mask inside the flagged block at list position ``entry`` (``q_pos``, ``k_pos``
        broadcast to the tile's shape): key in range, causal if bit 1, inside the band if bit 2."""
        flag = tl.load(Flag + entry)
        d = q_pos - k_pos  # query minus key
        ok = k_pos < T
        ok = ok & ((d >= 0) | ((flag & 1) == 0))
        ok = ok & (((d < window) & (d > -window)) | ((flag & 2) == 0))
        return ok

    @triton.jit
    def _slice(A, B, base, Idx, lst, it, offs_d, T, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr,
               HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
        """Slice ``it`` of the list at ``lst`` (BLOCK rows of the block at entry ``it // SUB``): that
        entry, the slice's positions and its rows of ``A`` and ``B``; on edge blocks, rows past the
        end read as 0."""
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK
        entry = lst + it // SUB
        blk = tl.load(Idx + entry)
        offs = blk * BLOCK_SIZE + (it % SUB) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        ptrs = base + offs[:, None] * HEAD_DIM + offs_d[None, :]
        if MASKED:
            a = tl.load(A + ptrs, mask=offs[:, None] < T, other=0.0)  # (BLOCK, D)
            b = tl.load(B + ptrs, mask=offs[:, None] < T, other=0.0)
        else:
            a = tl.load(A + ptrs)
            b = tl.load(B + ptrs)
        return entry, offs, a, b

    @triton.jit
    def _query_tile(RowFlag, RowCnt, RowFull, H, T, stride_lb, stride_lh, MAX_ROW, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """This program's query tile (late, causally heavy tiles first): its (batch, head), offset
        of that head's rows, positions, and row list, whose slices ``0 .. mid`` are full blocks and
        ``mid .. hi`` edge blocks."""
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
        base = bh.to(tl.int64) * T * HEAD_DIM
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row = (bh // H) * stride_lb + (bh % H) * stride_lh + (pid_m * BLOCK_M) // BLOCK_SIZE  # layout row
        lst = row.to(tl.int64) * MAX_ROW
        cnt = tl.load(RowCnt + row)
        full = tl.load(RowFull + row)
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
        # a causal diagonal block is the last entry: skip its key slices wholly above this tile
        last_flag = tl.load(RowFlag + lst + cnt - 1, mask=cnt > full, other=0)
        r_last = (pid_m * BLOCK_M) % BLOCK_SIZE + BLOCK_M - 1  # this tile's last row inside its block
        hi = cnt * SUB - tl.where((last_flag & 1) != 0, SUB - 1 - r_last // BLOCK_N, 0)
        return bh, base, offs_m, lst, full * SUB, hi

    @triton.jit
    def _fwd_inner(acc, m_i, l_i, q, K, V, base, Idx, Flag, lst, lo, hi, offs_m, offs_d, T, qk_scale, window,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """Online softmax over the BLOCK_N-wide key slices ``lo .. hi`` of the list at ``lst``."""
        for it in range(lo, hi):
            entry, offs_n, k, v = _slice(K, V, base, Idx, lst, it, offs_d, T, BLOCK_SIZE, BLOCK_N, HEAD_DIM,
                                         MASKED)  # (BN,), (BN, D), (BN, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN) Q K^T, unscaled
            if MASKED:
                s = tl.where(_keep(Flag, entry, offs_m[:, None], offs_n[None, :], T, window),
                             s, float("-inf"))
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
        bh, base, offs_m, lst, mid, hi = _query_tile(RowFlag, RowCnt, RowFull, H, T, stride_lb, stride_lh,
                                                     MAX_ROW, BLOCK_SIZE, BLOCK_M, BLOCK_N, HEAD_DIM)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (log2 units)
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        # stage 1: full blocks, no mask; stage 2: edge blocks (diagonal, window edge, ragged end)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, base, RowIdx, RowFlag, lst, 0, mid,
                                   offs_m, offs_d, T, qk_scale, window, BLOCK_SIZE, BLOCK_N, HEAD_DIM,
                                   False, PRECISION)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, base, RowIdx, RowFlag, lst, mid, hi,
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
        for it in range(lo, hi):
            entry, offs_m, q, do = _slice(Q, DO, base, Idx, lst, it, offs_d, T, BLOCK_SIZE, BLOCK_M, HEAD_DIM,
                                          MASKED)  # (BM,), (BM, D), (BM, D)
            if MASKED:  # rows past the end: q = dO = 0 and LSE = +inf, so P = 0
                lse = tl.load(LSE + row_base + offs_m, mask=offs_m < T, other=float("inf"))
                delta = tl.load(Delta + row_base + offs_m, mask=offs_m < T, other=0.0)
            else:
                lse = tl.load(LSE + row_base + offs_m)
                delta = tl.load(Delta + row_base + offs_m)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # S^T (BN, BM), unscaled
            p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # P^T = exp(S - LSE)^T
            if MASKED:
                p_t = tl.where(_keep(Flag, entry, offs_m[None, :], offs_n[:, None], T, window), p_t, 0.0)
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
        for it in range(lo, hi):
            entry, offs_n, k, v = _slice(K, V, base, Idx, lst, it, offs_d, T, BLOCK_SIZE, BLOCK_N, HEAD_DIM,
                                         MASKED)  # (BN,), (BN, D), (BN, D)
            p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
            if MASKED:
                p = tl.where(_keep(Flag, entry, offs_m[:, None], offs_n[None, :], T, window), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # dQ += dS K
        return dq

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, RowIdx, RowFlag, RowCnt, RowFull,
                       H, T, qk_scale, sm_scale, window, stride_lb, stride_lh, MAX_ROW, SEQ_BUCKET,
                       BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        bh, base, offs_m, lst, mid, hi = _query_tile(RowFlag, RowCnt, RowFull, H, T, stride_lb, stride_lh,
                                                     MAX_ROW, BLOCK_SIZE, BLOCK_M, BLOCK_N, HEAD_DIM)
        offs_d = tl.arange(0, HEAD_DIM)
        q_mask = offs_m[:, None] < T
        q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
        dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, base, RowIdx, RowFlag, lst, 0, mid, offs_m, offs_d,
                       T, qk_scale, window, BLOCK_SIZE, BLOCK_N, HEAD_DIM, False, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, base, RowIdx, RowFlag, lst, mid, hi, offs_m, offs_d,
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


# ---------------------------------------------------------------------------------------------
# The host side: what a call needs is worked out once per layout, shape, dtype and device.


class _Plan:
    """What the kernels need for one layout, input shape, dtype and device, checked once and kept
    on the layout: the compact index, its strides for these batch and heads, the compile-time
    constants and, once the autotuner has picked the tiles of a kernel, its grid and launch options.
    A call that finds its plan does no checking, builds no index and reads nothing back from the GPU.
    """

    def __init__(self, index: BlockIndex, block_size: int, shape: torch.Size, dtype: torch.dtype):
        B, H, T, D = shape
        self.strides = index.strides(B, H)  # raises if the layout does not fit these inputs
        self.heads, self.seq, self.batch_heads = H, T, B * H
        self.window, self.bucket = index.window, seq_bucket(T)
        self.rows = (index.row_idx, index.row_flag, index.row_cnt, index.row_full)
        self.cols = (index.col_idx, index.col_flag, index.col_cnt, index.col_full)
        self.max_row, self.max_col = index.row_idx.shape[-1], index.col_idx.shape[-1]
        self.consts = {"BLOCK_SIZE": block_size, "HEAD_DIM": D, "PRECISION": precision(dtype)}
        self.launches: dict[str, tuple] = {}  # kernel name -> (grid, keyword arguments)

    def launch(self, name: str, kernel, tiles: str, *args) -> None:
        """Run ``kernel`` over a grid of ``tiles``-sized tiles: through its autotuner the first
        time (which tunes or looks up the tile sizes), then straight with the tiles it picked."""
        known = self.launches.get(name)
        if known is not None:
            kernel.fn[known[0]](*args, **known[1])
            return
        kernel[lambda meta: (triton.cdiv(self.seq, meta[tiles]), self.batch_heads)](*args, **self.consts)
        cfg = kernel.best_config
        grid = (triton.cdiv(self.seq, cfg.kwargs[tiles]), self.batch_heads)
        self.launches[name] = (grid, {**self.consts, **cfg.all_kwargs()})


def _plan(lay: BlockLayout, q, k, v, causal: bool) -> _Plan:
    """The plan of a call, from the layout's cache, or checked and built on the first call."""
    key = ("plan", bool(causal), q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device)
    plan = lay._cache.get(key)
    if plan is None:
        _check_inputs(q, k, v, lay.block_size)
        plan = _Plan(block_index(lay, causal, q.device), lay.block_size, q.shape, q.dtype)
        lay._cache[key] = plan
    return plan


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty_like(q)  # (B, H, T, D)
        lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)  # (B, H, T) log2 units
        p = plan
        p.launch("fwd", _fwd, "BLOCK_M", q, k, v, o, lse, *p.rows, p.heads, p.seq, scale * LOG2E, p.window,
                 *p.strides, p.max_row, p.bucket)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.scale = plan, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        p, scale = ctx.plan, ctx.scale
        do = do.contiguous()
        delta = rowsum_delta(o, do)  # (B, H, T) rowsum(dO * O), float32
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (p.heads, p.seq, scale * LOG2E, scale, p.window, *p.strides)
        p.launch("dkdv", _dkdv, "BLOCK_N", q, k, v, do, lse, delta, dk, dv, *p.cols, *common, p.max_col, p.bucket)
        p.launch("dq", _dq, "BLOCK_M", q, k, v, do, lse, delta, dq, *p.rows, *common, p.max_row, p.bucket)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------------------------------------
# Public entry point.


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
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"block-sparse attention needs q, k, v of one dtype; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[-1]} is not supported by the kernel; expected one of {HEAD_DIMS}")
    _check_block_size(block_size)


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size!r} must be a power of two >= 16 (the kernel's tile sizes)")


def resolve_impl(impl: str, on_gpu: bool) -> str:
    """``impl`` checked against :data:`IMPLS`, with ``"auto"`` made concrete."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {', '.join(map(repr, IMPLS))} ('triton': the Triton "
                         "kernels, 'torch': the same sparse work in PyTorch, 'reference': dense attention "
                         "with the element mask)")
    if impl == "auto":
        return "triton" if triton is not None and (on_gpu or interpreting()) else "torch"
    return impl


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, block_size: int | None = None,
                           causal: bool = False, scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Attention restricted to a block layout, computing only the allowed blocks.

    ``q, k, v``: ``(B, H, T, D)``. ``layout``: a :class:`BlockLayout` or a bool tensor
    ``(nq, nk)`` / ``(H, nq, nk)`` / ``(B, H, nq, nk)`` of allowed blocks. ``causal=True`` (or a
    causal layout) also masks keys after each query. ``impl``: one of :data:`IMPLS` (``"triton"``,
    ``"torch"``, ``"reference"`` or ``"auto"``). Rows with no allowed key return 0.

    Pass the same :class:`BlockLayout` object on every call: the compact index and the launch
    plan of each input shape are kept on it, so repeated calls do no host-side preparation.
    """
    if block_size is not None:
        _check_block_size(block_size)
    lay = _as_layout(layout, block_size, q.shape[-2])
    impl = resolve_impl(impl, q.is_cuda)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' needs the triton package")
        return _BlockSparseAttention.apply(q, k, v, _plan(lay, q, k, v, causal), float(scale))
    _check_inputs(q, k, v, lay.block_size)
    fn = block_sparse_attention_torch if impl == "torch" else block_sparse_attention_reference
    return fn(q, k, v, lay, causal=causal, scale=scale)
