"""FlashAttention-2 as Triton kernels: forward, and a backward in two passes (dK/dV, then dQ).

Each kernel block is tied to an equation of chapter 5 (the same ones ``flash_torch`` spells out):

* forward: one program per (query tile, batch*head); online softmax in base 2 with
  ``c = scale * log2(e)``; key tiles wholly above the causal diagonal are never visited, the
  unmasked tiles run in a loop without any mask, and the diagonal/tail tiles run in a second,
  masked stage. Only ``O`` and ``L`` (log-sum-exp, kept in base 2) are written.
* backward: ``D = rowsum(dO * O)`` (a small kernel); one program per key tile iterates over the
  query tiles that see it and accumulates ``dK, dV`` in registers; one program per query tile
  iterates over key tiles and accumulates ``dQ``. Nothing of size ``T x T`` is stored.

Tile sizes, warps and pipeline stages are autotuned per head dimension, causal flag, dtype and
sequence-length bucket. Under ``TRITON_INTERPRET=1`` (CPU) a single small configuration is used.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: True when Triton runs kernels through its CPU interpreter (must be set before triton is imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: ``wide``: autotune over a large grid of configurations (slow; for tuning sweeps);
#: ``first``: no autotuning, the first curated configuration (fast compiles, e.g. for tests).
TUNE_ENV = "LMCORE_FLASH_TUNE"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


# ----------------------------------------------------------------------------- configurations
def _bench(kernel_call, quantiles):
    """Time one candidate configuration while autotuning (shorter than Triton's default).

    A candidate that fails to compile for this GPU or Triton version (too many resources, an
    unsupported lowering) is reported and timed as infinitely slow instead of stopping the call.
    """
    try:
        return triton.testing.do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)
    except (torch.cuda.OutOfMemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - compile errors come as several exception types
        if "CUDA error" in str(err):  # the context is broken: nothing else can be trusted
            raise
        warnings.warn(f"flash attention: a tuning candidate failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:200] if str(err) else ''}); skipped")
        return [float("inf")] * len(quantiles) if quantiles else float("inf")


# Candidates per kernel and head-dim class, from a sweep on an H100 (``LMCORE_FLASH_TUNE=wide``
# times a larger grid; see lmcore/kernels/NOTES.md). Entries are (BLOCK_M, BLOCK_N, warps, stages)
# followed by options: ``"ahead"`` (forward: the next key tile's scores computed early),
# ``"ws"`` (one loop over all visited tiles, warp-specialized by the compiler: a producer warp
# group loads through tensor descriptors while two consumer warp groups compute, each on half of
# the tile's rows; Hopper or newer, tensor descriptors needed).
_CANDIDATES = {
    "fwd": {"small": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 4, 2, "ws")],
            "large": [(128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 4, 2, "ws")],
            "fp32": [(64, 32, 4, 2)]},
    "dkdv": {"small": [(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2, "ws")],
             "large": [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3), (64, 128, 4, 2, "ws"), (64, 64, 4, 2, "ws")],
             "fp32": [(32, 64, 4, 2)]},
    "dq": {"small": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
           "large": [(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
           "fp32": [(64, 32, 4, 2)]},
}
#: ``0`` leaves the warp-specialized candidates out of the autotuning (they need Hopper or newer).
WS_ENV = "LMCORE_FLASH_WS"
#: Forward candidates that compute the next key tile's scores ahead of this tile's softmax; tuned
#: over only with ``LMCORE_FLASH_AHEAD=1`` (not yet timed on a GPU: see NOTES.md).
AHEAD_ENV = "LMCORE_FLASH_AHEAD"
_AHEAD_CANDIDATES = {"small": [(128, 64, 8, 3, "ahead"), (64, 64, 4, 3, "ahead")],
                     "large": [(128, 64, 8, 3, "ahead"), (64, 64, 4, 3, "ahead")], "fp32": []}
_BLOCK_NAMES = {"fwd": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_M1", "BLOCK_N1"), "dq": ("BLOCK_M2", "BLOCK_N2")}
_INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


_OPTIONS = ("ahead", "ws")


def _as_config(kind, entry):
    """``(BLOCK_M, BLOCK_N, warps, stages, *options)`` as a Triton config (options: see ``_CANDIDATES``)."""
    bm, bn, warps, stages = entry[:4]
    opts = set(entry[4:])
    if opts - set(_OPTIONS) or ("ahead" in opts and kind != "fwd") or ("ws" in opts and kind == "dq"):
        raise ValueError(f"unknown options {sorted(opts)} for {kind}; expected some of {_OPTIONS}")
    m, n = _BLOCK_NAMES[kind]
    params = {m: bm, n: bn}
    if kind != "dq":  # the dQ loop reads L and D outside it, which the warp-specialization pass rejects
        params["WS"] = "ws" in opts
    if kind == "fwd":
        params["AHEAD"] = "ahead" in opts
    return triton.Config(params, num_warps=warps, num_stages=stages)


def _configs(kind):
    """Every candidate configuration of one kernel (the pruner keeps those of the head-dim class)."""
    if INTERPRET:  # one small configuration: no autotuning through the (slow) interpreter
        return [_as_config(kind, (*_INTERPRET_BLOCKS[kind], 4, 1))]
    mode = os.environ.get(TUNE_ENV)
    if mode == "wide":
        m_sizes, n_sizes = {"fwd": ((64, 128), (64, 128)), "dkdv": ((32, 64), (64, 128)),
                            "dq": ((64, 128), (32, 64))}[kind]
        return [_as_config(kind, (bm, bn, w, st)) for bm in m_sizes for bn in n_sizes
                for w in (4, 8) for st in (2, 3, 4)
                if (bm % bn == 0 if kind != "dkdv" else bn % bm == 0)]
    seen, out = set(), []
    groups = list(_CANDIDATES[kind].values()) + (list(_AHEAD_CANDIDATES.values()) if kind == "fwd" else [])
    for group in groups:
        for entry in group:
            if entry not in seen:
                seen.add(entry)
                out.append(_as_config(kind, entry))
    return out[:1] if mode == "first" else out


def _pruner(kind):
    """Keep the candidates of the head-dim class (and float32) of the call being tuned."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET or os.environ.get(TUNE_ENV) in ("wide", "first"):
            return configs
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
        if named_args["Q"].dtype == torch.float32:
            group = "fp32"
        else:
            group = "small" if head_dim <= 64 else "large"
        entries = list(_CANDIDATES[kind][group])
        if kind == "fwd" and os.environ.get(AHEAD_ENV) == "1":
            entries += _AHEAD_CANDIDATES[group]
        tma_ok = kwargs.get("TMA_OK", named_args.get("TMA_OK", False)) and os.environ.get(WS_ENV, "1") != "0"
        wanted = [_as_config(kind, e) for e in entries if tma_ok or "ws" not in e[4:]]
        keys = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in wanted}
        kept = [c for c in configs if (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) in keys]
        return kept or configs[:1]

    return prune


