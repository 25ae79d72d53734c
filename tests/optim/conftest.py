"""Optimizer tests: tiny models and matrices on CPU; the fused kernels under Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is first defined

from lmcore.nn import ModelConfig, TransformerLM  # noqa: E402
from lmcore.train import cross_entropy  # noqa: E402

TINY = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=2, d_ff=48)

#: Small enough hyperparameters for every optimizer to use its quantized or factored path on TINY.
HP = {
    "adamw": dict(lr=3e-3),
    "adamw8bit": dict(lr=3e-3, min_8bit_size=256),
    "shampoo": dict(lr=3e-3, precondition_frequency=3),
    "soap": dict(lr=3e-3, precondition_frequency=3),
    "soap-lowbit": dict(lr=3e-3, precondition_frequency=3, bits=4, quantize_bases=True),
    "muon": dict(lr=3e-3),
}


def tiny_model(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TINY)


def tiny_batch(seed: int = 1, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TINY.vocab_size, (batch, TINY.context_length + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def train_steps(model, opt, steps: int, seed: int = 1) -> list[float]:
    losses = []
    for i in range(steps):
        x, y = tiny_batch(seed + i % 2)
        loss = cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture
def hp():
    return HP
