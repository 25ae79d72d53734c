"""The fused AdamW8bit update in Triton, over all quantized tensors of a list in one launch: one
program per chunk of ``ROWS`` quantization blocks of ``BLOCK`` values, finding its tensor's addresses
in a table (:mod:`lmcore.train.multi_tensor`; operands ``p, g, m codes, m scales, v codes, v scales``).

Each program reads its blocks' parameters, gradients, 8-bit codes and scales; dequantizes (a
code-book lookup times the scale), applies the AdamW update in float32, takes each block's new scale
(its largest magnitude) and requantizes. Whole chunks load and store without masks, so the compiler
can use vector loads; only a tensor's last chunk is masked.

Requantizing finds, for each value, how many midpoints of the code book lie below it (what
``torch.searchsorted`` returns). A binary search would cost eight dependent table lookups per value;
the dynamic code book (:mod:`lmcore.optim.quantize`) has a closed form instead. Its magnitudes in
decade ``e`` (values in ``(10**-(e+1), 10**-e]``) are ``n_e = 2**(MAG_BITS-1-e)`` evenly spaced
codes, at magnitude indices ``n_e .. 2 n_e - 1``, so the nearest one is about::

    k = n_e + round((a 10**e - 0.1) n_e / 0.9 - 1)        a = |value| / scale

which is never more than one index from the exact answer (ties and float rounding move it by one
at most). Two lookups of the true midpoints on either side of ``k`` settle it. Imported only when
first needed (see ``lmcore.optim.adamw8bit``).
"""

import triton
import triton.language as tl

from lmcore.train.adamw_kernel import adamw_math, address


@triton.jit
def code_index(x, ext_ptr, MAG_BITS: tl.constexpr, SIGNED: tl.constexpr):
    """The searchsorted index of ``x`` (in [-1, 1]) among the midpoints of a dynamic code book.
    ``ext_ptr``: the midpoints with -inf before them and +inf after (257 entries), so that
    ``ext[c]`` and ``ext[c + 1]`` are the midpoints below and above code ``c``."""
    a = tl.abs(x)
    tens = tl.full(x.shape, 1.0, tl.float32)  # 10**e: decade e holds (10**-(e+1), 10**-e]
    n = tl.full(x.shape, 2.0 ** (MAG_BITS - 1), tl.float32)  # codes in the decade
    for _ in tl.static_range(MAG_BITS - 1):
        lower = a * tens <= 0.1
        tens = tl.where(lower, tens * 10.0, tens)
        n = tl.where(lower, n * 0.5, n)
    k = n + tl.floor((a * tens - 0.1) * n / 0.9 - 0.5)  # nearest magnitude index, +-1
    k = tl.minimum(tl.maximum(k.to(tl.int32), 0), 2 ** MAG_BITS - 1)
    if SIGNED:  # codes: -mags (largest first, without 0), then mags
        c = tl.where(x < 0, 2 ** MAG_BITS - 1 - k, 2 ** MAG_BITS - 1 + k)
    else:
        c = k
    below = tl.load(ext_ptr + c)  # the midpoint under code c, and the one over it
    above = tl.load(ext_ptr + c + 1)
    return c - (below >= x).to(tl.int32) + (above < x).to(tl.int32)


@triton.jit
def quantize_rows(x, ext_ptr, MAG_BITS: tl.constexpr, SIGNED: tl.constexpr):
    """Each row's (block's) new scale and codes: x (ROWS, BLOCK) -> codes (ROWS, BLOCK), scales (ROWS,)."""
    scale = tl.max(tl.abs(x), axis=1)
    normed = tl.div_rn(x, tl.maximum(scale, 1.1754943508222875e-38)[:, None])
    return code_index(normed, ext_ptr, MAG_BITS, SIGNED).to(tl.uint8), scale


@triton.jit
def adamw8bit_update(p_ptr, g_ptr, mq_ptr, ms_ptr, vq_ptr, vs_ptr, rows, numel, m_code, m_ext, v_code, v_ext,
                     decay, w1, beta2, w2, neg_step, bias2_sqrt, eps,
                     BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """The blocks ``rows`` (ROWS,) of one tensor; MASKED: only values below ``numel`` (its last chunk)."""
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK) int64
    if MASKED:
        mask = offs < numel
        rmask = rows < (numel + BLOCK - 1) // BLOCK  # blocks that exist (codes are padded to whole blocks)
        cmask = rmask[:, None]
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mq = tl.load(mq_ptr + offs, mask=cmask, other=0).to(tl.int32)
        vq = tl.load(vq_ptr + offs, mask=cmask, other=0).to(tl.int32)
        ms = tl.load(ms_ptr + rows, mask=rmask, other=0.0)
        vs = tl.load(vs_ptr + rows, mask=rmask, other=0.0)
    else:
        mask, rmask, cmask = None, None, None
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        mq = tl.load(mq_ptr + offs).to(tl.int32)
        vq = tl.load(vq_ptr + offs).to(tl.int32)
        ms = tl.load(ms_ptr + rows)
        vs = tl.load(vs_ptr + rows)
    m = tl.load(m_code + mq) * ms[:, None]  # dequantize
    v = tl.load(v_code + vq) * vs[:, None]
    p, m, v = adamw_math(p, g, m, v, decay, w1, beta2, w2, neg_step, bias2_sqrt, eps)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    if MASKED:  # the padding of the last block quantizes zeros, as the torch path does
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
    mq, ms = quantize_rows(m, m_ext, 7, True)  # signed 8-bit dynamic code: 7 bits of magnitude
    vq, vs = quantize_rows(v, v_ext, 8, False)  # unsigned: all 8
    tl.store(mq_ptr + offs, mq, mask=cmask)
    tl.store(ms_ptr + rows, ms, mask=rmask)
    tl.store(vq_ptr + offs, vq, mask=cmask)
    tl.store(vs_ptr + rows, vs, mask=rmask)


@triton.jit
def adamw8bit_kernel(table, chunks, n, like_p, like_g, like_q, like_s, m_code, m_ext, v_code, v_ext,
                     decay, w1, beta2, w2, neg_step, bias2_sqrt, eps,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.load(chunks + pid)  # this program's tensor, one of n
    numel = tl.load(table + 6 * n + i)
    first = (pid - tl.load(table + 7 * n + i)) * ROWS  # its first quantization block in tensor i (int64)
    rows = first + tl.arange(0, ROWS)
    p_ptr = address(table, i, like_p, ALIGNED)
    g_ptr = address(table, n + i, like_g, ALIGNED)
    mq_ptr = address(table, 2 * n + i, like_q, ALIGNED)
    ms_ptr = address(table, 3 * n + i, like_s, False)
    vq_ptr = address(table, 4 * n + i, like_q, ALIGNED)
    vs_ptr = address(table, 5 * n + i, like_s, False)
    if (first + ROWS) * BLOCK <= numel:  # whole blocks only: no masks, vector loads
        adamw8bit_update(p_ptr, g_ptr, mq_ptr, ms_ptr, vq_ptr, vs_ptr, rows, numel, m_code, m_ext, v_code,
                         v_ext, decay, w1, beta2, w2, neg_step, bias2_sqrt, eps, BLOCK, False)
    else:
        adamw8bit_update(p_ptr, g_ptr, mq_ptr, ms_ptr, vq_ptr, vs_ptr, rows, numel, m_code, m_ext, v_code,
                         v_ext, decay, w1, beta2, w2, neg_step, bias2_sqrt, eps, BLOCK, True)
