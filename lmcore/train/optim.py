"""AdamW (Loshchilov and Hutter, 2019), written from its update rule, with a fused Triton path."""

from __future__ import annotations

import functools
import math

import torch

from lmcore.train.multi_tensor import AddressTable, cached_table
from lmcore.utils import closure_loss


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay. For each parameter ``p`` with gradient ``g`` at step ``t``::

        p  <- p - lr * weight_decay * p          (decay, independent of the gradient)
        m  <- beta1 m + (1 - beta1) g            (first moment)
        v  <- beta2 v + (1 - beta2) g^2          (second moment)
        p  <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

    The arithmetic follows the order of ``torch.optim.AdamW`` so the two agree step for step.
    Three ways to apply it:

    - ``fused``: one Triton kernel launch per parameter group applies all four lines to every
      parameter of the group in a single pass, reading ``p``, ``g``, ``m``, ``v`` once and writing
      ``p``, ``m``, ``v`` once, in float32 (the fastest on a GPU: the update is bound by memory
      traffic, and one launch instead of one per tensor saves the launch costs).
    - ``foreach`` (when not fused): each line applied to all parameters at once with
      ``torch._foreach_*`` ops (few kernel launches, but each line is a full pass over memory).
    - neither: a plain loop over parameters.

    ``fused=None`` (default) fuses when every parameter is on CUDA and Triton is importable, and
    uses ``foreach`` otherwise. ``fused=True`` on CPU tensors needs ``TRITON_INTERPRET=1``
    (Triton's interpreter, for tests). The state dict is the same whichever path runs.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, foreach: bool = True,
                 fused: bool | None = None):
        if lr < 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas={betas} must each lie in [0, 1)")
        if eps <= 0 or weight_decay < 0:
            raise ValueError(f"eps={eps} must be > 0 and weight_decay={weight_decay} >= 0")
        if fused not in (None, True, False):
            raise ValueError(f"fused={fused!r} must be True, False or None (automatic)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.foreach = foreach
        self.fused = fused
        self._tables: dict[tuple, AddressTable] = {}  # per list of fused parameters: its address table
        if fused:
            for group in self.param_groups:
                _check_fusable(group["params"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            by_step: dict[int, list] = {}  # parameters added later may be at an earlier step
            for p in params:
                by_step.setdefault(self.state[p]["step"], []).append(p)
            for t, ps in by_step.items():
                if self._fuse(ps):
                    self._update_fused(ps, t, group)
                else:
                    self._update(ps, t, group, foreach=self.foreach and all(p.device == ps[0].device for p in ps))
        return loss

    def _fuse(self, params: list) -> bool:
        """Whether this step's update of ``params`` runs in the Triton kernel."""
        if self.fused is False:
            return False
        if self.fused is None:
            return all(p.is_cuda for p in params) and triton_available()
        _check_fusable(params)  # fused=True: parameters moved to CPU since construction are refused
        return True

    def _update_fused(self, params, t: int, group: dict) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        scalars = (1 - lr * wd, 1 - beta1, beta2, 1 - beta2, -lr / (1 - beta1 ** t),
                   math.sqrt(1 - beta2 ** t), eps)
        by_dtype: dict[torch.dtype, list] = {}
        rest = []
        for p in params:
            m, v, g = self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"], p.grad
            if g.is_sparse or not all(x.is_contiguous() and x.dtype == p.dtype for x in (p, g, m, v)):
                rest.append(p)  # the kernel walks flat memory of one dtype; anything else takes the torch path
            else:
                by_dtype.setdefault(p.dtype, []).append([p, g, m, v])
        for operands in by_dtype.values():
            table = cached_table(self._tables, tuple(id(ops[0]) for ops in operands), BLOCK)
            _adamw_multi_tensor_(table, operands, *scalars)
        if rest:
            self._update(rest, t, group, foreach=False)

    def _update(self, params, t: int, group: dict, foreach: bool) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        g = [p.grad for p in params]
        if foreach:  # the same arithmetic on all tensors at once (a few kernel launches per step)
            torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(m, g, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, g, g, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(bias2))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr / bias1)
            return
        for p, m_, v_, g_ in zip(params, m, v, g):
            p.mul_(1 - lr * wd)
            m_.lerp_(g_, 1 - beta1)
            v_.mul_(beta2).addcmul_(g_, g_, value=1 - beta2)
            denom = (v_.sqrt() / math.sqrt(bias2)).add_(eps)
            p.addcdiv_(m_, denom, value=-lr / bias1)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_fusable(params) -> None:
    """Refuse ``fused=True`` where the kernel cannot run, naming the reason."""
    if not triton_available():
        raise RuntimeError("AdamW(fused=True) needs triton, which is not importable; use fused=None or False")
    from lmcore.kernels.common import interpreting  # imported here: it defines Triton kernels
    for p in params:
        if not p.is_cuda and not interpreting():
            raise ValueError(f"AdamW(fused=True) got a parameter on {p.device} (shape {tuple(p.shape)}): the fused "
                             "kernel needs CUDA tensors, or TRITON_INTERPRET=1 to run Triton's interpreter on CPU")
        if not p.is_floating_point():
            raise ValueError(f"AdamW(fused=True) got a parameter of dtype {p.dtype}: expected a floating-point dtype")


BLOCK = 2048  # elements per program; the update is memory-bound, so a large block with a few warps is enough


@functools.cache
def _kernel():
    """The Triton kernel, imported on first use so ``TRITON_INTERPRET`` is read then, not at import."""
    from lmcore.train.adamw_kernel import adamw_kernel

    return adamw_kernel


def _adamw_multi_tensor_(cache: AddressTable, operands: list, decay, w1, beta2, w2, neg_step, bias2_sqrt,
                         eps) -> None:
    """One AdamW update, in place, of every ``[p, g, m, v]`` in ``operands`` (contiguous, one dtype and
    device) in a single kernel launch. The step-dependent scalars are runtime arguments, so the kernel
    compiles once, not per step, and nothing waits for the device."""
    table, chunks, n, aligned = cache.get(operands)
    if chunks.numel() == 0:
        return
    _kernel()[(chunks.numel(),)](table, chunks, n, operands[0][0], float(decay), float(w1), float(beta2),
                                 float(w2), float(neg_step), float(bias2_sqrt), float(eps),
                                 BLOCK=BLOCK, ALIGNED=aligned, num_warps=8)
