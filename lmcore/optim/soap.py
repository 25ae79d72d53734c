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

On a GPU the work is in matrix products, so parameters of one shape are stacked and rotated
together (``torch.bmm``), and the QR of a refresh is a Cholesky QR of the whole stack
(:func:`lmcore.optim.base.orthonormal_columns`, ``qr="cholesky"``; ``qr="householder"`` is
``torch.linalg.qr`` matrix by matrix). The update does not depend on the sign of a basis column.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lmcore.optim.base import (SIDES, KeepsStateDtypes, adam_group_defaults, as_matrix, check_range,
                               orthonormal_columns, stacks, symmetric_eigh)
from lmcore.utils import closure_loss

QR_METHODS = ("cholesky", "householder")


class SOAP(KeepsStateDtypes, torch.optim.Optimizer):
    """``SOAP(params, lr, betas, eps, weight_decay, precondition_frequency=10, max_precond_dim=4096,
    shampoo_beta=None, qr="cholesky")``; ``shampoo_beta`` decays the factors (default: ``betas[1]``)."""

    name = "SOAP"

    def __init__(self, params, lr: float = 3e-3, betas=(0.95, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, precondition_frequency: int = 10, max_precond_dim: int = 4096,
                 shampoo_beta: float | None = None, qr: str = "cholesky"):
        defaults = adam_group_defaults(self.name, lr, betas, eps, weight_decay)
        check_range(self.name, "precondition_frequency", precondition_frequency, 1, integer=True)
        check_range(self.name, "max_precond_dim", max_precond_dim, 0, integer=True)
        if shampoo_beta is not None:
            check_range(self.name, "shampoo_beta", shampoo_beta, 0.0, 1.0, high_open=True)
        if qr not in QR_METHODS:
            raise ValueError(f"{self.name}: qr={qr!r} is not one of {QR_METHODS}")
        defaults.update(precondition_frequency=int(precondition_frequency),
                        max_precond_dim=int(max_precond_dim),
                        shampoo_beta=shampoo_beta, qr=qr)
        super().__init__(params, defaults)

    # -- where the moments and bases live (the low-bit variant stores them quantized) --------------

    def _load(self, state: dict, key: str) -> torch.Tensor:
        return state[key]

    def _save(self, state: dict, key: str, value: torch.Tensor) -> None:
        if key in state and state[key].shape == value.shape:
            state[key].copy_(value)  # in place: a slice of a stack must not become the state
        else:
            state[key] = value.clone()

    def _load_stack(self, states: list, key: str, shape) -> torch.Tensor:
        return torch.stack([self._load(s, key).view(shape) for s in states])

    def _save_stack(self, states: list, key: str, values: torch.Tensor) -> None:
        for s, value in zip(states, values):
            self._save(s, key, value)

    # -- the rotation -------------------------------------------------------------------------------

    @staticmethod
    def _rotate(bases, x: torch.Tensor, back: bool = False) -> torch.Tensor:
        """``Q_L^T x Q_R`` (or ``Q_L x Q_R^T`` with ``back``) of a matrix or a stack of them
        (``(k, m, n)`` with bases ``(k, m, m)``, ``(k, n, n)``); missing sides are identity."""
        left, right = bases
        if left is not None:
            x = (left if back else left.mT) @ x
        if right is not None:
            x = x @ (right.mT if back else right)
        return x

    @staticmethod
    def _beta(group) -> float:
        return group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]

    def _start(self, ps: list, group) -> None:
        """First step: the factors from this gradient and their eigenvectors as the bases (one
        batched ``eigh`` per size)."""
        todo = defaultdict(list)  # dim -> [(state, side)]
        for p in ps:
            state = self.state[p]
            state["step"] = 0
            G = as_matrix(p.grad).float() if p.ndim >= 2 else None
            for side in SIDES if G is not None else ():
                dim = G.shape[0] if side == "left" else G.shape[1]
                if dim <= group["max_precond_dim"]:
                    state[side] = (G @ G.T if side == "left" else G.T @ G).mul_(1 - self._beta(group))
                    todo[dim].append((state, side))
            shape = as_matrix(p).shape if p.ndim >= 2 else p.shape
            self._save(state, "exp_avg", torch.zeros_like(p, dtype=torch.float32))
            self._save(state, "exp_avg_sq", torch.zeros(shape, dtype=torch.float32, device=p.device))
        for dim, entries in todo.items():
            eye = torch.eye(dim, dtype=torch.float32, device=entries[0][0][entries[0][1]].device)
            _, q = symmetric_eigh(torch.stack([s[side] for s, side in entries]) + 1e-30 * eye)
            for (s, side), basis in zip(entries, q.flip(-1)):  # largest eigenvalue first
                self._save(s, side + "_basis", basis)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            fresh = [p for p in ps if not self.state[p]]
            self._start(fresh, group)
            fresh = {id(p) for p in fresh}
            buckets = defaultdict(list)  # same shape, sides and step: one stack
            for p in ps:
                if id(p) in fresh:
                    continue
                state = self.state[p]
                state["step"] += 1
                key = (tuple(as_matrix(p).shape) if p.ndim >= 2 else None,) + tuple(s in state for s in SIDES)
                buckets[key + (state["step"],)].append(p)
            budget = max((p.numel() for p in ps), default=0)
            for bucket in buckets.values():
                if bucket[0].ndim >= 2:
                    for stack in stacks(bucket, self.state, budget):
                        self._step_matrices(stack, group)
                else:
                    for p in bucket:
                        self._step_vector(p, group)
        return loss

    def _scale(self, group, t: int) -> tuple[float, float]:
        """(decay factor, step size) of step ``t``."""
        (beta1, beta2), lr = group["betas"], group["lr"]
        return 1 - lr * group["weight_decay"], -lr * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)

    def _step_vector(self, p, group) -> None:
        state, (beta1, beta2) = self.state[p], group["betas"]
        m, v = self._load(state, "exp_avg"), self._load(state, "exp_avg_sq")
        g = p.grad.float()
        m.lerp_(g, 1 - beta1)
        v.lerp_(g.square(), 1 - beta2)
        decay, size = self._scale(group, state["step"])
        p.mul_(decay)
        p.add_((m / (v.sqrt() + group["eps"])).to(p.dtype), alpha=size)
        self._save(state, "exp_avg", m)
        self._save(state, "exp_avg_sq", v)

    def _step_matrices(self, ps: list, group) -> None:
        """One step of ``k`` same-shaped matrices (with the same sides factored), stacked."""
        (beta1, beta2), eps = group["betas"], group["eps"]
        states = [self.state[p] for p in ps]
        t, shape = states[0]["step"], as_matrix(ps[0]).shape
        G = torch.stack([as_matrix(p.grad).float() for p in ps])  # (k, m, n)
        M, V = self._load_stack(states, "exp_avg", shape), self._load_stack(states, "exp_avg_sq", shape)
        bases = tuple(self._load_stack(states, side + "_basis", states[0][side].shape)
                      if side in states[0] else None for side in SIDES)
        M.lerp_(G, 1 - beta1)
        V.lerp_(self._rotate(bases, G).square_(), 1 - beta2)
        U = self._rotate(bases, self._rotate(bases, M).div_(V.sqrt().add_(eps)), back=True)
        decay, size = self._scale(group, t)
        torch._foreach_mul_(ps, decay)
        torch._foreach_add_(ps, [u.view_as(p).to(p.dtype) for u, p in zip(U, ps)], alpha=size)
        beta = self._beta(group)
        for state, g in zip(states, G):
            if "left" in state:
                state["left"].addmm_(g, g.T, beta=beta, alpha=1 - beta)  # (m, m)
            if "right" in state:
                state["right"].addmm_(g.T, g, beta=beta, alpha=1 - beta)  # (n, n)
        if t % group["precondition_frequency"] == 0:
            V = self._refresh_bases(states, bases, V, group["qr"])
        self._save_stack(states, "exp_avg", M.view(len(ps), *ps[0].shape))
        self._save_stack(states, "exp_avg_sq", V)

    def _refresh_bases(self, states: list, bases, V: torch.Tensor, method: str) -> torch.Tensor:
        """One power-iteration step and QR per side, for the whole stack; returns ``V`` permuted to
        the new order of the basis columns."""
        k, m, n = V.shape
        for dim, (side, q) in enumerate(zip(SIDES, bases), start=1):
            if q is None:
                continue
            lq = torch.stack([s[side] for s in states]) @ q  # (k, d, d): one step of power iteration
            order = torch.argsort((q * lq).sum(-2), dim=-1, descending=True)  # eigenvalue estimates
            index = order[:, :, None].expand(k, m, n) if dim == 1 else order[:, None, :].expand(k, m, n)
            V = V.gather(dim, index)
            lq = lq.gather(2, order[:, None, :].expand_as(lq))
            self._save_stack(states, side + "_basis", orthonormal_columns(lq, method))
        return V
