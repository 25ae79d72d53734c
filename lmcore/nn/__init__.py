"""The Transformer language model, written out layer by layer (chapter 2).

``TransformerLM(config)`` plugs in its attention by name from :mod:`lmcore.nn.registry`
(``reference``, ``vectorized``, ``sdpa`` here; later chapters register more).
"""

from lmcore.nn.attention import (CausalSelfAttention, causal_mask, reference_attention,
                                 scaled_dot_product_attention, sdpa_attention, vectorized_attention)
from lmcore.nn.config import PRESETS, ModelConfig
from lmcore.nn.layers import MLP, Embedding, LayerNorm, Linear, RMSNorm, SwiGLU, make_norm, silu, softmax
from lmcore.nn.model import KVCache, TransformerBlock, TransformerLM, checkpointed_blocks
from lmcore.nn.registry import (attention_backends, attention_capabilities, get_attention_backend,
                                register_attention_backend)
from lmcore.nn.rope import ROPE_STYLES, RotaryEmbedding

__all__ = [
    "CausalSelfAttention", "Embedding", "KVCache", "LayerNorm", "Linear", "MLP", "ModelConfig", "PRESETS",
    "RMSNorm", "ROPE_STYLES", "RotaryEmbedding", "SwiGLU", "TransformerBlock", "TransformerLM",
    "attention_backends", "attention_capabilities", "causal_mask", "checkpointed_blocks", "get_attention_backend",
    "make_norm", "reference_attention", "register_attention_backend",
    "scaled_dot_product_attention", "sdpa_attention", "silu", "softmax", "vectorized_attention",
]
