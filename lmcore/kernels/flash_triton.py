"""FlashAttention-2 as Triton kernels: a forward, and a backward in two passes (dK/dV, then dQ).

Each block is tied to an equation of chapter 4 (the same ones ``flash_torch`` spells out):

* forward: one program per (query tile, batch*head); online softmax in base 2 with
  ``c = scale * log2(e)``. Key tiles wholly above the causal diagonal are never visited; stage 1
  runs the tiles where every key is visible without any mask, stage 2 the diagonal and ragged-end
  tiles with the element mask. Only ``O`` and ``L = log sum exp`` (natural log) are written.
* backward: ``D = rowsum(dO * O)`` (``common.rowsum_delta``); one program per key tile iterates
  over the query tiles that see it and accumulates ``dK, dV`` in registers; one program per query
  tile iterates over key tiles and accumulates ``dQ``. Nothing of size ``T x T`` is stored.

Tile sizes, warps and pipeline stages are autotuned per head dimension, causal flag, dtype and
sequence-length bucket (``flash_tuning`` widens, narrows or forces the candidates). On Hopper GPUs
the forward may run the warp-specialized kernel of ``flash_hopper`` instead, where it is faster.
Under ``TRITON_INTERPRET=1`` (CPU) one small configuration is used.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lmcore.kernels import flash_hopper
from lmcore.kernels.flash_torch import check_inputs
from lmcore.kernels.common import (LOG2E, autotune_bench, head_class, interpreting, precision, rowsum_delta,
                                   seq_bucket)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


# ----------------------------------------------------------------------------- tuning
# (BLOCK_M, BLOCK_N, warps, stages) per kernel and head-dim class, from sweeps on an H100 and H200
# (``flash_tuning(candidates="wide")`` times the larger grid below).
CANDIDATES = {
    "fwd": {"small": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)],
            "large": [(128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4)],
            "fp32": [(64, 32, 4, 2)]},
    "dkdv": {"small": [(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2)],
             "large": [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3)],
             "fp32": [(32, 64, 4, 2)]},
    "dq": {"small": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
           "large": [(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
           "fp32": [(64, 32, 4, 2)]},
}
_WIDE_SIZES = {"fwd": ((64, 128), (64, 128)), "dkdv": ((32, 64), (64, 128)), "dq": ((64, 128), (32, 64))}
WIDE = {kind: [(bm, bn, w, st) for bm in ms for bn in ns for w in (4, 8) for st in (2, 3, 4)
               if (bm % bn == 0 if kind != "dkdv" else bn % bm == 0)]
        for kind, (ms, ns) in _WIDE_SIZES.items()}
_BLOCK_NAMES = {"fwd": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_M1", "BLOCK_N1"), "dq": ("BLOCK_M2", "BLOCK_N2")}
_INTERPRET_ENTRY = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
#: What ``flash_tuning`` has set: the candidate set, and entries forced per kernel.
_TUNING = {"candidates": "default", "forced": {}}


def _config(kind, entry):
    """``(BLOCK_M, BLOCK_N, warps, stages)`` of one kernel as a Triton config."""
    bm, bn, warps, stages = entry
    m, n = _BLOCK_NAMES[kind]
    return triton.Config({m: bm, n: bn}, num_warps=warps, num_stages=stages)


def _entry(config):
    return (*config.kwargs.values(), config.num_warps, config.num_stages)


def _configs(kind):
    """Every candidate of one kernel (the pruner keeps those asked for at each tuning)."""
    if interpreting():  # one small configuration: no autotuning through the (slow) interpreter
        return [_config(kind, _INTERPRET_ENTRY[kind])]
    entries = [e for group in CANDIDATES[kind].values() for e in group] + WIDE[kind]
    return [_config(kind, e) for e in dict.fromkeys(entries)]


def _pruner(kind):
    """Keep the candidates of the call's head-dim class, or what ``flash_tuning`` asks for."""

    def prune(configs, named_args, **kwargs):
        if interpreting():
            return configs
        mode = _TUNING["candidates"]
        if mode == "wide":
            wanted = WIDE[kind]
        else:
            group = "fp32" if named_args["Q"].dtype == torch.float32 else head_class(kwargs["HEAD_DIM"])
            wanted = CANDIDATES[kind][group][:1 if mode == "first" else None]
        kept = [c for c in configs if _entry(c) in wanted]
        return kept or configs[:1]

    return prune


