"""The fused AdamW update in Triton, over all tensors of a list in one launch: one program per
chunk of ``BLOCK`` values, finding its tensor's addresses in a table (:mod:`lmcore.train.multi_tensor`).
Imported only when first needed (see ``lmcore.train.optim``), so ``TRITON_INTERPRET`` is read then.
"""

import triton
import triton.language as tl


@triton.jit
def address(table, j, like, ALIGNED: tl.constexpr):
    """Entry ``j`` of the int64 ``table`` as a pointer of ``like``'s type. ALIGNED promises the
    compiler a 16-byte aligned address, as it assumes of tensor arguments, so it may use vector loads."""
    ptr = tl.load(table + j).to(like.dtype)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def adamw_math(p, g, m, v, decay, w1, beta2, w2, neg_step, bias2_sqrt, eps):
    """One AdamW step of float32 values, rounded as ``torch.optim.AdamW`` rounds it: new (p, m, v)."""
    p = p * decay  # decoupled weight decay
    diff = g - m  # lerp the way torch rounds it: from the nearer end
    m = tl.where(w1 < 0.5, m + w1 * diff, g - diff * (1.0 - w1))
    v = v * beta2 + (w2 * g) * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    return p + tl.div_rn(neg_step * m, denom), m, v


@triton.jit
def adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, offs, numel, decay, w1, beta2, w2, neg_step, bias2_sqrt, eps,
                 MASKED: tl.constexpr):
    """AdamW on the values at ``offs``; MASKED: only those below ``numel`` (a tensor's last chunk)."""
    mask = offs < numel if MASKED else None
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    p, m, v = adamw_math(p, g, m, v, decay, w1, beta2, w2, neg_step, bias2_sqrt, eps)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adamw_kernel(table, chunks, n, like, decay, w1, beta2, w2, neg_step, bias2_sqrt, eps,
                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.load(chunks + pid)  # this program's tensor, one of n
    numel = tl.load(table + 4 * n + i)
    start = (pid - tl.load(table + 5 * n + i)) * BLOCK  # int64
    offs = start + tl.arange(0, BLOCK)  # (BLOCK,) indices into tensor i
    p_ptr = address(table, i, like, ALIGNED)
    g_ptr = address(table, n + i, like, ALIGNED)
    m_ptr = address(table, 2 * n + i, like, ALIGNED)
    v_ptr = address(table, 3 * n + i, like, ALIGNED)
    if start + BLOCK <= numel:  # a whole chunk: no mask, so the compiler can use vector loads
        adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, offs, numel, decay, w1, beta2, w2, neg_step, bias2_sqrt, eps,
                     False)
    else:
        adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, offs, numel, decay, w1, beta2, w2, neg_step, bias2_sqrt, eps,
                     True)
