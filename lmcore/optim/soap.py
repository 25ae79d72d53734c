"""SOAP (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"): Adam run in the
eigenbasis of Shampoo's preconditioner.

Shampoo's factors ``L = E[G G^T]`` and ``R = E[G^T G]`` (:mod:`lmcore.optim.shampoo`) have
eigenvectors ``Q_L`` and ``Q_R``. Shampoo rescales the gradient along those directions by fixed
powers of the eigenvalues; SOAP rotates the gradient into that basis and lets Adam choose the
scale of every coordinate from its own running second moment::

    G' = Q_L^T G Q_R                            (rotate)
    m  <- beta1 m + (1 - beta1) G               (first moment, kept in the original basis)
    v  <- beta2 v + (1 - beta2) G'^2            (second moment, in the rotated basis)
    U  = Q_L [ (Q_L^T m Q_R) / (sqrt(v) + eps) ] Q_R^T          (Adam's step, rotated back)
    p  <- p (1 - lr wd) - lr sqrt(1 - beta2^t) / (1 - beta1^t) U

The factors are updated every step; the bases are refreshed every ``precondition_frequency``
steps by one step of power iteration and a QR decomposition (cheaper than an eigendecomposition
and, since the factors move slowly, as good)::

    Q <- qr(L Q).Q       (columns ordered by the estimated eigenvalues diag(Q^T L Q), largest first)

with ``v`` permuted to the new order. The first step only measures: it fills the factors, takes
their eigenvectors (``eigh``, float32) as the first bases, and leaves the weights alone. With the
bases held at the identity, every line above is Adam. A side longer than ``max_precond_dim`` keeps
the identity (no rotation on that side); 1-D parameters are never rotated.
"""

from __future__ import annotations

import torch

from lmcore.optim.base import KeepsStateDtypes, adam_group_defaults, as_matrix, check_range, symmetric_eigh
from lmcore.utils import closure_loss

SIDES = ("left", "right")


class SOAP(KeepsStateDtypes, torch.optim.Optimizer):
    """``SOAP(params, lr, betas, eps, weight_decay, precondition_frequency=10, max_precond_dim=4096,
    shampoo_beta=None)``; ``shampoo_beta`` decays the factors (default: ``betas[1]``)."""

    name = "SOAP"

    def __init__(self, params, lr: float = 3e-3, betas=(0.95, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, precondition_frequency: int = 10, max_precond_dim: int = 4096,
                 shampoo_beta: float | None = None):
        defaults = adam_group_defaults(self.name, lr, betas, eps, weight_decay)
        check_range(self.name, "precondition_frequency", precondition_frequency, 1, integer=True)
        check_range(self.name, "max_precond_dim", max_precond_dim, 0, integer=True)
        if shampoo_beta is not None:
            check_range(self.name, "shampoo_beta", shampoo_beta, 0.0, 1.0, high_open=True)
        defaults.update(precondition_frequency=int(precondition_frequency),
                        max_precond_dim=int(max_precond_dim),
                        shampoo_beta=shampoo_beta)
        super().__init__(params, defaults)

    # -- where the moments and bases live (the low-bit variant stores them quantized) --------------

    def _load(self, state: dict, key: str) -> torch.Tensor:
        return state[key]

    def _save(self, state: dict, key: str, value: torch.Tensor) -> None:
        state[key] = value

    # -- the rotation -------------------------------------------------------------------------------

    def _bases(self, state: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return tuple(self._load(state, side + "_basis") if side in state else None for side in SIDES)

    @staticmethod
    def _rotate(bases, x: torch.Tensor, back: bool = False) -> torch.Tensor:
        """``Q_L^T x Q_R`` (or ``Q_L x Q_R^T`` with ``back``) of a matrix; missing sides are identity."""
        left, right = bases
        if left is not None:
            x = (left if back else left.T) @ x
        if right is not None:
            x = x @ (right.T if back else right)
        return x

    def _start(self, p, group) -> None:
        """First step: the factors from this gradient and their eigenvectors as the bases."""
        state = self.state[p]
        state["step"] = 0
        G = as_matrix(p.grad).float() if p.ndim >= 2 else None
        beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
        for side in SIDES if G is not None else ():
            dim = G.shape[0] if side == "left" else G.shape[1]
            if dim <= group["max_precond_dim"]:
                state[side] = (G @ G.T if side == "left" else G.T @ G).mul_(1 - beta)  # lerp from zero
                eye = torch.eye(dim, dtype=torch.float32, device=p.device)
                _, q = symmetric_eigh(state[side] + 1e-30 * eye)
                self._save(state, side + "_basis", q.flip(1))  # largest eigenvalue first
        shape = as_matrix(p).shape if p.ndim >= 2 else p.shape
        self._save(state, "exp_avg", torch.zeros_like(p, dtype=torch.float32))
        self._save(state, "exp_avg_sq", torch.zeros(shape, dtype=torch.float32, device=p.device))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self._start(p, group)
                    continue
                state = self.state[p]
                state["step"] += 1
                t = state["step"]
                G = as_matrix(p.grad).float() if p.ndim >= 2 else p.grad.float()
                m, v, bases = self._load(state, "exp_avg"), self._load(state,
                                                                       "exp_avg_sq"), self._bases(state)
                m.lerp_(p.grad.float(), 1 - beta1)
                v.lerp_(self._rotate(bases, G).square_(), 1 - beta2)
                M = as_matrix(m) if p.ndim >= 2 else m
                U = self._rotate(bases, self._rotate(bases, M) / (v.sqrt() + eps), back=True)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(U.view_as(p).to(p.dtype), alpha=-lr * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t))
                if p.ndim >= 2:
                    self._update_factors(state, G, group)
                    if t % group["precondition_frequency"] == 0:
                        v = self._refresh_bases(state, v)
                self._save(state, "exp_avg", m)
                self._save(state, "exp_avg_sq", v)
        return loss

    def _update_factors(self, state, G, group) -> None:
        beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
        if "left" in state:
            state["left"].lerp_(G @ G.T, 1 - beta)  # (m, m)
        if "right" in state:
            state["right"].lerp_(G.T @ G, 1 - beta)  # (n, n)

    def _refresh_bases(self, state, v: torch.Tensor) -> torch.Tensor:
        """One power-iteration step and QR per side; returns ``v`` permuted to the new order."""
        for dim, side in enumerate(SIDES):
            if side not in state:
                continue
            q = self._load(state, side + "_basis")
            lq = state[side] @ q  # one step of power iteration
            order = torch.argsort((q * lq).sum(0), descending=True)  # estimated eigenvalues, largest first
            v = v.index_select(dim, order)
            self._save(state, side + "_basis", torch.linalg.qr(lq[:, order]).Q)
        return v