_KEY = ["HEAD_DIM", "CAUSAL", "SEQ_BUCKET", "USE_TMA", "TMA_OK"]


# ----------------------------------------------------------------------------- tile helpers
@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, head_dim, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, HEAD_DIM) tile; rows >= n_rows and padded head-dim columns read as zero."""
    if MASK_ROWS:
        mask = rows[:, None] < n_rows
        if not EVEN_D:
            mask = mask & (offs_d[None, :] < head_dim)
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
    return x


@triton.jit
def _load_rows(src, row0, rows, stride_t, n_rows, offs_d, head_dim, MASK_ROWS: tl.constexpr,
               EVEN_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [row0, row0 + len(rows)) of a (seq, head_dim) matrix: through a tensor descriptor (the
    Hopper copy engine, which zero-fills past the end by itself) or through plain pointers."""
    if USE_TMA:
        x = src.load([row0, 0])
    else:
        x = _load_tile(src + rows[:, None] * stride_t + offs_d[None, :], rows, n_rows, offs_d, head_dim,
                       MASK_ROWS, EVEN_D)
    return x


@triton.jit
def _rows_source(base, n_rows, stride_t, head_dim, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """What ``_load_rows`` reads from: a tensor descriptor of the (seq, head_dim) matrix, or the pointer."""
    if USE_TMA:
        src = tl.make_tensor_descriptor(base, shape=[n_rows, head_dim], strides=[stride_t, 1],
                                        block_shape=[BLOCK, HEAD_DIM])
    else:
        src = base
    return src


@triton.jit
def _flat_source(base, n_rows, st, head_dim, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A descriptor of all heads' rows at once, a (batch * heads * seq, head_dim) matrix, built from the
    kernel argument itself. Descriptors built from a per-head offset pointer left rows unwritten once
    the loop was warp-specialized with two consumer groups (Triton 3.6, H100 and H200), and 4-D
    descriptors do not compile there; this one works. Rows past a head's end belong to the next head,
    so the loops mask them; past the whole tensor they read as zero."""
    return tl.make_tensor_descriptor(base, shape=[n_rows, head_dim], strides=[st, 1], block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, head_dim, EVEN_D: tl.constexpr):
    mask = rows[:, None] < n_rows
    if not EVEN_D:
        mask = mask & (offs_d[None, :] < head_dim)
    tl.store(ptrs, x, mask=mask)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_update(acc, m_i, l_i, s, V, start_n, cols, stride_vt, offs_m, offs_d, t_q, t_k, head_dim, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                USE_TMA: tl.constexpr):
    """One key tile of the online softmax, given its scores ``s = Q K^T`` (unscaled, (BM, BN))."""
    if MASKED:  # diagonal or tail tile: hide keys past the end and above the diagonal
        keep = cols[None, :] < t_k
        if CAUSAL:  # query i is position i + (t_k - t_q): it sees keys j <= i + t_k - t_q
            keep = keep & (cols[None, :] <= offs_m[:, None] + (t_k - t_q))
        s = tl.where(keep, s, -1.0e6)
    # S = c * Q K^T in log2 units (c = scale * log2 e > 0, so the max commutes with c)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # m' = max(m, rowmax S)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])  # P = exp2(S - m'): one fused multiply-add
    alpha = tl.math.exp2(m_i - m_new)  # alpha = exp2(m - m')
    l_i = l_i * alpha + tl.sum(p, 1)  # l' = alpha l + rowsum P
    v = _load_rows(V, start_n, cols, stride_vt, t_k, offs_d, head_dim, MASKED, EVEN_D, USE_TMA)  # (BN, D)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # O' = alpha O + P V
    return acc, m_new, l_i


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, hi, t_q, t_k, head_dim,
               qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               EVEN_D: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax over key tiles [lo, hi): the running (m, l, acc) of one query tile."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BN,)
        k = _load_rows(K, start_n, cols, stride_kt, t_k, offs_d, head_dim, MASKED, EVEN_D, USE_TMA)  # (BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN): Q K^T, unscaled
        acc, m_i, l_i = _fwd_update(acc, m_i, l_i, s, V, start_n, cols, stride_vt, offs_m, offs_d, t_q, t_k,
                                    head_dim, qk_scale, MASKED, CAUSAL, EVEN_D, PRECISION, USE_TMA)
    return acc, m_i, l_i


@triton.jit
def _fwd_inner_ahead(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, hi, t_q, t_k, head_dim,
                     qk_scale, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                     PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """The unmasked stage (hi > lo) with Q K^T of the next tile issued before the softmax of this
    one, so the tensor cores can work on it while the softmax runs (software pipelining by hand)."""
    offs_n = tl.arange(0, BLOCK_N)
    k = _load_rows(K, lo, lo + offs_n, stride_kt, t_k, offs_d, head_dim, False, EVEN_D, USE_TMA)  # (BN, D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN): scores of tile `lo`
    for start_n in tl.range(lo + BLOCK_N, hi, BLOCK_N):
        k = _load_rows(K, start_n, start_n + offs_n, stride_kt, t_k, offs_d, head_dim, False, EVEN_D, USE_TMA)
        s_next = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # scores of the next tile, ahead
        prev = start_n - BLOCK_N
        acc, m_i, l_i = _fwd_update(acc, m_i, l_i, s, V, prev, prev + offs_n, stride_vt, offs_m, offs_d, t_q,
                                    t_k, head_dim, qk_scale, False, CAUSAL, EVEN_D, PRECISION, USE_TMA)
        s = s_next
    last = hi - BLOCK_N
    acc, m_i, l_i = _fwd_update(acc, m_i, l_i, s, V, last, last + offs_n, stride_vt, offs_m, offs_d, t_q, t_k,
                                head_dim, qk_scale, False, CAUSAL, EVEN_D, PRECISION, USE_TMA)
    return acc, m_i, l_i


@triton.jit
def _fwd_ws_loop(acc, m_i, l_i, q, K, V, row0, offs_m, hi, t_q, t_k, qk_scale, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, NEED_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """The forward as a single loop that the compiler warp-specializes (see ``_fwd_kernel``).

    Triton's Hopper warp specialization accepts one loop with no matrix product outside it, so the
    diagonal and tail tiles cannot have a loop of their own: every tile gets the element mask (a
    compare and a select per score) when the call is causal or the keys end inside a tile.
    """
    offs_n = tl.arange(0, BLOCK_N)
    lim = tl.minimum(offs_m + (t_k - t_q) + 1, t_k)  # (BM,): query i sees keys j < lim_i (causal)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        k = K.load([row0 + start_n, 0])  # (BN, D) by the copy engine
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN): Q K^T, unscaled
        if NEED_MASK:
            cols = start_n + offs_n
            if CAUSAL:
                keep = cols[None, :] < lim[:, None]
            else:
                keep = cols[None, :] < t_k
            s = tl.where(keep, s, -1.0e6)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # m' = max(m, rowmax S), S = c Q K^T
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # P = exp2(S - m')
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = V.load([row0 + start_n, 0])  # (BN, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # O' = alpha O + P V
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_configs("fwd"), key=_KEY, do_bench=_bench,
                 prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def _fwd_kernel(Q, K, V, O, L,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                n_batch, n_heads, t_q, t_k, head_dim, qk_scale, SEQ_BUCKET,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                PRECISION: tl.constexpr, USE_TMA: tl.constexpr, TMA_OK: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, AHEAD: tl.constexpr, WS: tl.constexpr):
    if CAUSAL:  # longest rows (most key tiles) first, so the last wave is short
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    O += b * sob + h * soh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, HEAD_DIM)  # (D,)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if WS:  # warp-specialized: Q, K and V all through tensor descriptors, one loop
        q = _flat_source(Q, n_batch * n_heads * t_q, sqt, head_dim, BLOCK_M, HEAD_DIM).load(
            [(bh * t_q).to(tl.int32) + start_m * BLOCK_M, 0])  # (BM, D); rows past t_q are never stored
        k_src = _flat_source(K, n_batch * n_heads * t_k, skt, head_dim, BLOCK_N, HEAD_DIM)
        v_src = _flat_source(V, n_batch * n_heads * t_k, svt, head_dim, BLOCK_N, HEAD_DIM)
        if CAUSAL:
            hi = tl.minimum(start_m * BLOCK_M + (t_k - t_q) + BLOCK_M, t_k)
        else:
            hi = t_k
        acc, m_i, l_i = _fwd_ws_loop(acc, m_i, l_i, q, k_src, v_src, (bh * t_k).to(tl.int32), offs_m, hi, t_q,
                                     t_k, qk_scale, BLOCK_N, CAUSAL, CAUSAL or not EVEN_K, PRECISION)
    else:
        acc, m_i, l_i = _fwd_two_stage(acc, m_i, l_i, Q + b * sqb + h * sqh, K + b * skb + h * skh,
                                       V + b * svb + h * svh, skt, svt, sqt, offs_m, offs_d, start_m, t_q, t_k,
                                       head_dim, qk_scale, HEAD_DIM, CAUSAL, EVEN_D, PRECISION, USE_TMA,
                                       BLOCK_M, BLOCK_N, AHEAD)
    # O = acc / l ;  L = m + log2(l)  (base 2; natural L = L * ln 2)
    tl.store(L + bh * t_q + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < t_q)
    out = acc / l_i[:, None]
    _store_tile(O + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty), offs_m, t_q,
                offs_d, head_dim, EVEN_D)


@triton.jit
def _fwd_two_stage(acc, m_i, l_i, Q, K, V, skt, svt, sqt, offs_m, offs_d, start_m, t_q, t_k, head_dim, qk_scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                   USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, AHEAD: tl.constexpr):
    """The forward's main loops without warp specialization: unmasked tiles, then masked ones."""
    q = _load_tile(Q + offs_m[:, None] * sqt + offs_d[None, :], offs_m, t_q, offs_d, head_dim,
                   True, EVEN_D)  # (BM, D)
    k_src = _rows_source(K, t_k, skt, head_dim, BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _rows_source(V, t_k, svt, head_dim, BLOCK_N, HEAD_DIM, USE_TMA)
    # stage 1: tiles with every key visible (below the diagonal, before the tail): no mask at all
    full_k = (t_k // BLOCK_N) * BLOCK_N
    if CAUSAL:  # the diagonal of this query tile starts at key start_m * BLOCK_M + (t_k - t_q)
        first = start_m * BLOCK_M + (t_k - t_q)
        free_hi = tl.minimum((first // BLOCK_N) * BLOCK_N, full_k)
        hi = tl.minimum(first + BLOCK_M, t_k)  # tiles above the diagonal are skipped
    else:
        free_hi = full_k
        hi = t_k
    if AHEAD:  # the scores of the next key tile computed before the softmax of this one
        if free_hi > 0:
            acc, m_i, l_i = _fwd_inner_ahead(acc, m_i, l_i, q, k_src, v_src, skt, svt, offs_m, offs_d, 0,
                                             free_hi, t_q, t_k, head_dim, qk_scale, BLOCK_N, CAUSAL, EVEN_D,
                                             PRECISION, USE_TMA)
    else:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_src, v_src, skt, svt, offs_m, offs_d, 0, free_hi,
                                   t_q, t_k, head_dim, qk_scale, BLOCK_N, False, CAUSAL, EVEN_D, PRECISION,
                                   USE_TMA)
    # stage 2: the diagonal tiles (causal) and the ragged tail (any length): masked
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_src, v_src, skt, svt, offs_m, offs_d, free_hi, hi,
                               t_q, t_k, head_dim, qk_scale, BLOCK_N, True, CAUSAL, EVEN_D, PRECISION, USE_TMA)
    return acc, m_i, l_i


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_delta_kernel(O, DO, Delta, sob, soh, sot, sdb, sdh, sdt, n_heads, t_q, head_dim,
                      HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """D_i = rowsum(dO_i * O_i), in fp32."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_tile(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], offs_m, t_q,
                   offs_d, head_dim, True, EVEN_D)
    do = _load_tile(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], offs_m, t_q,
                    offs_d, head_dim, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * t_q + offs_m, delta, mask=offs_m < t_q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, L, Delta, sqt, sdt, offs_n, offs_d, lo, hi, t_q, t_k, head_dim,
                qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                EVEN_D: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), working with P^T."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + offs_m0  # (BM,)
        q = _load_rows(Q, start_m, rows, sqt, t_q, offs_d, head_dim, MASKED, EVEN_D, USE_TMA)  # (BM, D)
        do = _load_rows(DO, start_m, rows, sdt, t_q, offs_d, head_dim, MASKED, EVEN_D, USE_TMA)  # (BM, D)
        if MASKED:
            lse = tl.load(L + rows, mask=rows < t_q, other=0.0)
            delta = tl.load(Delta + rows, mask=rows < t_q, other=0.0)
        else:
            lse = tl.load(L + rows)
            delta = tl.load(Delta + rows)
        # P^T = exp2(c K Q^T - L): the probabilities recomputed from the saved log-sum-exp
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


@triton.jit
def _dkdv_ws_loop(dk, dv, k, v, Q, DO, L, Delta, row0, offs_n, lo, t_q, t_k, qk_scale, BLOCK_M: tl.constexpr,
                  CAUSAL: tl.constexpr, NEED_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one key tile as a single warp-specialized loop over query tiles [lo, t_q); every
    tile gets the causal mask, and the mask of rows past ``t_q`` (another head's) when there are any."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in tl.range(lo, t_q, BLOCK_M, warp_specialize=True):
        rows = start_m + offs_m0  # (BM,)
        q = Q.load([row0 + start_m, 0])  # (BM, D)
        do = DO.load([row0 + start_m, 0])  # (BM, D)
        lse = tl.load(L + rows, mask=rows < t_q, other=0.0)
        delta = tl.load(Delta + rows, mask=rows < t_q, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
                           - lse[None, :])  # (BN, BM): P^T from the saved log-sum-exp
        if NEED_MASK:
            if CAUSAL:
                keep = (rows[None, :] + (t_k - t_q) >= offs_n[:, None]) & (rows[None, :] < t_q)
            else:
                keep = rows[None, :] < t_q
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)  # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # dP^T = V dO^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T * (dP^T - D)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)  # dK += dS^T Q
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=_KEY, do_bench=_bench,
                 prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, L, Delta,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                     sgkb, sgkh, sgkt, sgvb, sgvh, sgvt,
                     n_batch, n_heads, t_q, t_k, head_dim, qk_scale, scale, SEQ_BUCKET,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                     PRECISION: tl.constexpr, USE_TMA: tl.constexpr, TMA_OK: tl.constexpr,
                     EVEN_K: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, WS: tl.constexpr):
    start_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    L += bh * t_q
    Delta += bh * t_q
    offs_n = start_n * BLOCK_N1 + tl.arange(0, BLOCK_N1)  # (BN,)
    offs_d = tl.arange(0, HEAD_DIM)
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], tl.float32)
    if WS:  # Q, K, V, dO all through descriptors (rows past the end read as zero); one loop
        kv_row = (bh * t_k).to(tl.int32) + start_n * BLOCK_N1  # rows past t_k: another head's, never stored
        k = _flat_source(K, n_batch * n_heads * t_k, skt, head_dim, BLOCK_N1, HEAD_DIM).load([kv_row, 0])
        v = _flat_source(V, n_batch * n_heads * t_k, svt, head_dim, BLOCK_N1, HEAD_DIM).load([kv_row, 0])
        q_src = _flat_source(Q, n_batch * n_heads * t_q, sqt, head_dim, BLOCK_M1, HEAD_DIM)
        do_src = _flat_source(DO, n_batch * n_heads * t_q, sdt, head_dim, BLOCK_M1, HEAD_DIM)
        if CAUSAL:
            lo = tl.maximum(start_n * BLOCK_N1 - (t_k - t_q), 0)
            lo = (lo // BLOCK_M1) * BLOCK_M1
        else:
            lo = 0
        dk, dv = _dkdv_ws_loop(dk, dv, k, v, q_src, do_src, L, Delta, (bh * t_q).to(tl.int32), offs_n, lo, t_q,
                               t_k, qk_scale, BLOCK_M1, CAUSAL, CAUSAL or not EVEN_K, PRECISION)
    else:
        q_src = _rows_source(Q + b * sqb + h * sqh, t_q, sqt, head_dim, BLOCK_M1, HEAD_DIM, USE_TMA)
        do_src = _rows_source(DO + b * sdb + h * sdh, t_q, sdt, head_dim, BLOCK_M1, HEAD_DIM, USE_TMA)
        dk, dv = _dkdv_two_stage(dk, dv, K + b * skb + h * skh, V + b * svb + h * svh, q_src, do_src, L, Delta,
                                 skt, svt, sqt, sdt, offs_n, offs_d, start_n, t_q, t_k, head_dim, qk_scale,
                                 CAUSAL, EVEN_D, PRECISION, USE_TMA, BLOCK_M1, BLOCK_N1)
    _store_tile(DK + b * sgkb + h * sgkh + offs_n[:, None] * sgkt + offs_d[None, :],
                (dk * scale).to(DK.dtype.element_ty), offs_n, t_k, offs_d, head_dim, EVEN_D)
    _store_tile(DV + b * sgvb + h * sgvh + offs_n[:, None] * sgvt + offs_d[None, :],
                dv.to(DV.dtype.element_ty), offs_n, t_k, offs_d, head_dim, EVEN_D)


@triton.jit
def _dkdv_two_stage(dk, dv, K, V, q_src, do_src, L, Delta, skt, svt, sqt, sdt, offs_n, offs_d, start_n, t_q, t_k,
                    head_dim, qk_scale, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                    USE_TMA: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr):
    """dK, dV of one key tile without warp specialization: masked tiles, unmasked tiles, the tail."""
    k = _load_tile(K + offs_n[:, None] * skt + offs_d[None, :], offs_n, t_k, offs_d, head_dim, True,
                   EVEN_D)  # (BN, D)
    v = _load_tile(V + offs_n[:, None] * svt + offs_d[None, :], offs_n, t_k, offs_d, head_dim, True,
                   EVEN_D)  # (BN, D)
    full_q = (t_q // BLOCK_M1) * BLOCK_M1
    if CAUSAL:
        # query rows i < n0 - (t_k - t_q) never see this key tile (skipped); the tiles of rows
        # crossing its diagonal are masked; from `mid` on every row sees every key of the tile
        lo = tl.maximum(start_n * BLOCK_N1 - (t_k - t_q), 0)
        lo = (lo // BLOCK_M1) * BLOCK_M1
        mid = tl.maximum(start_n * BLOCK_N1 + BLOCK_N1 - (t_k - t_q), 0)
        mid = ((mid + BLOCK_M1 - 1) // BLOCK_M1) * BLOCK_M1
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, L, Delta, sqt, sdt, offs_n, offs_d,
                             lo, tl.minimum(mid, t_q), t_q, t_k, head_dim, qk_scale,
                             BLOCK_M1, True, CAUSAL, EVEN_D, PRECISION, USE_TMA)
    else:
        mid = 0
    dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, L, Delta, sqt, sdt, offs_n, offs_d, mid, full_q, t_q,
                         t_k, head_dim, qk_scale, BLOCK_M1, False, CAUSAL, EVEN_D, PRECISION, USE_TMA)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, L, Delta, sqt, sdt, offs_n, offs_d,
                         tl.maximum(full_q, mid), t_q, t_q, t_k, head_dim, qk_scale, BLOCK_M1, True,
                         CAUSAL, EVEN_D, PRECISION, USE_TMA)
    return dk, dv


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, lo, hi, t_q, t_k, head_dim, qk_scale,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              EVEN_D: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K, start_n, cols, skt, t_k, offs_d, head_dim, MASKED, EVEN_D, USE_TMA)  # (BN, D)
        v = _load_rows(V, start_n, cols, svt, t_k, offs_d, head_dim, MASKED, EVEN_D, USE_TMA)  # (BN, D)
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


@triton.autotune(configs=_configs("dq"), key=_KEY, do_bench=_bench,
                 prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, L, Delta,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgqb, sgqh, sgqt,
                   n_heads, t_q, t_k, head_dim, qk_scale, scale, SEQ_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                   PRECISION: tl.constexpr, USE_TMA: tl.constexpr, TMA_OK: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr):
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    k_src = _rows_source(K + b * skb + h * skh, t_k, skt, head_dim, BLOCK_N2, HEAD_DIM, USE_TMA)
    v_src = _rows_source(V + b * svb + h * svh, t_k, svt, head_dim, BLOCK_N2, HEAD_DIM, USE_TMA)
    offs_m = start_m * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(L + bh * t_q + offs_m, mask=offs_m < t_q, other=0.0)
    delta = tl.load(Delta + bh * t_q + offs_m, mask=offs_m < t_q, other=0.0)
    dq = tl.zeros([BLOCK_M2, HEAD_DIM], tl.float32)
    q = _load_tile(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], offs_m, t_q,
                   offs_d, head_dim, True, EVEN_D)  # (BM, D)
    do = _load_tile(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], offs_m, t_q,
                    offs_d, head_dim, True, EVEN_D)  # (BM, D)
    full_k = (t_k // BLOCK_N2) * BLOCK_N2
    if CAUSAL:
        first = start_m * BLOCK_M2 + (t_k - t_q)
        free_hi = tl.minimum((first // BLOCK_N2) * BLOCK_N2, full_k)
        hi = tl.minimum(first + BLOCK_M2, t_k)
    else:
        free_hi = full_k
        hi = t_k
    dq = _dq_inner(dq, q, do, lse, delta, k_src, v_src, skt, svt, offs_m, offs_d, 0, free_hi, t_q, t_k,
                   head_dim, qk_scale, BLOCK_N2, False, CAUSAL, EVEN_D, PRECISION, USE_TMA)
    dq = _dq_inner(dq, q, do, lse, delta, k_src, v_src, skt, svt, offs_m, offs_d, free_hi, hi, t_q, t_k,
                   head_dim, qk_scale, BLOCK_N2, True, CAUSAL, EVEN_D, PRECISION, USE_TMA)
    _store_tile(DQ + b * sgqb + h * sgqh + offs_m[:, None] * sgqt + offs_d[None, :],
                (dq * scale).to(DQ.dtype.element_ty), offs_m, t_q, offs_d, head_dim, EVEN_D)


# ----------------------------------------------------------------------------- Python side
def autotune_choices() -> list[dict]:
    """The configuration the autotuner picked for every key seen so far in this process."""
    rows = []
    for name, kernel in (("forward", _fwd_kernel), ("backward dK/dV", _bwd_dkdv_kernel),
                         ("backward dQ", _bwd_dq_kernel)):
        for key, cfg in getattr(kernel, "cache", {}).items():
            named = dict(zip(_KEY, key))
            rows.append({"kernel": name, "head_dim": named.get("HEAD_DIM"), "causal": named.get("CAUSAL"),
                         "seq_bucket": named.get("SEQ_BUCKET"), "tma": named.get("USE_TMA"),
                         "dtype": next((str(k) for k in key if "float" in str(k) or "bf16" in str(k)), ""),
                         **{k: v for k, v in cfg.kwargs.items()},
                         "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return rows


def last_tuning_timings() -> dict:
    """Per kernel, the timings (ms) of every configuration in its most recent autotuning run."""
    out = {}
    for name, kernel in (("forward", _fwd_kernel), ("backward dK/dV", _bwd_dkdv_kernel),
                         ("backward dQ", _bwd_dq_kernel)):
        timings = getattr(kernel, "configs_timings", None) or {}
        out[name] = sorted(((str(c), t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()),
                           key=lambda x: x[1])
    return out


def _seq_bucket(n: int) -> int:
    """Autotuning key for a sequence length: the next power of two (so nearby lengths share a tuning)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def _check_inputs(q, k, v, causal=False):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected 4 dimensions "
                             "(batch, heads, seq, head_dim)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported dtypes are float16, bfloat16 and float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    bq, hq, _, dq = q.shape
    if k.shape[:2] != (bq, hq) or v.shape[:2] != (bq, hq):
        raise ValueError(f"batch and heads must match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length; got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != dq or v.shape[3] != dq:
        raise ValueError(f"q, k, v must share one head_dim; got {dq}, {k.shape[3]}, {v.shape[3]}")
    if not MIN_HEAD_DIM <= dq <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={dq} is not supported; expected {MIN_HEAD_DIM} <= head_dim <= "
                         f"{MAX_HEAD_DIM} (64 and 128 are tuned)")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"sequence lengths must be positive; got q {q.shape[2]}, k {k.shape[2]}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs at least as many keys as queries (the queries are the "
                         f"last {q.shape[2]} positions); got {q.shape[2]} queries and {k.shape[2]} keys")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"flash_attention runs on CUDA tensors (got {q.device}); on CPU set "
                           "TRITON_INTERPRET=1 before importing lmcore.kernels to use Triton's interpreter")


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


#: ``1``: load tiles through tensor descriptors (TMA) where possible; ``0``: plain pointers always.
TMA_ENV = "LMCORE_FLASH_TMA"
#: What ``LMCORE_FLASH_TMA`` defaults to (chosen from the recorded benchmark; see NOTES.md).
TMA_DEFAULT = "0"


def _use_tma(*tensors, want: bool | None = None) -> bool:
    """Tensor descriptors need a Hopper (or newer) GPU, Triton support, and 16-byte aligned rows.

    ``want`` (default: the ``LMCORE_FLASH_TMA`` setting) asks for them where possible."""
    if want is None:
        want = os.environ.get(TMA_ENV, TMA_DEFAULT) == "1"
    if not want or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if INTERPRET:  # the interpreter reads descriptors too (handy to test that code path on CPU)
        return True
    x = tensors[0]
    if x.device.type != "cuda" or x.dtype == torch.float32 or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:3]):
            return False
    _ensure_allocator()
    return True


def _ensure_allocator():
    """Device-side tensor descriptors live in a small global scratch buffer that torch allocates.

    Triton keeps the allocator in a context variable, which autograd's backward thread does not
    inherit, so it is set on every call that uses descriptors (it is cheap).
    """
    triton.set_allocator(_scratch)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


#: Configurations forced by ``forced_configs`` (kernel kind -> (BLOCK_M, BLOCK_N, warps, stages)).
_FORCED: dict = {}
#: The compiled kernel of the latest launch of each kind (registers, spills, shared memory, SASS).
LAST_COMPILED: dict = {}


class forced_configs:
    """``with forced_configs(fwd=(128, 128, 8, 3)):`` launches that configuration instead of autotuning.

    Kinds are ``fwd``, ``dkdv`` and ``dq``; entries are ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``.
    For profiling and for comparing configurations outside the autotuner.
    """

    def __init__(self, **entries):
        unknown = set(entries) - set(_BLOCK_NAMES)
        if unknown:
            raise ValueError(f"unknown kernel kinds {sorted(unknown)}; expected some of {sorted(_BLOCK_NAMES)}")
        self.entries = {k: v for k, v in entries.items() if v is not None}

    def __enter__(self):
        self.saved = dict(_FORCED)
        _FORCED.update(self.entries)
        return self

    def __exit__(self, *exc):
        _FORCED.clear()
        _FORCED.update(self.saved)


def _launch(kind, kernel, grid, *args, **kwargs):
    """Launch through the autotuner, or with the configuration forced for this kind."""
    if kind in _FORCED:
        cfg = _as_config(kind, _FORCED[kind])
        if cfg.kwargs.get("WS") and not kwargs["TMA_OK"]:
            raise ValueError(f"{kind}={_FORCED[kind]} is warp-specialized and needs tensor descriptors (a Hopper "
                             "or newer GPU, 16-byte aligned rows, half-precision inputs)")
        handle = kernel.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages)
    else:
        handle = kernel[grid](*args, **kwargs)
    LAST_COMPILED[kind] = handle
    return handle


