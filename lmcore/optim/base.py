"""What every optimizer of :mod:`lmcore.optim` shares: hyperparameter checks and the Adam update.

Adam with decoupled weight decay, the update the others build on (AdamW, Loshchilov and Hutter)::

    p <- p (1 - lr wd)
    m <- beta1 m + (1 - beta1) g
    v <- beta2 v + (1 - beta2) g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

written in the order of ``lmcore.train.optim.AdamW`` (and ``torch.optim.AdamW``), so that an
optimizer falling back to Adam for some parameter steps exactly as AdamW would.
"""

from __future__ import annotations

import math

import torch


def check_range(owner: str, name: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
          high_open: bool = False, integer: bool = False) -> None:
    """Refuse a hyperparameter outside its range, in one line naming it and the allowed range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        kind = "an integer" if integer else "a number"
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{owner}: {name}={value!r} is out of range; expected {kind} in {lo}, {hi}")


def check_betas(owner: str, betas, name: str = "betas") -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{owner}: {name}={betas!r}; expected two numbers (beta1, beta2), each in [0, 1)")
    for b in betas:
        check_range(owner, name, b, 0.0, 1.0, high_open=True)
    return float(betas[0]), float(betas[1])


def adam_direction(m: torch.Tensor, v: torch.Tensor, step: int, beta1: float, beta2: float,
                   eps: float) -> torch.Tensor:
    """``m_hat / (sqrt(v_hat) + eps)``: the bias-corrected Adam direction (a new tensor)."""
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    return (m / (1 - beta1 ** step)).div_(denom)


def adamw_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, step: int, lr: float,
           beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update of ``p`` (and its moments ``m``, ``v``) in place."""
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))


def adam_group_defaults(owner: str, lr: float, betas, eps: float, weight_decay: float) -> dict:
    """The checked hyperparameters every optimizer here takes."""
    check_range(owner, "lr", lr, 0.0)
    beta1, beta2 = check_betas(owner, betas)
    check_range(owner, "eps", eps, 0.0, low_open=True)
    check_range(owner, "weight_decay", weight_decay, 0.0)
    return dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)


def symmetric_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric float32 matrix; when the float32 solver
    does not converge (it can on a badly conditioned factor), solved again in float64."""
    try:
        return torch.linalg.eigh(a)
    except RuntimeError:  # torch.linalg.LinAlgError
        lam, q = torch.linalg.eigh(a.double())
        return lam.to(a.dtype), q.to(a.dtype)


def orthonormal_columns(a: torch.Tensor, method: str = "cholesky") -> torch.Tensor:
    """``Q`` of the QR decomposition of each matrix of ``a`` ``(..., m, n)``, ``m >= n``, as float32.

    ``method="householder"`` is ``torch.linalg.qr`` (the definition). ``method="cholesky"`` reaches
    the same ``Q`` (up to the sign of each column) with matrix products, batched: Cholesky QR run
    twice, in float64::

        A <- A D^-1           (unit columns: the same Q, a better conditioned Gram matrix)
        R = chol(A^T A),  Q = A R^-1,  then once more on Q

    Every step keeps ``Q = A T`` with ``T`` upper triangular, which is what makes it QR's ``Q``;
    the second pass repairs the orthogonality the first loses to rounding. A matrix it cannot make
    orthogonal (numerically rank-deficient) is solved again by ``torch.linalg.qr``.
    """
    if method == "householder":
        return torch.linalg.qr(a.float()).Q
    if method != "cholesky":
        raise ValueError(f"orthonormal_columns: method={method!r}; expected 'cholesky' or 'householder'")
    x = a.double()
    x = x / x.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    ok = torch.ones(a.shape[:-2], dtype=torch.bool, device=a.device)
    eye = torch.eye(a.shape[-1], dtype=x.dtype, device=a.device)
    for first in (True, False):
        gram = x.mT @ x  # (..., n, n)
        if not first:  # already nearly orthogonal: the Cholesky factor is close to I
            ok &= (gram - eye).abs().amax((-2, -1)) < 0.5
        low, info = _cholesky(gram)  # gram = low low^T: R = low^T, a view
        ok &= info == 0
        x = torch.linalg.solve_triangular(low.mT, x, upper=True, left=False)
    q = x.float()
    if not bool(ok.all()):
        bad = ~ok
        q[bad] = torch.linalg.qr(a[bad].float()).Q
    return q


#: Gram matrices at least this wide are factored one at a time (see :func:`_cholesky`).
CHOLESKY_ONE_AT_A_TIME = 4096


def _cholesky(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower Cholesky factor of each matrix of ``gram`` and its ``info``. Asking for the lower
    factor spares the batched solver a transposition of the whole stack each way; and the widest
    matrices are factored one at a time, where the unbatched solver's blocked algorithm was faster
    on an H200 than the batched one (``CHOLESKY_ONE_AT_A_TIME``)."""
    if gram.shape[-1] < CHOLESKY_ONE_AT_A_TIME or gram.dim() == 2:
        return torch.linalg.cholesky_ex(gram)
    flat = gram.reshape(-1, *gram.shape[-2:])
    parts = [torch.linalg.cholesky_ex(g) for g in flat]
    return (torch.stack([low for low, _ in parts]).view_as(gram),
            torch.stack([info for _, info in parts]).view(gram.shape[:-2]))


#: The sides of a matrix parameter that can carry a Kronecker factor (Shampoo, SOAP).
SIDES = ("left", "right")


def stacks(ps: list, state: dict, budget: int) -> list[list]:
    """Same-shaped matrix parameters ``ps`` (with the same sides factored) cut into stacks stepped
    together: each parameter counts its own size or its factors', whichever is larger, and a stack
    holds at most ``budget`` of them (see :func:`chunks`)."""
    first = state[ps[0]]
    size = max(ps[0].numel(), sum(first[s].numel() for s in SIDES if s in first))
    return chunks(ps, [size] * len(ps), budget)


def chunks(items: list, sizes: list[int], budget: int) -> list[list]:
    """``items`` cut into consecutive runs whose ``sizes`` add up to at most ``budget`` (at least one
    item a run): stacks no larger than the largest parameter keep a step's temporaries as they were."""
    out, total = [], budget + 1
    for item, size in zip(items, sizes):
        if total + size > budget:
            out.append([])
            total = 0
        out[-1].append(item)
        total += size
    return out


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """A parameter seen as a matrix: (first dimension, everything else)."""
    return x.reshape(x.shape[0], -1)


class KeepsStateDtypes:
    """``load_state_dict`` that keeps each state tensor's saved dtype.

    ``torch.optim.Optimizer.load_state_dict`` casts every state tensor of a floating-point
    parameter to the parameter's dtype, which would turn 8-bit codes into floats (and float32
    factors of a bfloat16 weight into bfloat16): a resumed run would no longer be the same run.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, entries in saved.items():
            state = self.state.get(params[index])
            for key, value in entries.items():
                if state is not None and torch.is_tensor(value) and state[key].dtype != value.dtype:
                    state[key] = state[key].to(value.dtype)
