"""Rotary position embeddings (RoPE), in both conventions published models use.

Each pair of channels ``(a, b)`` of a query or key at position ``m`` is rotated by the angle
``m * theta_i`` with ``theta_i = base^(-2i/d)``. Which channels form a pair differs:

- ``"interleaved"`` pairs neighbours ``(x0, x1), (x2, x3), ...`` (the RoFormer paper, GPT-J, Llama's
  original release);
- ``"half"`` pairs channel ``i`` with ``i + d/2`` (GPT-NeoX, and Llama checkpoints converted to
  the Hugging Face layout).

The two are the same rotation applied to a permuted set of channels. Some models rotate only the
first channels of each head (GPT-NeoX/Pythia: a quarter) and pass the rest through unchanged:
build the table for those channels, and ``forward`` leaves any further channels as they are.
"""

from __future__ import annotations

import torch
from torch import nn

ROPE_STYLES = ("half", "interleaved")


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions ``0 .. max_seq_len-1``; ``forward`` rotates a tensor."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0, style: str = "half",
                 device=None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got head_dim={head_dim}")
        if style not in ROPE_STYLES:
            raise ValueError(f"rope style {style!r} is not one of {ROPE_STYLES}")
        self.head_dim, self.max_seq_len, self.style = head_dim, max_seq_len, style
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), inv_freq)
        # (max_seq_len, head_dim/2); not saved in checkpoints: they are a function of the config
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotate ``x`` of shape (..., T, D >= head_dim) whose first token sits at ``start_pos``;
        channels past ``head_dim`` (partial rotary) pass through."""
        if x.shape[-1] > self.head_dim:
            rotated = self(x[..., : self.head_dim], start_pos)  # (..., T, head_dim)
            return torch.cat((rotated, x[..., self.head_dim:]), dim=-1)  # (..., T, D)
        T = x.shape[-2]
        if start_pos + T > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed the rotary table "
                             f"of {self.max_seq_len} positions (the model's context_length)")
        cos = self.cos[start_pos:start_pos + T].to(x.dtype)  # (T, D/2)
        sin = self.sin[start_pos:start_pos + T].to(x.dtype)  # (T, D/2)
        if self.style == "interleaved":
            a, b = x[..., 0::2], x[..., 1::2]  # (..., T, D/2) each
            return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)  # (..., T, D)
        half = self.head_dim // 2
        a, b = x[..., :half], x[..., half:]  # (..., T, D/2) each
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)  # (..., T, D)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, style={self.style!r}"
