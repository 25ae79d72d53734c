"""Sparse attention (chapter 5): block layouts, a block-sparse Triton kernel, and NSA.

- :mod:`lmcore.sparse.patterns`: patterns as block layouts (``local``, ``strided``, ``global``,
  ``mixed``, ``bigbird``, ``dilated``, ``dense``), their density, and pictures of them;
- :mod:`lmcore.sparse.index`: the compact index of a layout (per query block its key blocks,
  per key block its query blocks), which the kernels loop over;
- :mod:`lmcore.sparse.kernel`: :func:`block_sparse_attention`, a FlashAttention-2-style kernel
  that visits only the allowed key blocks, forward and backward;
- :mod:`lmcore.sparse.reference`: the same sparse work in PyTorch, and dense masked attention;
- :mod:`lmcore.sparse.nsa`: Native Sparse Attention (compressed, selected and sliding branches),
  its readable definition and its layer; :mod:`lmcore.sparse.nsa_triton`: its kernels (attention
  shared by a KV group's heads, block importance, top-n selection).

Every function takes ``impl``, one of :data:`IMPLS`: ``"triton"`` (the Triton kernels),
``"torch"`` (PyTorch doing the same sparse work), ``"reference"`` (dense attention written out
with the element mask) or ``"auto"``.

Importing this package registers two attention backends for ``TransformerLM``:
``block_sparse`` (options: ``pattern``, ``block_size`` and the pattern's parameters) and ``nsa``
(options: the fields of :class:`NSAConfig` and ``impl``; grouped K/V and decoding with a cache).
"""

from __future__ import annotations

from functools import lru_cache

from lmcore.nn.registry import register_attention_backend
from lmcore.sparse.index import BlockIndex, block_index
from lmcore.sparse.kernel import IMPLS, block_sparse_attention, resolve_impl
from lmcore.sparse.reference import block_sparse_attention_torch, masked_attention
from lmcore.sparse.nsa import NSA, NSAConfig, nsa_attention
from lmcore.sparse.patterns import PATTERNS, BlockLayout, make_layout, render

__all__ = [
    "BlockLayout", "BlockIndex", "IMPLS", "PATTERNS", "make_layout", "render", "block_index",
    "block_sparse_attention", "block_sparse_attention_torch", "masked_attention",
    "NSA", "NSAConfig", "nsa_attention",
]


@lru_cache(maxsize=64)
def _cached_layout(pattern: str, seq_len: int, block_size: int, causal: bool, params: tuple) -> BlockLayout:
    """One layout (and so one compact index per device) per configuration, reused across calls."""
    return make_layout(pattern, seq_len, block_size, causal=causal, **dict(params))


@register_attention_backend("block_sparse", kv_offsets=True)
def block_sparse_backend(q, k, v, causal: bool = True, pattern: str = "local", block_size: int = 64,
                         impl: str = "auto", **params):
    """Attention backend: ``pattern`` with ``params`` (e.g. ``window=128``) at ``block_size``.

    ``impl`` as in :func:`block_sparse_attention` (``"torch"`` trains on a CPU without Triton).
    With fewer queries than keys (decoding with a KV cache) the last rows of the pattern are
    computed as dense masked attention.
    """
    resolve_impl(impl, q.is_cuda)  # an unknown name fails before any work
    tq, tk = q.shape[-2], k.shape[-2]
    layout = _cached_layout(pattern, tk, block_size, bool(causal), tuple(sorted(params.items())))
    if tq != tk:  # decoding with a KV cache: the queries are the last tq positions of the pattern
        if tq > tk:
            raise ValueError(f"{tq} queries but only {tk} keys: queries must be the last positions")
        return masked_attention(q, k, v, layout.element_mask().to(q.device)[tk - tq:])
    return block_sparse_attention(q, k, v, layout, causal=causal, impl=impl)


@register_attention_backend("nsa", kv_offsets=True, grouped_kv=True)
def nsa_backend(q, k, v, causal: bool = True, impl: str = "auto", **sizes):
    """Attention backend: parameter-free NSA (mean-pooled compression, equal gates) with the sizes of
    :class:`NSAConfig` as options. K and V may have fewer heads than Q (grouped queries); with fewer
    queries than keys (decoding with a KV cache) the queries are the last positions and select
    their blocks from the compressed cached keys."""
    if not causal:
        raise ValueError("the nsa backend is causal (its blocks are chosen among the past); got causal=False")
    return nsa_attention(q, k, v, NSAConfig.from_options(**sizes), impl=impl)