_KEY = ["HEAD_DIM", "CAUSAL", "SEQ_BUCKET"]


def _tuned(kind):
    return triton.autotune(configs=_configs(kind), key=_KEY, do_bench=autotune_bench,
                           prune_configs_by={"early_config_prune": _pruner(kind)})


class flash_tuning:
    """Tuning choices for the calls inside the block, instead of environment variables::

        with flash_tuning(candidates="wide"):      # autotune over the large grid (slow)
        with flash_tuning(candidates="first"):     # no timing: the first curated candidate
        with flash_tuning(fwd=(128, 128, 8, 3)):   # launch exactly this forward configuration

    Forced entries are ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for ``fwd``, ``dkdv`` or
    ``dq``. Changing the candidate set forgets earlier tunings, on entry and on exit.
    """

    MODES = ("default", "wide", "first")

    def __init__(self, candidates: str = "default", **forced):
        if candidates not in self.MODES:
            raise ValueError(f"candidates={candidates!r}; expected one of {self.MODES}")
        unknown = set(forced) - set(_BLOCK_NAMES)
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}; expected some of {sorted(_BLOCK_NAMES)}")
        for kind, entry in forced.items():
            if not (isinstance(entry, tuple) and len(entry) == 4 and all(isinstance(x, int) for x in entry)):
                raise ValueError(f"{kind}={entry!r}; expected (BLOCK_M, BLOCK_N, num_warps, num_stages)")
        self.candidates, self.forced = candidates, forced

    def __enter__(self):
        self.saved = (_TUNING["candidates"], dict(_TUNING["forced"]))
        if self.candidates != _TUNING["candidates"]:
            _forget_tunings()
        _TUNING["candidates"], _TUNING["forced"] = self.candidates, {**_TUNING["forced"], **self.forced}
        return self

    def __exit__(self, *exc):
        if _TUNING["candidates"] != self.saved[0]:
            _forget_tunings()
        _TUNING["candidates"], _TUNING["forced"] = self.saved


# ----------------------------------------------------------------------------- tile helpers
@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, head_dim, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, HEAD_DIM) tile; rows >= n_rows and padded head-dim columns read as zero."""
    if MASK_ROWS:
        mask = rows[:, None] < n_rows
        if not EVEN_D:
            mask = mask & (offs_d[None, :] < head_dim)
        x = tl.load(ptrs, mask=mask, other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
    return x


@triton.jit
def _load_rows(base, rows, stride, n_rows, offs_d, head_dim, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows ``rows`` of a (seq, head_dim) matrix at ``base`` with row stride ``stride``: a (rows, HEAD_DIM) tile."""
    return _load_tile(base + rows[:, None] * stride + offs_d[None, :], rows, n_rows, offs_d, head_dim,
                      MASK_ROWS, EVEN_D)


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, head_dim, EVEN_D: tl.constexpr):
    mask = rows[:, None] < n_rows
    if not EVEN_D:
        mask = mask & (offs_d[None, :] < head_dim)
    tl.store(ptrs, x, mask=mask)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, hi, t_q, t_k, head_dim,
               qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi): the running (m, l, acc) of one query tile."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BN,)
        k = _load_rows(K, cols, stride_kt, t_k, offs_d, head_dim, MASKED, EVEN_D)  # (BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN): Q K^T, unscaled
        if MASKED:  # diagonal or tail tile: hide keys past the end and above the diagonal
            keep = cols[None, :] < t_k
            if CAUSAL:  # query i is position i + (t_k - t_q): it sees keys j <= i + t_k - t_q
                keep = keep & (cols[None, :] <= offs_m[:, None] + (t_k - t_q))
            s = tl.where(keep, s, -1.0e6)
        # S = c Q K^T in log2 units (c = scale * log2 e > 0, so the max commutes with c)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # m' = max(m, rowmax S)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # P = exp2(S - m'): one fused multiply-add
        alpha = tl.math.exp2(m_i - m_new)  # alpha = exp2(m - m')
        l_i = l_i * alpha + tl.sum(p, 1)  # l' = alpha l + rowsum P
        v = _load_rows(V, cols, stride_vt, t_k, offs_d, head_dim, MASKED, EVEN_D)  # (BN, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # O' = alpha O + P V
        m_i = m_new
    return acc, m_i, l_i


