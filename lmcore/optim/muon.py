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
matrices of one shape, or of its transpose, are stacked and iterated together (one batched product
instead of many), in the orientation most of them have, so that most are read and written without
a transposition. There each step is three batched products, the sums folded into them
(``baddbmm``: ``beta * input + alpha * (batch1 @ batch2)``); a wide stack (rows <= columns) takes
the Gram matrix of its rows, a tall one of its columns, the smaller one either way::

    wide:  A = X X^T;   B = b A + c A A;   X <- a X + B X
    tall:  A = X^T X;   B = b A + c A A;   X <- a X + X B        (the same iteration on X^T)

The step for a matrix parameter ``W`` (m x n) with gradient ``G``::

    B <- mu B + (1 - mu) G;     N = G + mu (B - G)   (Nesterov: lerp(G, B, mu))
    W <- W (1 - lr wd) - lr * scale(m, n) * NS5(N)

``scale="spectral"`` is ``sqrt(max(1, m / n))`` (Jordan's, with lr about 0.02); ``"rms"`` is
``0.2 sqrt(max(m, n))`` (Liu et al., 2025), which gives the update the root-mean-square of a typical
AdamW step, so Muon can share AdamW's learning rate and schedule. Embeddings, the output head and
1-D parameters are not hidden matrices: they take AdamW steps (learning rate ``lr * adam_lr_ratio``)
inside the same optimizer, on CUDA in one launch of AdamW's multi-tensor kernel per group
(:mod:`lmcore.train.optim`); a group says which with ``use_muon``.
"""

from __future__ import annotations

import math

import torch

from lmcore.optim.base import KeepsStateDtypes, adamw_, as_matrix, check_range, check_betas
from lmcore.utils import closure_loss

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SCALES = ("rms", "spectral")


def newton_schulz(B: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None,
                  fold: bool | None = None) -> torch.Tensor:
    """The approximately orthogonal factor of each matrix in ``B`` (..., m, n), computed in ``dtype``
    (``fold``: see :func:`orthogonalize_`)."""
    X = B.to(dtype or B.dtype)
    return orthogonalize_(X.reshape(-1, *X.shape[-2:]).clone(), steps, fold).view(X.shape)


def orthogonalize_(X: torch.Tensor, steps: int, fold: bool | None = None) -> torch.Tensor:
    """Newton-Schulz in place on a stack ``X`` (k, m, n); returns the result. A wide stack (m <= n)
    iterates with the (m, m) Gram matrix of its rows, a tall one with the (n, n) one of its columns.

    ``fold`` (default: on CUDA) folds the sums into the products (``baddbmm``): three kernels per step
    and one rounding of each sum instead of one per term. Unfolded, each term is rounded on its own,
    as the reference implementation does (in bfloat16 the two differ by its rounding)."""
    a, b, c = NS_COEFFICIENTS
    fold = X.is_cuda if fold is None else fold
    tall = X.shape[-2] > X.shape[-1]
    X.div_(X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values <= 1
    for _ in range(steps):
        A = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)  # the smaller Gram matrix
        if fold:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A
            X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)  # a X + X B | B X
        else:  # a tall stack multiplies as its transpose would, like the reference, one rounding per term
            B = b * A + c * A @ A
            X = a * X + ((B @ X.mT).mT if tall else B @ X)
    return X


def update_scale(m: int, n: int, scale: str) -> float:
    return max(1.0, m / n) ** 0.5 if scale == "spectral" else 0.2 * max(m, n) ** 0.5


class Muon(KeepsStateDtypes, torch.optim.Optimizer):
    """``Muon(params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0, scale="rms",
    adam_lr_ratio=1.0, adam_betas=(0.9, 0.95), adam_eps=1e-8, ns_dtype=None)``.

    A group with ``use_muon=False`` is stepped by AdamW; without the key, a group's matrices use
    Muon and its other parameters AdamW. ``ns_dtype=None`` is bfloat16 on CUDA, float32 elsewhere.
    ``fused=None`` steps the AdamW parameters with the multi-tensor Triton kernel when they are on
    CUDA; ``True`` also on CPU under ``TRITON_INTERPRET=1`` (tests); ``False`` never.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, scale: str = "rms", adam_lr_ratio: float = 1.0,
                 adam_betas=(0.9, 0.95), adam_eps: float = 1e-8, ns_dtype: torch.dtype | None = None,
                 fused: bool | None = None):
        check_range("Muon", "lr", lr, 0.0)
        check_range("Muon", "momentum", momentum, 0.0, 1.0, high_open=True)
        check_range("Muon", "ns_steps", ns_steps, 1, 100, integer=True)
        check_range("Muon", "weight_decay", weight_decay, 0.0)
        check_range("Muon", "adam_lr_ratio", adam_lr_ratio, 0.0)
        check_range("Muon", "adam_eps", adam_eps, 0.0, low_open=True)
        if scale not in SCALES:
            raise ValueError(f"Muon: scale={scale!r} is out of range; expected one of {SCALES}")
        if fused not in (None, True, False):
            raise ValueError(f"Muon: fused={fused!r}; expected True, False or None (automatic)")
        defaults = dict(lr=lr, momentum=momentum, nesterov=bool(nesterov), ns_steps=int(ns_steps),
                        weight_decay=weight_decay, scale=scale, adam_lr_ratio=adam_lr_ratio,
                        adam_betas=check_betas("Muon", adam_betas, "adam_betas"), adam_eps=adam_eps)
        super().__init__(params, defaults)
        self.ns_dtype, self.fused = ns_dtype, fused
        self._tables: dict = {}  # per list of fused AdamW parameters: its address table

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            flag = group.get("use_muon")
            muon = [p for p in params if (flag if flag is not None else p.ndim >= 2)]
            self._adam(group, [p for p in params if not (flag if flag is not None else p.ndim >= 2)])
            if muon:
                self._muon(group, muon)
        return loss

    def _muon(self, group, params: list) -> None:
        """One Muon step of a group's matrices: those of one shape or its transpose iterate as one batch,
        in the orientation most of them have (the others are transposed into it and back)."""
        mu = group["momentum"]
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(bufs, [p.grad for p in params], 1 - mu)
        by_shape: dict[tuple, list] = {}
        for p, buf in zip(params, bufs):
            m, n = as_matrix(p).shape
            by_shape.setdefault((min(m, n), max(m, n), p.device, p.dtype), []).append((p, buf))
        if group["weight_decay"]:  # (multiplying by 1 changes nothing: skipped)
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        for (m, n, device, _), same in by_shape.items():
            dtype = self.ns_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
            tall = 2 * sum(as_matrix(p).shape[0] > m for p, _ in same) > len(same)
            shape = (n, m) if tall else (m, n)
            X = torch.empty((len(same), *shape), dtype=dtype, device=device)  # (k, *shape)
            for x, (p, buf) in zip(X, same):  # the Nesterov momentum (or the momentum), cast and stacked
                x = x.mT if as_matrix(p).shape != shape else x
                if group["nesterov"]:
                    torch.lerp(as_matrix(p.grad), as_matrix(buf), mu, out=x.view_as(as_matrix(p)))
                else:
                    x.view_as(as_matrix(p)).copy_(as_matrix(buf))
            X = orthogonalize_(X, group["ns_steps"])
            for flip in (False, True):  # those in the stack's orientation, then the transposed ones
                ps = [(p, x) for (p, _), x in zip(same, X) if (as_matrix(p).shape != shape) == flip]
                if ps:
                    step = group["lr"] * update_scale(*as_matrix(ps[0][0]).shape, group["scale"])
                    torch._foreach_add_([p for p, _ in ps], [(x.mT if flip else x).view_as(p) for p, x in ps],
                                        alpha=-step)

    def _adam(self, group, params: list) -> None:
        beta1, beta2 = group["adam_betas"]
        lr, eps, wd = group["lr"] * group["adam_lr_ratio"], group["adam_eps"], group["weight_decay"]
        by_step: dict[int, list] = {}
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if self._fuse(p, state):
                by_step.setdefault((state["step"], p.dtype, p.device), []).append([p, p.grad, m, v])
            else:
                adamw_(p, p.grad, m, v, step=state["step"], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=wd)
        for (t, _, _), operands in by_step.items():  # one launch of AdamW's multi-tensor kernel each
            from lmcore.train.multi_tensor import cached_table  # here: lmcore.train imports lmcore.optim
            from lmcore.train.optim import BLOCK, _adamw_multi_tensor_

            table = cached_table(self._tables, tuple(id(ops[0]) for ops in operands), BLOCK)
            _adamw_multi_tensor_(table, operands, 1 - lr * wd, 1 - beta1, beta2, 1 - beta2,
                                 -lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t), eps)

    def _fuse(self, p, state) -> bool:
        """Whether ``p``'s AdamW step runs in the multi-tensor kernel (one dtype, contiguous, dense)."""
        if self.fused is False or p.grad.is_sparse:
            return False
        if not all(x.dtype == p.dtype and x.is_contiguous() for x in (p, p.grad, state["exp_avg"],
                                                                       state["exp_avg_sq"])):
            return False
        from lmcore.optim.adamw8bit import _interpreting, _triton_available

        return p.is_cuda and _triton_available() if self.fused is None else p.is_cuda or _interpreting()
