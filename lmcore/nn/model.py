"""The pre-norm decoder-only Transformer language model and its KV cache."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmcore.nn.attention import CausalSelfAttention
from lmcore.nn.config import ModelConfig
from lmcore.nn.layers import MLP, Embedding, Linear, SwiGLU, make_norm
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
    """``x + attn(norm(x))`` then ``x + ffn(norm(x))`` (pre-norm residual block).

    With ``parallel_residual`` (GPT-NeoX) both branches read the same ``x``:
    ``x + attn(norm1(x)) + ffn(norm2(x))``, so they need not wait for each other.
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        c = config
        self.parallel_residual = c.parallel_residual
        self.attn_norm = make_norm(c.norm, c.d_model, c.norm_eps, c.norm_bias, device=device, dtype=dtype)
        self.attn = CausalSelfAttention(c.d_model, c.n_heads, c.n_kv_heads, c.attention_backend,
                                        c.attention_options, device=device, dtype=dtype, head_dim=c.head_dim,
                                        bias=c.attention_bias, qk_norm=c.qk_norm, norm_eps=c.norm_eps)
        self.ffn_norm = make_norm(c.norm, c.d_model, c.norm_eps, c.norm_bias, device=device, dtype=dtype)
        ffn = SwiGLU if c.mlp == "gated" else MLP
        self.ffn = ffn(c.d_model, c.d_ff, c.activation, c.mlp_bias, device=device, dtype=dtype)

    def forward(self, x, rope=None, start_pos: int = 0, cache=None, layer: int = 0):
        attn = self.attn(self.attn_norm(x), rope, start_pos, cache, layer)  # (B, T, d)
        if self.parallel_residual:
            return x + attn + self.ffn(self.ffn_norm(x))  # (B, T, d)
        x = x + attn  # (B, T, d)
        return x + self.ffn(self.ffn_norm(x))  # (B, T, d)


class TransformerLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size).

    ``activation_checkpointing`` recomputes chosen blocks' activations in the backward pass instead
    of storing them (less memory, about one more forward pass of those blocks): ``False`` (none),
    ``True`` (every block), an integer ``k`` (every k-th block: 0, k, 2k, ...) or a list of block
    indices. ``from_pretrained``/``save_pretrained`` read and write Hugging Face checkpoint folders
    (see :mod:`lmcore.nn.hf`).
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"TransformerLM expects a ModelConfig, got {type(config).__name__}")
        c = self.config = config
        self.activation_checkpointing = False
        embed_std = c.d_model ** -0.5 if c.tie_weights else 1.0
        self.embedding = Embedding(c.vocab_size, c.d_model, std=embed_std, device=device, dtype=dtype)
        self.rope = RotaryEmbedding(c.rotary_dim, c.context_length, c.rope_theta, c.rope_style, device=device)
        self.blocks = nn.ModuleList(TransformerBlock(c, device, dtype) for _ in range(c.n_layers))
        self.final_norm = make_norm(c.norm, c.d_model, c.norm_eps, c.norm_bias, device=device, dtype=dtype)
        self.lm_head = Linear(c.d_model, c.vocab_size, device=device, dtype=dtype)
        if c.tie_weights:
            self.lm_head.weight = self.embedding.weight

    @property
    def activation_checkpointing(self):
        return self._checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, choice):
        self._checkpointed = checkpointed_blocks(choice, self.config.n_layers)
        self._checkpointing = choice

    def hidden_states(self, token_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final normalised residual stream (B, T, d): everything but the output head."""
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must have shape (batch, seq), got {tuple(token_ids.shape)}")
        T = token_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's "
                             f"context_length={self.config.context_length}")
        x = self.embedding(token_ids)  # (B, T, d)
        recompute = self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute and i in self._checkpointed:
                x = checkpoint(block, x, self.rope, start, None, i, use_reentrant=False)
            else:
                x = block(x, self.rope, start, cache, i)  # (B, T, d)
        if cache is not None:
            cache.length = start + T
        return self.final_norm(x)  # (B, T, d)

    def forward(self, token_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(token_ids, cache))  # (B, T, vocab)

    def loss(self, token_ids: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy; with ``chunk_size`` the logits are formed ``chunk_size``
        positions at a time and never held whole (:func:`lmcore.train.chunked_cross_entropy`)."""
        from lmcore.train.functional import chunked_cross_entropy, cross_entropy

        if chunk_size is None:
            return cross_entropy(self(token_ids), targets)
        return chunked_cross_entropy(self.hidden_states(token_ids), self.lm_head.weight, targets, chunk_size)

    def num_parameters(self) -> int:
        """Trainable parameters, counting a tied embedding/head matrix once."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, folder, **overrides) -> "TransformerLM":
        """Load a Hugging Face ``GPTNeoXForCausalLM`` or ``Qwen3ForCausalLM`` folder from disk."""
        from lmcore.nn.hf import load_pretrained

        return load_pretrained(folder, **overrides)

    def save_pretrained(self, folder, architecture: str | None = None, overwrite: bool = False) -> None:
        """Write a folder the reference library loads (``config.json`` and ``model.safetensors``)."""
        from lmcore.nn.hf import save_pretrained

        save_pretrained(self, folder, architecture, overwrite)


def checkpointed_blocks(choice, n_layers: int) -> frozenset[int]:
    """Indices of the blocks that ``activation_checkpointing = choice`` recomputes."""
    if choice is None or choice is False:
        return frozenset()
    if choice is True:
        return frozenset(range(n_layers))
    if isinstance(choice, int):
        if choice < 1:
            raise ValueError(f"activation_checkpointing={choice} must be True, False, a positive k "
                             "(every k-th block) or a list of block indices")
        return frozenset(range(0, n_layers, choice))
    blocks = frozenset(choice)
    bad = sorted(b for b in blocks if not isinstance(b, int) or not 0 <= b < n_layers)
    if bad:
        raise ValueError(f"activation_checkpointing lists blocks {bad}; the model has blocks 0..{n_layers - 1}")
    return blocks
