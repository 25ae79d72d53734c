"""FlashAttention-2: a tiled PyTorch version and Triton kernels (chapter 4).

- ``FlashAttentionTorch``: the algorithm tile by tile in PyTorch (readable, slow).
- ``FlashAttentionTriton`` and ``flash_attention(q, k, v, causal=False, scale=None)``: the kernels.
- ``attention_reference``: the written-out ``softmax(QK^T) V`` they are checked against.

Importing this module registers the ``flash_torch`` and ``flash_triton`` attention backends.
On a machine without CUDA, set ``TRITON_INTERPRET=1`` before importing to run the Triton
kernels through Triton's CPU interpreter (slow; for tests at tiny sizes).
"""

from __future__ import annotations

from lmcore.kernels.flash_torch import FlashAttentionTorch
from lmcore.kernels.flash_triton import FlashAttentionTriton, flash_attention
from lmcore.kernels.reference import attention_reference
from lmcore.nn.registry import register_attention_backend

__all__ = ["FlashAttentionTorch", "FlashAttentionTriton", "flash_attention", "attention_reference",
           "flash_attention_torch"]


def flash_attention_torch(q, k, v, causal: bool = False, scale: float | None = None,
                          block_m: int = 64, block_n: int = 64, return_lse: bool = False):
    """The tiled PyTorch FlashAttention-2 (autograd-capable); same arguments as ``flash_attention``."""
    out, lse = FlashAttentionTorch.apply(q, k, v, causal, scale, block_m, block_n)
    return (out, lse) if return_lse else out


@register_attention_backend("flash_triton", kv_offsets=True, grouped_kv=True)
def _flash_triton_backend(q, k, v, causal: bool = True, scale: float | None = None, **options):
    """Attention backend ``flash_triton``: the Triton kernels."""
    if options:
        raise TypeError(f"flash_triton takes only causal and scale; got {sorted(options)}")
    return flash_attention(q, k, v, causal=causal, scale=scale)


@register_attention_backend("flash_torch", kv_offsets=True, grouped_kv=True)
def _flash_torch_backend(q, k, v, causal: bool = True, scale: float | None = None, block_m: int = 64,
                         block_n: int = 64, **options):
    """Attention backend ``flash_torch``: the tiled PyTorch version."""
    if options:
        raise TypeError(f"flash_torch takes causal, scale, block_m, block_n; got {sorted(options)}")
    return flash_attention_torch(q, k, v, causal=causal, scale=scale, block_m=block_m, block_n=block_n)
