"""The Transformer's building blocks, written out from their definitions.

No ``torch.nn.Linear``/``Embedding``/``LayerNorm`` here: each layer holds its own
``nn.Parameter`` and its forward pass is the formula from the chapter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill ``tensor`` from N(0, std^2) truncated to [-3 std, 3 std] (in place)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std)


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with ``W`` of shape (out_features, in_features); a bias only if asked for.

    Initialised from a truncated normal with variance ``2 / (in + out)`` (Glorot); the bias at zero.
    """

    def __init__(self, in_features: int, out_features: int, std: float | None = None, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        truncated_normal_(self.weight, std if std is not None else math.sqrt(2.0 / (in_features + out_features)))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.t()  # (..., in) @ (in, out) -> (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(nn.Module):
    """A lookup table: row ``i`` of ``weight`` is the vector of token ``i``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        truncated_normal_(self.weight, std)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[token_ids]  # (B, T) -> (B, T, d_model)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * g``, computed in float32 and cast back to the input dtype."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x32 = x.float()  # (B, T, d)
        rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (B, T, 1)
        return (x32 * rms * self.weight.float()).to(in_dtype)  # (B, T, d)


class LayerNorm(nn.Module):
    """``(x - mean(x)) / sqrt(var(x) + eps) * g + b`` in float32, cast back (GPT-2, GPT-NeoX)."""

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        # F.layer_norm computes the formula above in one kernel
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), bias, self.eps).to(x.dtype)


def make_norm(kind: str, d_model: int, eps: float, bias: bool = False, device=None, dtype=None) -> nn.Module:
    """``"rmsnorm"`` or ``"layernorm"`` (the config's ``norm``)."""
    if kind == "layernorm":
        return LayerNorm(d_model, eps, bias, device=device, dtype=dtype)
    return RMSNorm(d_model, eps, device=device, dtype=dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)`` (also called swish)."""
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """The gated feed-forward network ``W2 (silu(W1 x) * W3 x)``.

    ``W1`` and ``W3`` are stacked in one (2 d_ff, d_model) matrix ``w13`` so both come from one
    matmul; ``w13.weight[:d_ff]`` is ``W1`` and ``w13.weight[d_ff:]`` is ``W3``.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "silu", bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.d_ff, self.act = d_ff, ACTIVATIONS[activation]
        self.w13 = Linear(d_model, 2 * d_ff, std=math.sqrt(2.0 / (d_model + d_ff)), bias=bias,
                          device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.d_ff, dim=-1)  # (B, T, d_ff) each: W1 x, W3 x
        return self.w2(self.act(gate) * up)  # (B, T, d); F.silu computes silu() above in one kernel


class MLP(nn.Module):
    """The two-layer feed-forward network ``W2 act(W1 x + b1) + b2`` (GPT-2, GPT-NeoX)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.w1 = Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))  # (B, T, d_ff) -> (B, T, d)


#: Activation functions by the config's name for them.
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``, stable for large inputs: subtract the maximum before ``exp``.

    A row that is entirely ``-inf`` (nothing to attend to) gives zeros rather than NaN.
    """
    peak = x.amax(dim=dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    e = torch.exp(x - peak)
    total = e.sum(dim=dim, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))
