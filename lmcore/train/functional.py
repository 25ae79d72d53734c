"""Loss, learning-rate schedule and gradient clipping, each from its formula."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log softmax(logits)[target]`` over all positions.

    Computed as ``logsumexp(logits) - logits[target]`` in float32: the log-sum-exp subtracts
    the row maximum before exponentiating, so huge logits neither overflow nor lose the answer.
    ``logits`` (..., V), ``targets`` (...) of integer ids.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree: "
                         "expected logits of shape targets.shape + (vocab_size,)")
    logits = logits.float()  # (..., V)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)
    return (torch.logsumexp(logits, dim=-1) - picked).mean()


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to ``max_lr`` over ``warmup_steps``, cosine decay to ``min_lr`` at
    ``total_steps``, then constant ``min_lr``."""
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping as a 0-d tensor (reading it with ``float()`` waits for the GPU).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    same_device = len({g.device for g in grads}) == 1
    norms = torch._foreach_norm(grads) if same_device else [g.norm() for g in grads]
    norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))  # sqrt of the sum of squares
    scale = torch.clamp(max_norm / (norm + eps), max=1.0)
    if same_device:
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    else:
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return norm


def unigram_cross_entropy(train_tokens, val_tokens, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``val_tokens`` of a model that ignores context: token
    frequencies counted on ``train_tokens`` (add-one smoothed). The baseline a language model
    must beat."""
    import numpy as np

    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val_tokens, dtype=np.int64)].mean())
