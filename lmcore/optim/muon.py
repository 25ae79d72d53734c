"""Muon (Jordan et al., 2024): momentum orthogonalized by Newton-Schulz, for the hidden matrices.

For a weight matrix, SGD's momentum ``B`` is dominated by a few directions (its top singular
vectors). Muon replaces it with the nearest semi-orthogonal matrix, ``U V^T`` of ``B = U S V^T``:
every direction of the update gets the same size. A quintic Newton-Schulz iteration reaches it
with matrix products only (no SVD)::

    X_0 = B / ||B||_F                                   (singular values now <= 1)
    X_{k+1} = a X_k + (b A + c A^2) X_k,   A = X_k X_k^T,   (a, b, c) = (3.4445, -4.7750, 2.0315)

Each step maps a singular value ``s`` to ``a s + b s^3 + c s^5``; the coefficients push every value
from (0, 1] into about [0.7, 1.2] in five steps (not exactly 1: speed is bought with precision,
which the update does not need). On a GPU the products run in bfloat16 on tensor cores, and all
matrices of one shape are stacked and iterated together (one batched product instead of many).

The step for a matrix parameter ``W`` (m x n) with gradient ``G``::

    B <- mu B + (1 - mu) G;     N = G + mu (B - G)   (Nesterov: lerp(G, B, mu))
    W <- W (1 - lr wd) - lr * scale(m, n) * NS5(N)

``scale="spectral"`` is ``sqrt(max(1, m / n))`` (Jordan's, with lr about 0.02); ``"rms"`` is
``0.2 sqrt(max(m, n))`` (Liu et al., 2025), which gives the update the root-mean-square of a typical
AdamW step, so Muon can share AdamW's learning rate and schedule. Embeddings, the output head and
1-D parameters are not hidden matrices: they take AdamW steps (learning rate ``lr * adam_lr_ratio``)
inside the same optimizer; a group says which with ``use_muon``.
"""

from __future__ import annotations

import torch

from lmcore.optim.base import KeepsStateDtypes, adamw_, as_matrix, check_range, check_betas
from lmcore.utils import closure_loss

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SCALES = ("rms", "spectral")


def newton_schulz(B: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The approximately orthogonal factor of each matrix in ``B`` (..., m, n), computed in ``dtype``."""
    a, b, c = NS_COEFFICIENTS
    X = B.to(dtype or B.dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # (..., m, n) singular values <= 1
    for _ in range(steps):
        A = X @ X.mT  # (..., m, m)
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def update_scale(m: int, n: int, scale: str) -> float:
    return max(1.0, m / n) ** 0.5 if scale == "spectral" else 0.2 * max(m, n) ** 0.5


class Muon(KeepsStateDtypes, torch.optim.Optimizer):
    """``Muon(params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0, scale="rms",
    adam_lr_ratio=1.0, adam_betas=(0.9, 0.95), adam_eps=1e-8, ns_dtype=None)``.

    A group with ``use_muon=False`` is stepped by AdamW; without the key, a group's matrices use
    Muon and its other parameters AdamW. ``ns_dtype=None`` is bfloat16 on CUDA, float32 elsewhere.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, scale: str = "rms", adam_lr_ratio: float = 1.0,
                 adam_betas=(0.9, 0.95), adam_eps: float = 1e-8, ns_dtype: torch.dtype | None = None):
        check_range("Muon", "lr", lr, 0.0)
        check_range("Muon", "momentum", momentum, 0.0, 1.0, high_open=True)
        check_range("Muon", "ns_steps", ns_steps, 1, 100, integer=True)
        check_range("Muon", "weight_decay", weight_decay, 0.0)
        check_range("Muon", "adam_lr_ratio", adam_lr_ratio, 0.0)
        check_range("Muon", "adam_eps", adam_eps, 0.0, low_open=True)
        if scale not in SCALES:
            raise ValueError(f"Muon: scale={scale!r} is out of range; expected one of {SCALES}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=bool(nesterov), ns_steps=int(ns_steps),
                        weight_decay=weight_decay, scale=scale, adam_lr_ratio=adam_lr_ratio,
                        adam_betas=check_betas("Muon", adam_betas, "adam_betas"), adam_eps=adam_eps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            flag = group.get("use_muon")
            muon = [p for p in params if (flag if flag is not None else p.ndim >= 2)]
            self._adam(group, [p for p in params if not (flag if flag is not None else p.ndim >= 2)])
            by_shape: dict[tuple, list] = {}
            for p in muon:
                by_shape.setdefault((tuple(p.shape), p.device, p.dtype), []).append(p)
            for same in by_shape.values():
                self._muon(group, same)
        return loss

    def _muon(self, group, params: list) -> None:
        """One Muon step of parameters of one shape: their Newton-Schulz iterations run as one batch."""
        mu, lr = group["momentum"], group["lr"]
        updates = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            updates.append(as_matrix(p.grad.lerp(buf, mu) if group["nesterov"] else buf))
        dtype = self.ns_dtype or (torch.bfloat16 if params[0].is_cuda else torch.float32)
        O = newton_schulz(torch.stack(updates), group["ns_steps"], dtype)  # (k, m, n)
        m, n = updates[0].shape
        step = lr * update_scale(m, n, group["scale"])
        for p, o in zip(params, O):
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(o.view_as(p).to(p.dtype), alpha=-step)

    def _adam(self, group, params: list) -> None:
        beta1, beta2 = group["adam_betas"]
        lr = group["lr"] * group["adam_lr_ratio"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            adamw_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"], lr=lr, beta1=beta1,
                   beta2=beta2, eps=group["adam_eps"], weight_decay=group["weight_decay"])
