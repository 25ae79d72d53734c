"""Shampoo (Gupta, Koren and Singer, 2018) with Adam grafting (Anil et al., 2020).

A full-matrix preconditioner for an ``m x n`` weight would be ``mn x mn``. Shampoo keeps one
factor per side instead, the statistics of the gradient's rows and of its columns::

    L <- beta2 L + (1 - beta2) G G^T          (m x m)
    R <- beta2 R + (1 - beta2) G^T G          (n x n)

and preconditions the momentum ``M`` from both sides, ``L^(-1/p) M R^(-1/p)`` with ``p = 4``, which
is the full-matrix preconditioner ``(L (x) R)^(-1/2)`` of a Kronecker-factored covariance. The
roots are recomputed every ``precondition_frequency`` steps, from an eigendecomposition in float32::

    L + eps I = Q diag(lambda) Q^T   ->   L^(-1/p) = Q diag(lambda^(-1/p)) Q^T

Grafting takes the direction from Shampoo and the size from Adam: per parameter, the update is
Shampoo's direction rescaled to the norm of Adam's step ``m_hat / (sqrt(v_hat) + eps)``, so
AdamW's schedule carries over. Its learning rate need not: the same norm in another direction is
another step, and Shampoo's loss can jump at a rate where AdamW's does not. A side longer than
``max_precond_dim`` gets no factor (identity); with no factor at all, or for a 1-D parameter, the
update is Adam's.

Parameters of one shape are stacked: one batched product per side for the preconditioning, one
batched ``eigh`` per factor size at a refresh, and the grafting norms without a host round trip.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lmcore.optim.base import (SIDES, KeepsStateDtypes, adam_direction, adam_group_defaults, as_matrix,
                               check_range, stacks, symmetric_eigh)
from lmcore.utils import closure_loss


def inverse_root(factor: torch.Tensor, root: int, eps: float) -> torch.Tensor:
    """``(factor + eps I)^(-1/root)`` of a symmetric positive semi-definite matrix (or a stack of
    them, ``(..., d, d)``), in float32."""
    a = factor.float()
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    lam, q = symmetric_eigh(a + eps * eye)  # a is symmetric: real eigenvalues, orthogonal q
    lam = lam.clamp_min(eps)  # rounding can leave tiny negative eigenvalues
    return (q * lam.pow(-1.0 / root).unsqueeze(-2)) @ q.mT


class Shampoo(KeepsStateDtypes, torch.optim.Optimizer):
    """``Shampoo(params, lr, betas, eps, weight_decay, precondition_frequency=10, max_precond_dim=4096,
    root=4, matrix_eps=1e-12)``; ``betas[1]`` also decays the factors."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, precondition_frequency: int = 10, max_precond_dim: int = 4096,
                 root: int = 4, matrix_eps: float = 1e-12):
        defaults = adam_group_defaults("Shampoo", lr, betas, eps, weight_decay)
        check_range("Shampoo", "precondition_frequency", precondition_frequency, 1, integer=True)
        check_range("Shampoo", "max_precond_dim", max_precond_dim, 0, integer=True)
        check_range("Shampoo", "root", root, 1, integer=True)
        check_range("Shampoo", "matrix_eps", matrix_eps, 0.0, low_open=True)
        defaults.update(precondition_frequency=int(precondition_frequency),
                        max_precond_dim=int(max_precond_dim),
                        root=int(root), matrix_eps=matrix_eps)
        super().__init__(params, defaults)

    def _init_state(self, p, group) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            if p.ndim >= 2:
                m, n = as_matrix(p).shape
                for side, dim in (("left", m), ("right", n)):
                    if dim <= group["max_precond_dim"]:
                        state[side] = torch.zeros(dim, dim, dtype=torch.float32, device=p.device)
                        state[side + "_root"] = torch.eye(dim, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            buckets = defaultdict(list)  # same shape, sides and step: one stack
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p, group)
                state["step"] += 1
                sides = tuple(s in state for s in SIDES)
                buckets[(tuple(p.shape), sides, state["step"])].append(p)
            budget = max((p.numel() for ps in buckets.values() for p in ps), default=0)
            for (_, sides, t), ps in buckets.items():
                for stack in stacks(ps, self.state, budget):
                    self._step_bucket(stack, group, t, any(sides))
        return loss

    def _step_bucket(self, ps: list, group, t: int, factored: bool) -> None:
        (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
        states = [self.state[p] for p in ps]
        grads = [p.grad for p in ps]
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        updates = [adam_direction(m, v, t, beta1, beta2, eps) for m, v in zip(ms, vs)]  # Adam's: the graft
        if factored:
            adam = torch.stack(updates)
            direction = self._precondition(states, grads, ms, t, group)  # (k, m, n)
            norm = direction.flatten(1).norm(dim=1)
            scale = torch.where(norm > 0, adam.flatten(1).norm(dim=1) / norm, torch.ones_like(norm))
            updates = list((direction * scale[:, None, None]).unbind(0))
        torch._foreach_mul_(ps, 1 - lr * group["weight_decay"])
        torch._foreach_add_(ps, [u.view_as(p).to(p.dtype) for u, p in zip(updates, ps)], alpha=-lr)

    def _precondition(self, states: list, grads: list, ms: list, t: int, group) -> torch.Tensor:
        """Update the factors, refresh their roots when due, and return ``L^(-1/p) M R^(-1/p)`` for
        the stack of same-shaped parameters."""
        beta2 = group["betas"][1]
        for state, g in zip(states, grads):
            G = as_matrix(g).float()  # (m, n)
            if "left" in state:
                state["left"].lerp_(G @ G.T, 1 - beta2)  # (m, m)
            if "right" in state:
                state["right"].lerp_(G.T @ G, 1 - beta2)  # (n, n)
        M = torch.stack([as_matrix(m).float() for m in ms])  # (k, m, n)
        for side in SIDES:
            if side not in states[0]:
                continue
            if (t - 1) % group["precondition_frequency"] == 0:
                roots = inverse_root(torch.stack([s[side] for s in states]), group["root"],
                                     group["matrix_eps"])
                for state, r in zip(states, roots):
                    state[side + "_root"] = r.clone()
            root = torch.stack([s[side + "_root"] for s in states])
            M = root @ M if side == "left" else M @ root
        return M
