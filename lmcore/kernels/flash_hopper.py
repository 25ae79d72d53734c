"""A warp-specialized FlashAttention-2 forward for Hopper (and newer) GPUs.

The portable forward of ``flash_triton`` runs the softmax on the same warps that issue the two
matrix products, so the tensor cores wait while it runs. Here the key loop is written as one
``tl.range(..., warp_specialize=True)`` loop, which Triton splits into a producer warp group that
loads K and V tiles through tensor descriptors (the copy engine) and consumer warp groups that
compute, so loads, matrix products and softmax of different tiles overlap.

What the compiler accepts shapes the kernel: a single loop with no matrix product outside it, so
the diagonal tiles cannot have a masked loop of their own (every tile gets the element mask when
the call is causal or the keys end inside a tile); every dot operand read through a descriptor;
and descriptors of all heads at once, a ``(batch * heads * seq, head_dim)`` matrix built from the
kernel argument itself (rows past a head's end belong to the next head and are masked).

``flash_triton.flash_forward_triton`` calls :func:`forward_fastest` where :func:`usable` holds: on
the first call of each shape class it times this kernel against the portable one and keeps the
faster, as an autotuner keeps the faster tile size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmcore.kernels.common import LOG2E, autotune_bench, interpreting, precision, seq_bucket

#: (BLOCK_M, BLOCK_N, warps, stages): 4 warps per consumer group, two pipeline stages.
CONFIG = (128, 128, 4, 2)


@triton.jit
def _fwd_ws_kernel(Q, K, V, O, L, sqt, skt, svt, sob, soh, sot, n_heads, group, n_rows_q, n_rows_k, t_q, t_k,
                   head_dim,
                   qk_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, NEED_MASK: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if CAUSAL:  # longest rows first, so the last wave is short
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    # descriptors over every head's rows, (B*H*T, D); past the whole tensor they read as zero
    q_desc = tl.make_tensor_descriptor(Q, shape=[n_rows_q, head_dim], strides=[sqt, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K, shape=[n_rows_k, head_dim], strides=[skt, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V, shape=[n_rows_k, head_dim], strides=[svt, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    row0 = ((b * (n_heads // group) + h // group) * t_k).to(tl.int32)  # first key row of this head's K, V head
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BN,)
    q = q_desc.load([(bh * t_q).to(tl.int32) + start_m * BLOCK_M, 0])  # (BM, D); rows past t_q never stored
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        hi = tl.minimum(start_m * BLOCK_M + (t_k - t_q) + BLOCK_M, t_k)
    else:
        hi = t_k
    lim = tl.minimum(offs_m + (t_k - t_q) + 1, t_k)  # (BM,): query i sees keys j < lim_i (causal)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        k = k_desc.load([row0 + start_n, 0])  # (BN, D) by the copy engine
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
        alpha = tl.math.exp2(m_i - m_new)  # alpha = exp2(m - m')
        l_i = l_i * alpha + tl.sum(p, 1)  # l' = alpha l + rowsum P
        v = v_desc.load([row0 + start_n, 0])  # (BN, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # O' = alpha O + P V
        m_i = m_new
    # O = acc / l ;  L = (m + log2 l) * ln 2
    tl.store(L + bh * t_q + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=offs_m < t_q)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_m[:, None] < t_q) & (offs_d[None, :] < head_dim)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=mask)


def _rows_flat(x) -> bool:
    """True when the rows of every head follow each other, so ``(B, H, T, D)`` reads as one
    ``(B*H*T, D)`` matrix with a single row stride (what the descriptors above read)."""
    b, h, t, _ = x.shape
    sb, sh, st = x.stride()[:3]
    return (h == 1 or sh == t * st) and (b == 1 or sb == h * t * st)


def usable(q, k, v) -> bool:
    """Whether this kernel can run on these inputs: a Hopper or newer GPU, tensor descriptors in
    this Triton, half-precision inputs, a power-of-two head dim, 16-byte aligned rows, flat rows."""
    if not hasattr(tl, "make_tensor_descriptor") or q.dtype == torch.float32:
        return False
    if not interpreting() and (q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9):
        return False
    if q.shape[-1] & (q.shape[-1] - 1):
        return False
    for t in (q, k, v):
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:3]) or not _rows_flat(t):
            return False
    return True


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def forward(q, k, v, causal: bool, scale: float):
    """Launch the warp-specialized forward; returns ``out`` and ``L`` (natural log, fp32, ``(B, H, Tq)``)."""
    if not usable(q, k, v):
        raise ValueError("the warp-specialized forward needs a Hopper GPU, half-precision inputs, a power-of-two "
                         "head_dim, 16-byte aligned rows and each head's rows following the last")
    # device-side descriptors live in scratch memory that torch allocates; Triton keeps the
    # allocator in a context variable that autograd's backward thread does not inherit, so it is
    # set on every call (it is cheap)
    triton.set_allocator(_scratch)
    bsz, heads, t_q, d = q.shape
    t_k = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, H, Tq, D)
    lse = torch.empty((bsz, heads, t_q), device=q.device, dtype=torch.float32)  # (B, H, Tq)
    bm, bn, warps, stages = (32, 16, 4, 1) if interpreting() else CONFIG
    ragged = t_k % bn != 0 or t_q % bm != 0
    _fwd_ws_kernel[(triton.cdiv(t_q, bm), bsz * heads)](
        q, k, v, out, lse, q.stride(2), k.stride(2), v.stride(2), *out.stride()[:3], heads, heads // k.shape[1],
        bsz * heads * t_q, bsz * k.shape[1] * t_k, t_q, t_k, d, scale * LOG2E, HEAD_DIM=d, CAUSAL=bool(causal),
        NEED_MASK=bool(causal) or ragged, PRECISION=precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages)
    return out, lse


#: (head_dim, causal, sequence bucket, dtype) -> "portable" or "hopper", decided by timing.
_CHOICES: dict = {}


def forward_fastest(portable, q, k, v, causal: bool, scale: float):
    """Run the faster of ``portable(q, k, v, causal, scale)`` and :func:`forward` for this shape class,
    timing both on its first call."""
    key = (q.shape[-1], bool(causal), seq_bucket(max(q.shape[2], k.shape[2])), q.dtype)
    if key not in _CHOICES:
        times = {name: autotune_bench(lambda fn=fn: fn(q, k, v, causal, scale), None)
                 for name, fn in (("portable", portable), ("hopper", forward))}
        _CHOICES[key] = min(times, key=times.get)
    return (forward if _CHOICES[key] == "hopper" else portable)(q, k, v, causal, scale)


def choices() -> list[dict]:
    """Which forward each shape class uses, for the benchmark's record."""
    return [{"kernel": "fwd implementation", "head_dim": d, "causal": c, "seq_bucket": b, "dtype": str(dt),
             "config": impl} for (d, c, b, dt), impl in _CHOICES.items()]


def forget_choices():
    _CHOICES.clear()
