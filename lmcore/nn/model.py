"""The pre-norm decoder-only Transformer language model and its KV cache."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmcore.nn.attention import CausalSelfAttention
from lmcore.nn.config import ModelConfig
from lmcore.nn.layers import Embedding, Linear, RMSNorm, SwiGLU
from lmcore.nn.rope import RotaryEmbedding


class KVCache:
    """Keys and values of every layer for the positions already processed.

    Preallocated to ``max_len`` positions: decoding step ``t`` writes one column and reads the
    first ``t + 1``, so a new token costs one step instead of re-running the whole prefix.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        self.max_len = max_len or config.context_length
        if self.max_len > config.context_length:
            raise ValueError(f"KV cache of {self.max_len} positions exceeds context_length={config.context_length}")
        shape = (config.n_layers, batch_size, config.kv_heads, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, max_len, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, max_len, D)
        self.length = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        """Store ``k, v`` (B, Hkv, T, D) at ``start_pos`` and return all keys/values up to there."""
        end = start_pos + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to position {end}")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, Hkv, end, D)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class TransformerBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + ffn(norm(x))`` (pre-norm residual block)."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, device=device, dtype=dtype)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads, config.n_kv_heads,
                                        config.attention_backend, config.attention_options,
                                        device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps, device=device, dtype=dtype)
        self.ffn = SwiGLU(config.d_model, config.d_ff, device=device, dtype=dtype)

    def forward(self, x, rope=None, start_pos: int = 0, cache=None, layer: int = 0):
        x = x + self.attn(self.attn_norm(x), rope, start_pos, cache, layer)  # (B, T, d)
        return x + self.ffn(self.ffn_norm(x))  # (B, T, d)


class TransformerLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size).

    ``activation_checkpointing = True`` recomputes each block's activations in the backward pass
    instead of storing them (less memory, about one more forward pass of compute).
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"TransformerLM expects a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.activation_checkpointing = False
        embed_std = config.d_model ** -0.5 if config.tie_weights else 1.0
        self.embedding = Embedding(config.vocab_size, config.d_model, std=embed_std, device=device, dtype=dtype)
        self.rope = RotaryEmbedding(config.head_dim, config.context_length, config.rope_theta,
                                    config.rope_style, device=device)
        self.blocks = nn.ModuleList(TransformerBlock(config, device, dtype) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps, device=device, dtype=dtype)
        self.lm_head = Linear(config.d_model, config.vocab_size, device=device, dtype=dtype)
        if config.tie_weights:
            self.lm_head.weight = self.embedding.weight

    def forward(self, token_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must have shape (batch, seq), got {tuple(token_ids.shape)}")
        T = token_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's "
                             f"context_length={self.config.context_length}")
        x = self.embedding(token_ids)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, self.rope, start, None, i, use_reentrant=False)
            else:
                x = block(x, self.rope, start, cache, i)  # (B, T, d)
        if cache is not None:
            cache.length = start + T
        return self.lm_head(self.final_norm(x))  # (B, T, vocab)

    def num_parameters(self) -> int:
        """Trainable parameters, counting a tied embedding/head matrix once."""
        return sum(p.numel() for p in self.parameters())