def _meta(q, t_k, *tensors):
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    return dict(SEQ_BUCKET=_seq_bucket(max(q.shape[2], t_k)), HEAD_DIM=block_d, EVEN_D=block_d == d,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_TMA=_use_tma(q, *tensors),
                TMA_OK=_use_tma(q, *tensors, want=True) and all(map(_rows_flat, (q, *tensors))),
                EVEN_K=t_k % 128 == 0 and q.shape[2] % 128 == 0)


def _rows_flat(x) -> bool:
    """True when the rows of every head follow each other, so that (B, H, T, D) reads as one
    (B*H*T, D) matrix with a single row stride (what the warp-specialized kernels load through)."""
    b, h, t, _ = x.shape
    sb, sh, st = x.stride()[:3]
    return (h == 1 or sh == t * st) and (b == 1 or sb == h * t * st)


def flash_forward_triton(q, k, v, causal: bool, scale: float):
    """Launch the forward kernel; returns ``out`` and ``L2`` (log-sum-exp in base 2, fp32)."""
    bsz, heads, t_q, d = q.shape
    t_k = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, H, Tq, D)
    lse2 = torch.empty((bsz, heads, t_q), device=q.device, dtype=torch.float32)  # (B, H, Tq)
    grid = lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), bsz * heads)  # noqa: E731
    _launch("fwd", _fwd_kernel, grid, q, k, v, out, lse2, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *out.stride()[:3], bsz, heads, t_q, t_k, d, scale * LOG2E, CAUSAL=bool(causal),
            **_meta(q, t_k, k, v))
    return out, lse2


