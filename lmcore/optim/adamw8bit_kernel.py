"""The fused AdamW8bit update in Triton, over all quantized tensors of a list in one launch: one
program per quantization block of ``BLOCK`` values, finding its tensor's addresses in a table
(:mod:`lmcore.train.multi_tensor`; operands ``p, g, m codes, m scales, v codes, v scales``).

Each program reads the block's parameters, gradients, 8-bit codes and two scales; dequantizes
(a code-book lookup times the scale), applies the AdamW update in float32, takes the block's new
scales (largest magnitudes) and requantizes by a branch-free binary search among the midpoints of
the code book. Imported only when first needed (see ``lmcore.optim.adamw8bit``).
"""

import triton
import triton.language as tl

from lmcore.train.adamw_kernel import address


@triton.jit
def quantize_block(x, mids_ptr, SEARCH: tl.constexpr):
    """One block's new scale and codes: the index of the first midpoint >= x / scale."""
    scale = tl.max(tl.abs(x), axis=0)
    normed = tl.div_rn(x, tl.maximum(scale, 1.1754943508222875e-38))
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(8):  # branch-free binary search over 255 sorted midpoints
        probe = idx + (SEARCH >> i)
        idx = tl.where(tl.load(mids_ptr + probe - 1) < normed, probe, idx)
    return idx.to(tl.uint8), scale


@triton.jit
def adamw8bit_kernel(table, chunks, n, like_p, like_g, like_q, like_s, m_code, m_mids, v_code, v_mids,
                     decay, w1, beta2, w2, neg_step, bias2_sqrt, eps,
                     BLOCK: tl.constexpr, SEARCH: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.load(chunks + pid)  # this program's tensor, one of n
    numel = tl.load(table + 6 * n + i)
    block = pid - tl.load(table + 7 * n + i)  # the quantization block within tensor i
    offs = block * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) int64 indices into tensor i
    mask = offs < numel
    p_ptr = address(table, i, like_p, ALIGNED)
    g_ptr = address(table, n + i, like_g, ALIGNED)
    mq_ptr = address(table, 2 * n + i, like_q, ALIGNED)
    ms_ptr = address(table, 3 * n + i, like_s, False)
    vq_ptr = address(table, 4 * n + i, like_q, ALIGNED)
    vs_ptr = address(table, 5 * n + i, like_s, False)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_code + tl.load(mq_ptr + offs).to(tl.int32)) * tl.load(ms_ptr + block)  # dequantize
    v = tl.load(v_code + tl.load(vq_ptr + offs).to(tl.int32)) * tl.load(vs_ptr + block)
    p = p * decay  # decoupled weight decay
    diff = g - m  # lerp the way torch rounds it: from the nearer end
    m = tl.where(w1 < 0.5, m + w1 * diff, g - diff * (1.0 - w1))
    v = v * beta2 + (w2 * g) * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    p = p + tl.div_rn(neg_step * m, denom)
    tl.store(p_ptr + offs, p.to(like_p.dtype.element_ty), mask=mask)
    m = tl.where(mask, m, 0.0)  # the padding of the last block quantizes zeros, as the torch path does
    v = tl.where(mask, v, 0.0)
    mq, ms = quantize_block(m, m_mids, SEARCH)
    vq, vs = quantize_block(v, v_mids, SEARCH)
    tl.store(mq_ptr + offs, mq)
    tl.store(ms_ptr + block, ms)
    tl.store(vq_ptr + offs, vq)
    tl.store(vs_ptr + block, vs)
