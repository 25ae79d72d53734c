"""AdamW with 8-bit block-quantized moments (Dettmers et al., 2022, "8-bit Optimizers via Block-wise
Quantization").

Each step, for a parameter ``p`` whose moments are stored as codes ``q_m, q_v`` and block scales
``s_m, s_v`` (:mod:`lmcore.optim.quantize`)::

    m, v  <- dequantize(q_m, s_m), dequantize(q_v, s_v)
    (the AdamW update of lmcore.optim.base, in float32)
    q_m, s_m <- quantize(m)        signed dynamic code, 256 values per block
    q_v, s_v <- quantize(v)        unsigned dynamic code (v >= 0: every code on the positive side)

Two bytes per parameter instead of eight, plus 4 bytes of scale per 256 values: about 0.25x the
state of AdamW. Parameters with fewer than ``min_8bit_size`` values or fewer than two dimensions
(norm gains, biases) keep float32 moments: they are a sliver of the memory, and quantizing a
handful of values gains nothing. Only the storage is quantized; the arithmetic is float32.

On CUDA one Triton kernel does all of it per block (dequantize, update, find the block's new
scale, quantize by the code book's closed form: :mod:`lmcore.optim.adamw8bit_kernel`), for all
8-bit parameters of a group in one launch, and AdamW's kernel takes the float32-moment ones in one
more; elsewhere the same steps run as torch ops.
"""

from __future__ import annotations

import functools
import math

import torch

from lmcore.optim.base import KeepsStateDtypes, adam_group_defaults, adamw_, check_range
from lmcore.optim.quantize import QuantizedState
from lmcore.utils import closure_loss