def flash_backward_triton(q, k, v, out, lse2, dout, causal: bool, scale: float):
    """Launch the three backward kernels; returns ``dq, dk, dv``."""
    bsz, heads, t_q, d = q.shape
    t_k = k.shape[2]
    dout = _last_dim_contiguous(dout)
    meta = _meta(q, t_k, k, v, dout)
    delta = torch.empty_like(lse2)  # (B, H, Tq)
    _bwd_delta_kernel[(triton.cdiv(t_q, 64), bsz * heads)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], heads, t_q, d,
        HEAD_DIM=meta["HEAD_DIM"], EVEN_D=meta["EVEN_D"], BLOCK_M=64)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    grid_kv = lambda m: (triton.cdiv(t_k, m["BLOCK_N1"]), bsz * heads)  # noqa: E731
    _launch("dkdv", _bwd_dkdv_kernel, grid_kv, q, k, v, dout, dk, dv, lse2, delta, *strides,
            *dk.stride()[:3], *dv.stride()[:3], bsz, heads, t_q, t_k, d, scale * LOG2E, scale,
            CAUSAL=bool(causal), **meta)
    grid_q = lambda m: (triton.cdiv(t_q, m["BLOCK_M2"]), bsz * heads)  # noqa: E731
    _launch("dq", _bwd_dq_kernel, grid_q, q, k, v, dout, dq, lse2, delta, *strides, *dq.stride()[:3],
            heads, t_q, t_k, d, scale * LOG2E, scale, CAUSAL=bool(causal), **meta)
    return dq, dk, dv


