"""Loss, learning-rate schedule and gradient clipping, each from its formula."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log softmax(logits)[target]`` over all positions.

    That is ``logsumexp(logits) - logits[target]``, in float32: the log-sum-exp subtracts the row
    maximum before exponentiating, so huge logits neither overflow nor lose the answer. PyTorch's
    fused log-softmax kernel computes exactly this, forward and backward, in one pass over each row.
    ``logits`` (..., V), ``targets`` (...) of integer ids.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree: "
                         "expected logits of shape targets.shape + (vocab_size,)")
    logits = logits.float()  # (..., V)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward: the loss chunk by chunk, keeping only each row's log-sum-exp. Backward: each chunk's
    logits again, ``softmax - onehot`` from the kept log-sum-exp, then the two matmul gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype):
        n = hidden.shape[0]
        w = weight.to(compute_dtype)  # (V, d), the autocast copy
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            logits = (hidden[s:s + chunk_size].to(compute_dtype) @ w.t()).float()  # (chunk, V), the only logits
            lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets[s:s + chunk_size, None]).squeeze(-1)  # (chunk,)
            total += (lse[s:s + chunk_size] - picked).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return total / n

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        n, c, dtype = hidden.shape[0], ctx.chunk_size, ctx.compute_dtype
        w = weight.to(dtype)  # (V, d)
        grad_h = torch.empty_like(hidden)  # (N, d)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, d)
        scale = grad.float() / n
        for s in range(0, n, c):
            h = hidden[s:s + c].to(dtype)  # (chunk, d)
            probs = torch.exp((h @ w.t()).float() - lse[s:s + c, None])  # (chunk, V) softmax
            probs[torch.arange(probs.shape[0], device=probs.device), targets[s:s + c]] -= 1.0
            d_logits = (probs * scale).to(dtype)  # (chunk, V) d loss / d logits
            grad_h[s:s + c] = (d_logits @ w).to(hidden.dtype)  # (chunk, d)
            grad_w += (d_logits.t() @ h).float()  # (V, d)
        return grad_h, grad_w.to(weight.dtype), None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 4096) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets)`` without ever holding all the logits.

    ``hidden`` (..., d) are the final hidden states, ``weight`` (V, d) the output head, ``targets``
    (...). The logits are formed ``chunk_size`` rows at a time, in the forward pass and again in
    the backward pass, so the largest temporary is (chunk_size, V) instead of (tokens, V): for
    Qwen3's vocabulary of 151,936 at 32k tokens that is 20 GB of float32 logits avoided. Under
    autocast the matmuls run in the autocast dtype, the softmax in float32, as in ``cross_entropy``.
    """
    if hidden.shape[:-1] != targets.shape or weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and targets "
                         f"{tuple(targets.shape)} disagree: expected (..., d), (V, d) and (...)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):
        return _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                          chunk_size, dtype)


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