class AdamW8bit(KeepsStateDtypes, torch.optim.Optimizer):
    """``AdamW8bit(params, lr, betas, eps, weight_decay, min_8bit_size=4096, block=256, fused=None)``.

    ``fused=None`` runs the Triton kernel when the parameter is on CUDA; ``True`` also on CPU
    under ``TRITON_INTERPRET=1`` (tests); ``False`` never.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, min_8bit_size: int = 4096, block: int = 256,
                 fused: bool | None = None):
        defaults = adam_group_defaults("AdamW8bit", lr, betas, eps, weight_decay)
        check_range("AdamW8bit", "min_8bit_size", min_8bit_size, 0, integer=True)
        check_range("AdamW8bit", "block", block, 2, 65536, integer=True)
        if block & (block - 1):
            raise ValueError(f"AdamW8bit: block={block} is out of range; "
                             "expected a power of two in [2, 65536]")
        if fused not in (None, True, False):
            raise ValueError(f"AdamW8bit: fused={fused!r}; expected True, False or None (automatic)")
        super().__init__(params, dict(defaults, min_8bit_size=int(min_8bit_size)))
        self.block, self.fused = int(block), fused
        self._codes: dict = {}  # device -> the code books and their midpoints there
        self._tables: dict = {}  # per list of fused parameters: its address table (lmcore.train.multi_tensor)
        self.m_format = QuantizedState(8, signed=True, kind="dynamic", block=self.block)
        self.v_format = QuantizedState(8, signed=False, kind="dynamic", block=self.block)

    def quantized(self, p: torch.Tensor, group: dict) -> bool:
        """Whether ``p``'s moments are stored in 8 bits."""
        return p.ndim >= 2 and p.numel() >= group["min_8bit_size"]

    def _init_state(self, p, group) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            if self.quantized(p, group):
                zeros = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_q"], state["exp_avg_scale"] = self.m_format.quantize(zeros)
                state["exp_avg_sq_q"], state["exp_avg_sq_scale"] = self.v_format.quantize(zeros)
            else:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            (beta1, beta2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            fused: dict[tuple, list] = {}  # (step, 8-bit or not, dtypes) -> parameters for one launch
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p, group)
                state["step"] += 1
                t = state["step"]
                if self._fuse(p):
                    fused.setdefault((t, "exp_avg" not in state, p.dtype, p.grad.dtype), []).append(p)
                elif "exp_avg" in state:
                    adamw_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=t, lr=lr, beta1=beta1,
                           beta2=beta2, eps=eps, weight_decay=wd)
                else:
                    self._step_torch(p, state, t, lr, beta1, beta2, eps, wd)
            for (t, quantized, _, _), ps in fused.items():
                scalars = (1 - lr * wd, 1 - beta1, beta2, 1 - beta2, -lr / (1 - beta1 ** t),
                           math.sqrt(1 - beta2 ** t), eps)
                self._step_fused(ps, scalars, quantized)
        return loss

    def _fuse(self, p) -> bool:
        state = self.state[p]
        if self.fused is False or not (p.is_contiguous() and p.grad.is_contiguous()) or p.grad.is_sparse:
            return False
        if "exp_avg" in state and not all(x.dtype == p.dtype and x.is_contiguous()
                                          for x in (p.grad, state["exp_avg"], state["exp_avg_sq"])):
            return False  # float32 moments go through AdamW's kernel, which needs one dtype
        return p.is_cuda and _triton_available() if self.fused is None else p.is_cuda or _interpreting()

    def _step_torch(self, p, state, t, lr, beta1, beta2, eps, wd) -> None:
        m = self.m_format.dequantize(state["exp_avg_q"], state["exp_avg_scale"], p.shape)
        v = self.v_format.dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_scale"], p.shape)
        p32 = p.float()
        adamw_(p32, p.grad.float(), m, v, step=t, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd)
        p.copy_(p32)
        state["exp_avg_q"], state["exp_avg_scale"] = self.m_format.quantize(m)
        state["exp_avg_sq_q"], state["exp_avg_sq_scale"] = self.v_format.quantize(v)

    def _step_fused(self, params: list, scalars: tuple, quantized: bool) -> None:
        """Every parameter of ``params`` (one step count, dtype and device) in one kernel launch: the 8-bit
        kernel for quantized moments, AdamW's for float32 ones (small and 1-D parameters)."""
        from lmcore.train.multi_tensor import cached_table  # imported here: lmcore.train imports lmcore.optim
        from lmcore.train.optim import BLOCK, _adamw_multi_tensor_

        keys = ("exp_avg_q", "exp_avg_scale", "exp_avg_sq_q", "exp_avg_sq_scale") if quantized else \
            ("exp_avg", "exp_avg_sq")
        operands = [[p, p.grad, *(self.state[p][k] for k in keys)] for p in params]
        rows = max(1, ROWS_OF_BLOCKS // self.block)  # quantization blocks per program
        chunk = rows * self.block if quantized else BLOCK
        cache = cached_table(self._tables, (quantized, *map(id, params)), chunk)
        if not quantized:
            _adamw_multi_tensor_(cache, operands, *scalars)
            return
        table, chunks, n, aligned = cache.get(operands)
        if chunks.numel() == 0:
            return
        p, g, mq, ms = operands[0][:4]
        if p.device not in self._codes:  # copied to the device once, not each step
            self._codes[p.device] = (*_search_table(self.m_format.code, p.device),
                                     *_search_table(self.v_format.code, p.device))
        m_code, m_ext, v_code, v_ext = self._codes[p.device]
        _kernel()[(chunks.numel(),)](
            table, chunks, n, p, g, mq, ms, m_code, m_ext, v_code, v_ext, *map(float, scalars),
            BLOCK=self.block, ROWS=rows, ALIGNED=aligned, num_warps=max(1, min(8, chunk // 256)))


#: Values per program of the fused kernel (whole quantization blocks; one block if larger), run by
#: one warp per 256 values. Small programs of one warp won over larger ones of several warps on an
#: H200: a block's largest magnitude is then found inside one warp, with no barrier between warps,
#: and many small programs hide the latency of the code-book lookups (``python -m lmcore.bench
#: optim`` times the step).
ROWS_OF_BLOCKS = 256


def _search_table(code: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The code book, and its midpoints with -inf before them and +inf after (257 entries): entries
    ``c`` and ``c + 1`` are then the midpoints on either side of code ``c``, for every code."""
    mids = (code[1:] + code[:-1]) / 2
    ext = torch.cat([mids.new_full((1,), -math.inf), mids, mids.new_full((256 - mids.numel(),), math.inf)])
    return code.to(device), ext.to(device)


@functools.cache
def _triton_available() -> bool:
    from lmcore.train.optim import triton_available  # imported here: lmcore.train imports lmcore.optim

    return triton_available()


def _interpreting() -> bool:
    from lmcore.kernels.common import interpreting  # imported here: it defines Triton kernels

    return interpreting()


@functools.cache
def _kernel():
    """The fused kernel, imported on first use so ``TRITON_INTERPRET`` is read then, not at import."""
    from lmcore.optim.adamw8bit_kernel import adamw8bit_kernel

    return adamw8bit_kernel