class FlashAttentionTriton(torch.autograd.Function):
    """FlashAttention-2 in Triton: ``out, L = FlashAttentionTriton.apply(q, k, v, causal, scale)``.

    ``q`` of shape ``(B, H, Tq, D)``, ``k, v`` of shape ``(B, H, Tk, D)``; ``L`` is the row
    log-sum-exp (natural log, fp32, ``(B, H, Tq)``) and carries no gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal: bool = False, scale: float | None = None):
        _check_inputs(q, k, v, causal)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        if not scale > 0:
            raise ValueError(f"scale={scale!r} must be a positive number")
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        if INTERPRET and q.dtype == torch.bfloat16:
            # the CPU interpreter multiplies bfloat16 tiles wrongly (NumPy has no bfloat16):
            # run the kernels on float32 copies there; on a GPU bfloat16 goes straight in
            out, lse2 = flash_forward_triton(q.float(), k.float(), v.float(), causal, scale)
            out = out.to(q.dtype)
        else:
            out, lse2 = flash_forward_triton(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.causal, ctx.scale = bool(causal), scale
        lse = lse2 * LN2
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse2 = ctx.saved_tensors
        if INTERPRET and q.dtype == torch.bfloat16:  # see forward
            grads = flash_backward_triton(q.float(), k.float(), v.float(), out.float(), lse2,
                                          dout.float(), ctx.causal, ctx.scale)
            dq, dk, dv = (g.to(q.dtype) for g in grads)
        else:
            dq, dk, dv = flash_backward_triton(q, k, v, out, lse2, dout, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal: bool = False, scale: float | None = None, return_lse: bool = False):
    """FlashAttention-2 (Triton): ``softmax(q k^T * scale [+ causal mask]) v`` without the T x T matrix.

    ``q``: ``(batch, heads, Tq, head_dim)``; ``k, v``: ``(batch, heads, Tk, head_dim)``; float16,
    bfloat16 or float32; ``16 <= head_dim <= 128``. ``scale`` defaults to ``1/sqrt(head_dim)``.
    ``causal`` masks keys after the query position; with ``Tk > Tq`` the queries are the last
    ``Tq`` positions (query ``i`` sees keys ``j <= i + Tk - Tq``, the convention of a KV cache and of
    ``lmcore.nn``; equal lengths give the usual lower-triangular mask). Differentiable in ``q, k, v``.
    With ``return_lse`` also returns the row log-sum-exp ``L`` (natural log, fp32, shape ``(batch, heads, Tq)``).
    """
    out, lse = FlashAttentionTriton.apply(q, k, v, causal, scale)
    return (out, lse) if return_lse else out
