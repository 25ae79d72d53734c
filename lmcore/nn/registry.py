"""The attention-backend registry.

An attention backend is a function ``fn(q, k, v, causal=True, **options) -> out`` on tensors of
shape ``(batch, heads, seq, head_dim)`` (``k`` and ``v`` may have their own sequence length).
``TransformerLM(config)`` looks its ``attention_backend`` up here by name, so later chapters
plug their kernels in without touching the model::

    @register_attention_backend("flash_triton", kv_offsets=True, stores_scores=False)
    def _flash(q, k, v, causal=True, **options): ...

What a backend can do is registered with it and read back with :func:`attention_capabilities`:
``kv_offsets`` (it takes fewer queries than keys, the queries being the last positions, as when
decoding with a KV cache), ``grouped_kv`` (it takes ``k, v`` with fewer heads than ``q``, each
key/value head serving a group of query heads, so the model need not copy them) and
``stores_scores`` (autograd keeps the ``T x T`` score matrix, which the memory estimate of
:mod:`lmcore.accounting` counts).

Backends defined in optional subpackages register themselves on import; ``get_attention_backend``
imports the module listed in ``_LAZY`` the first time such a name is asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

AttentionFn = Callable[..., "object"]


@dataclass(frozen=True)
class AttentionCapabilities:
    """What a registered backend can do (see the module docstring)."""

    kv_offsets: bool = False
    grouped_kv: bool = False
    stores_scores: bool = False


_BACKENDS: dict[str, AttentionFn] = {}
_CAPABILITIES: dict[str, AttentionCapabilities] = {}

# name -> module that registers it when imported (kept lazy so torch-only users never import triton)
_LAZY: dict[str, str] = {
    "reference": "lmcore.nn.attention",
    "vectorized": "lmcore.nn.attention",
    "sdpa": "lmcore.nn.attention",
    "flash_torch": "lmcore.kernels",
    "flash_triton": "lmcore.kernels",
    "block_sparse": "lmcore.sparse",
    "nsa": "lmcore.sparse",
}


def register_attention_backend(name: str, *, kv_offsets: bool = False, grouped_kv: bool = False,
                               stores_scores: bool = False) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator: register ``fn`` as the attention backend called ``name``, with its capabilities."""

    def decorate(fn: AttentionFn) -> AttentionFn:
        _BACKENDS[name] = fn
        _CAPABILITIES[name] = AttentionCapabilities(kv_offsets=kv_offsets, grouped_kv=grouped_kv,
                                                    stores_scores=stores_scores)
        return fn

    return decorate


def get_attention_backend(name: str) -> AttentionFn:
    """The backend registered as ``name``; raises ``ValueError`` listing the known names."""
    if name not in _BACKENDS and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _BACKENDS:
        known = sorted(set(_BACKENDS) | set(_LAZY))
        raise ValueError(f"unknown attention backend {name!r}; expected one of: {', '.join(known)}")
    return _BACKENDS[name]


def attention_capabilities(name: str) -> AttentionCapabilities:
    """What the backend ``name`` can do (importing the module that registers it if needed)."""
    get_attention_backend(name)
    return _CAPABILITIES[name]


def attention_backends() -> list[str]:
    """Names of every backend that can be asked for."""
    return sorted(set(_BACKENDS) | set(_LAZY))