@_tuned("fwd")
@triton.jit
def _fwd_kernel(Q, K, V, O, L,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                n_heads, group, t_q, t_k, head_dim, qk_scale, SEQ_BUCKET,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if CAUSAL:  # longest rows (most key tiles) first, so the last wave is short
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    Q += b * sqb + h * sqh
    K += b * skb + (h // group) * skh  # grouped-query attention: `group` query heads share one K, V head
    V += b * svb + (h // group) * svh
    O += b * sob + h * soh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, HEAD_DIM)  # (D,)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running unnormalised output
    q = _load_rows(Q, offs_m, sqt, t_q, offs_d, head_dim, True, EVEN_D)  # (BM, D)
    full_k = (t_k // BLOCK_N) * BLOCK_N  # keys before the ragged tail
    if CAUSAL:  # the diagonal of this query tile starts at key start_m * BLOCK_M + (t_k - t_q)
        first = start_m * BLOCK_M + (t_k - t_q)
        free_hi = tl.minimum((first // BLOCK_N) * BLOCK_N, full_k)
        hi = tl.minimum(first + BLOCK_M, t_k)  # tiles above the diagonal are skipped
    else:
        free_hi = full_k
        hi = t_k
    # stage 1: tiles where every key is visible (below the diagonal, before the tail): no mask
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, skt, svt, offs_m, offs_d, 0, free_hi, t_q, t_k,
                               head_dim, qk_scale, BLOCK_N, False, CAUSAL, EVEN_D, PRECISION)
    # stage 2: the diagonal tiles (causal) and the ragged tail (any length): masked
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, skt, svt, offs_m, offs_d, free_hi, hi, t_q, t_k,
                               head_dim, qk_scale, BLOCK_N, True, CAUSAL, EVEN_D, PRECISION)
    # O = acc / l ;  L = (m + log2 l) * ln 2, the natural log-sum-exp of the row
    tl.store(L + bh * t_q + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=offs_m < t_q)
    _store_tile(O + offs_m[:, None] * sot + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
                offs_m, t_q, offs_d, head_dim, EVEN_D)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, L, Delta, sqt, sdt, offs_n, offs_d, lo, hi, t_q, t_k, head_dim,
                qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), working with P^T."""
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)  # (BM,)
        q = _load_rows(Q, rows, sqt, t_q, offs_d, head_dim, MASKED, EVEN_D)  # (BM, D)
        do = _load_rows(DO, rows, sdt, t_q, offs_d, head_dim, MASKED, EVEN_D)  # (BM, D)
        if MASKED:
            lse = tl.load(L + rows, mask=rows < t_q, other=0.0) * 1.4426950408889634  # log2 units
            delta = tl.load(Delta + rows, mask=rows < t_q, other=0.0)
        else:
            lse = tl.load(L + rows) * 1.4426950408889634
            delta = tl.load(Delta + rows)
        # P^T = exp2(c K Q^T - L log2 e): the probabilities recomputed from the saved log-sum-exp
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
                           - lse[None, :])  # (BN, BM)
        if MASKED:
            keep = rows[None, :] < t_q
            if CAUSAL:
                keep = keep & (rows[None, :] + (t_k - t_q) >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)  # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM): dP^T = V dO^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T * (dP^T - D)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)  # dK += dS^T Q (scaled later)
    return dk, dv


@_tuned("dkdv")
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, L, Delta,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                     sgkb, sgkh, sgkt, sgvb, sgvh, sgvt,
                     n_heads, group, t_q, t_k, head_dim, qk_scale, scale, SEQ_BUCKET,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr):
    start_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # batch * key/value head
    n_kv = n_heads // group
    b, hk = bh // n_kv, bh % n_kv
    offs_n = start_n * BLOCK_N1 + tl.arange(0, BLOCK_N1)  # (BN,)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K + b * skb + hk * skh, offs_n, skt, t_k, offs_d, head_dim, True, EVEN_D)  # (BN, D)
    v = _load_rows(V + b * svb + hk * svh, offs_n, svt, t_k, offs_d, head_dim, True, EVEN_D)  # (BN, D)
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], tl.float32)
    full_q = (t_q // BLOCK_M1) * BLOCK_M1
    if CAUSAL:
        # query rows i < n0 - (t_k - t_q) never see this key tile (skipped); the tiles of rows
        # crossing its diagonal are masked; from `mid` on every row sees every key of the tile
        lo = tl.maximum(start_n * BLOCK_N1 - (t_k - t_q), 0)
        lo = (lo // BLOCK_M1) * BLOCK_M1
        mid = tl.maximum(start_n * BLOCK_N1 + BLOCK_N1 - (t_k - t_q), 0)
        mid = tl.minimum(((mid + BLOCK_M1 - 1) // BLOCK_M1) * BLOCK_M1, t_q)
    else:
        lo = 0
        mid = 0
    # dK, dV sum over every query head of the group (one head without grouped-query attention)
    for g in range(group):
        h = hk * group + g
        q_h, do_h = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
        l_h, delta_h = L + (b * n_heads + h) * t_q, Delta + (b * n_heads + h) * t_q
        if CAUSAL:  # the diagonal: masked
            dk, dv = _dkdv_inner(dk, dv, k, v, q_h, do_h, l_h, delta_h, sqt, sdt, offs_n, offs_d, lo, mid, t_q,
                                 t_k, head_dim, qk_scale, BLOCK_M1, True, CAUSAL, EVEN_D, PRECISION)
        # the query tiles that see every key of this tile: no mask; then the ragged tail of the queries
        dk, dv = _dkdv_inner(dk, dv, k, v, q_h, do_h, l_h, delta_h, sqt, sdt, offs_n, offs_d, mid, full_q, t_q,
                             t_k, head_dim, qk_scale, BLOCK_M1, False, CAUSAL, EVEN_D, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_h, do_h, l_h, delta_h, sqt, sdt, offs_n, offs_d,
                             tl.maximum(full_q, mid), t_q, t_q, t_k, head_dim, qk_scale, BLOCK_M1, True, CAUSAL,
                             EVEN_D, PRECISION)
    _store_tile(DK + b * sgkb + hk * sgkh + offs_n[:, None] * sgkt + offs_d[None, :],
                (dk * scale).to(DK.dtype.element_ty), offs_n, t_k, offs_d, head_dim, EVEN_D)
    _store_tile(DV + b * sgvb + hk * sgvh + offs_n[:, None] * sgvt + offs_d[None, :],
                dv.to(DV.dtype.element_ty), offs_n, t_k, offs_d, head_dim, EVEN_D)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, lo, hi, t_q, t_k, head_dim, qk_scale,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K, cols, skt, t_k, offs_d, head_dim, MASKED, EVEN_D)  # (BN, D)
        v = _load_rows(V, cols, svt, t_k, offs_d, head_dim, MASKED, EVEN_D)  # (BN, D)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                         - lse[:, None])  # (BM, BN)
        if MASKED:
            keep = cols[None, :] < t_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + (t_k - t_q))
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T
        ds = p * (dp - delta[:, None])  # dS = P * (dP - D)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # dQ += dS K (scaled later)
    return dq


@_tuned("dq")
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, L, Delta,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgqb, sgqh, sgqt,
                   n_heads, group, t_q, t_k, head_dim, qk_scale, scale, SEQ_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr):
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    K += b * skb + (h // group) * skh
    V += b * svb + (h // group) * svh
    offs_m = start_m * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(L + bh * t_q + offs_m, mask=offs_m < t_q, other=0.0) * 1.4426950408889634  # log2 units
    delta = tl.load(Delta + bh * t_q + offs_m, mask=offs_m < t_q, other=0.0)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqt, t_q, offs_d, head_dim, True, EVEN_D)  # (BM, D)
    do = _load_rows(DO + b * sdb + h * sdh, offs_m, sdt, t_q, offs_d, head_dim, True, EVEN_D)  # (BM, D)
    dq = tl.zeros([BLOCK_M2, HEAD_DIM], tl.float32)
    full_k = (t_k // BLOCK_N2) * BLOCK_N2
    if CAUSAL:
        first = start_m * BLOCK_M2 + (t_k - t_q)
        free_hi = tl.minimum((first // BLOCK_N2) * BLOCK_N2, full_k)
        hi = tl.minimum(first + BLOCK_M2, t_k)
    else:
        free_hi = full_k
        hi = t_k
    # stage 1 without a mask, stage 2 (diagonal and tail) masked, as in the forward
    dq = _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, 0, free_hi, t_q, t_k,
                   head_dim, qk_scale, BLOCK_N2, False, CAUSAL, EVEN_D, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, free_hi, hi, t_q, t_k,
                   head_dim, qk_scale, BLOCK_N2, True, CAUSAL, EVEN_D, PRECISION)
    _store_tile(DQ + b * sgqb + h * sgqh + offs_m[:, None] * sgqt + offs_d[None, :],
                (dq * scale).to(DQ.dtype.element_ty), offs_m, t_q, offs_d, head_dim, EVEN_D)


# ----------------------------------------------------------------------------- Python side
_KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
#: The compiled kernel of the latest launch of each kind (registers, spills, shared memory, SASS).
LAST_COMPILED: dict = {}


def _forget_tunings():
    for kernel in _KERNELS.values():
        getattr(kernel, "cache", {}).clear()
    flash_hopper.forget_choices()


def autotune_choices() -> list[dict]:
    """The configuration picked for every autotuning key seen so far in this process."""
    rows = []
    for kind, kernel in _KERNELS.items():
        for key, cfg in getattr(kernel, "cache", {}).items():
            named = dict(zip(_KEY, key))
            rows.append({"kernel": kind, "head_dim": named["HEAD_DIM"], "causal": named["CAUSAL"],
                         "seq_bucket": named["SEQ_BUCKET"],
                         "dtype": next((str(k) for k in key if "float" in str(k) or "bf16" in str(k)), ""),
                         "config": _entry(cfg)})
    return rows + flash_hopper.choices()


def _check_inputs(q, k, v, causal=False):
    """The shared contract (``flash_torch.check_inputs``) plus what the kernels need."""
    check_inputs(q, k, v, causal, SUPPORTED_DTYPES)
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={d} is not supported; expected {MIN_HEAD_DIM} <= head_dim <= "
                         f"{MAX_HEAD_DIM} (64 and 128 are tuned)")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"flash_attention runs on CUDA tensors (got {q.device}); on CPU set "
                           "TRITON_INTERPRET=1 before importing lmcore.kernels to use Triton's interpreter")


def _launch(kind, grid, *args, **kwargs):
    """Launch one kernel through its autotuner, or with the configuration ``flash_tuning`` forces."""
    kernel = _KERNELS[kind]
    forced = _TUNING["forced"].get(kind)
    if forced is not None:
        cfg = _config(kind, forced)
        handle = kernel.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        handle = kernel[grid](*args, **kwargs)
    LAST_COMPILED[kind] = handle


def _meta(q, t_k):
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    return dict(SEQ_BUCKET=seq_bucket(max(q.shape[2], t_k)), HEAD_DIM=block_d, EVEN_D=block_d == d,
                PRECISION=precision(q.dtype))


def forward_portable(q, k, v, causal: bool, scale: float):
    """Launch the forward kernel above; returns ``out`` and ``L`` (natural log-sum-exp, fp32, ``(B, H, Tq)``)."""
    bsz, heads, t_q, d = q.shape
    t_k = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, H, Tq, D)
    lse = torch.empty((bsz, heads, t_q), device=q.device, dtype=torch.float32)  # (B, H, Tq)
    grid = lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), bsz * heads)  # noqa: E731
    _launch("fwd", grid, q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], heads, heads // k.shape[1], t_q, t_k, d, scale * LOG2E, CAUSAL=bool(causal),
            **_meta(q, t_k))
    return out, lse


def flash_forward_triton(q, k, v, causal: bool, scale: float):
    """The forward: the kernel above, or on Hopper the warp-specialized one where it is faster."""
    if not interpreting() and "fwd" not in _TUNING["forced"] and flash_hopper.usable(q, k, v):
        return flash_hopper.forward_fastest(forward_portable, q, k, v, causal, scale)
    return forward_portable(q, k, v, causal, scale)


def flash_backward_triton(q, k, v, out, lse, dout, causal: bool, scale: float):
    """Launch the backward kernels; returns ``dq, dk, dv``."""
    bsz, heads, t_q, d = q.shape
    kv_heads, t_k = k.shape[1], k.shape[2]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    meta = _meta(q, t_k)
    delta = rowsum_delta(out, dout)  # (B, H, Tq)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    grid_kv = lambda m: (triton.cdiv(t_k, m["BLOCK_N1"]), bsz * kv_heads)  # noqa: E731
    _launch("dkdv", grid_kv, q, k, v, dout, dk, dv, lse, delta, *strides, *dk.stride()[:3], *dv.stride()[:3],
            heads, heads // kv_heads, t_q, t_k, d, scale * LOG2E, scale, CAUSAL=bool(causal), **meta)
    grid_q = lambda m: (triton.cdiv(t_q, m["BLOCK_M2"]), bsz * heads)  # noqa: E731
    _launch("dq", grid_q, q, k, v, dout, dq, lse, delta, *strides, *dq.stride()[:3],
            heads, heads // kv_heads, t_q, t_k, d, scale * LOG2E, scale, CAUSAL=bool(causal), **meta)
    return dq, dk, dv


def _as_4d(x):
    return x.unsqueeze(1) if x.dim() == 3 else x  # (B, T, D) -> (B, 1, T, D)


class FlashAttentionTriton(torch.autograd.Function):
    """FlashAttention-2 in Triton: ``out, L = FlashAttentionTriton.apply(q, k, v, causal, scale)``.

    ``q`` of shape ``(B, H, Tq, D)`` or ``(B, Tq, D)``, ``k, v`` likewise with ``Tk`` rows; ``L`` is
    the row log-sum-exp (natural log, fp32, shape ``q.shape[:-1]``), what the backward uses, and
    carries no gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal: bool = False, scale: float | None = None):
        _check_inputs(q, k, v, causal)
        ctx.three_d = q.dim() == 3
        q, k, v = _as_4d(q), _as_4d(k), _as_4d(v)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        if not scale > 0:
            raise ValueError(f"scale={scale!r} must be a positive number")
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        if interpreting() and q.dtype == torch.bfloat16:
            # the CPU interpreter multiplies bfloat16 tiles wrongly (NumPy has no bfloat16):
            # run the kernels on float32 copies there; on a GPU bfloat16 goes straight in
            out, lse = flash_forward_triton(q.float(), k.float(), v.float(), causal, scale)
            out = out.to(q.dtype)
        else:
            out, lse = flash_forward_triton(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = bool(causal), scale
        if ctx.three_d:
            out, lse = out.squeeze(1), lse.squeeze(1)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = _as_4d(dout)
        if interpreting() and q.dtype == torch.bfloat16:  # see forward
            grads = flash_backward_triton(q.float(), k.float(), v.float(), out.float(), lse, dout.float(),
                                          ctx.causal, ctx.scale)
            grads = [g.to(q.dtype) for g in grads]
        else:
            grads = flash_backward_triton(q, k, v, out, lse, dout, ctx.causal, ctx.scale)
        if ctx.three_d:
            grads = [g.squeeze(1) for g in grads]
        return (*grads, None, None)


def flash_attention(q, k, v, causal: bool = False, scale: float | None = None, return_lse: bool = False):
    """FlashAttention-2 (Triton): ``softmax(q k^T * scale [+ causal mask]) v`` without the T x T matrix.

    ``q``: ``(batch, heads, Tq, head_dim)`` or ``(batch, Tq, head_dim)``; ``k, v`` the same with
    ``Tk`` rows, or with ``heads / G`` heads (grouped-query attention: each key/value head serves
    ``G`` consecutive query heads, read in place, its gradient summed over them); float16, bfloat16 or float32; ``16 <= head_dim <= 128``. ``scale`` defaults to
    ``1/sqrt(head_dim)``. ``causal`` masks keys after the query position; with ``Tk > Tq`` the
    queries are the last ``Tq`` positions (query ``i`` sees keys ``j <= i + Tk - Tq``, the
    convention of a KV cache and of ``lmcore.nn``). Differentiable in ``q, k, v``. With
    ``return_lse`` also returns the row log-sum-exp ``L`` (natural log, fp32, shape ``q.shape[:-1]``).
    """
    out, lse = FlashAttentionTriton.apply(q, k, v, causal, scale)
    return (out, lse) if return_lse else out
