"""What every Triton kernel of lmcore shares: the interpreter rule, constants, tuning helpers, and
the ``delta = rowsum(dO * O)`` kernel of every attention backward.

The dense FlashAttention kernels (``lmcore.kernels``), the block-sparse kernels
(``lmcore.sparse``) and the fused AdamW (``lmcore.train``) import these, so each rule is written
once.
"""

from __future__ import annotations

import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

#: log2(e) and ln(2): the kernels compute softmax in base 2 (``exp2(x * LOG2E) = exp(x)``).
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET`` set, not 0).

    Triton reads the variable when a kernel is first defined or launched, so set it before
    importing the modules that define kernels.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def seq_bucket(n: int) -> int:
    """Autotuning key for a sequence length: the next power of two (nearby lengths share a tuning)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: exact ``ieee`` for float32 inputs, tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_class(head_dim: int) -> str:
    """Which list of tuned tile candidates a head dimension uses."""
    return "small" if head_dim <= 64 else "large"


def autotune_bench(kernel_call, quantiles):
    """Time one candidate configuration while autotuning (shorter than Triton's default).

    A candidate that fails to compile for this GPU or Triton version (too many resources, an
    unsupported lowering) is reported and timed as infinitely slow instead of stopping the call.
    """
    try:
        return triton.testing.do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)
    except (torch.cuda.OutOfMemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - compile errors come as several exception types
        if "CUDA error" in str(err):  # the context is broken: nothing else can be trusted
            raise
        first = str(err).splitlines()[0][:200] if str(err) else ""
        warnings.warn(f"a tuning candidate failed ({type(err).__name__}: {first}); skipped")
        return [float("inf")] * len(quantiles) if quantiles else float("inf")


if triton is not None:

    @triton.jit
    def _delta_kernel(O, DO, Delta, sob, soh, sot, sdb, sdh, sdt, n_heads, t, head_dim,
                      HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """D_i = rowsum(dO_i * O_i) in float32, one (BLOCK, HEAD_DIM) tile of rows per program."""
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // n_heads, bh % n_heads
        offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BM,)
        offs_d = tl.arange(0, HEAD_DIM)  # (D,)
        mask = (offs_m[:, None] < t) & (offs_d[None, :] < head_dim)
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=mask, other=0.0)
        tl.store(Delta + bh * t + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < t)


def rowsum_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """``D = rowsum(dO * O)`` of ``(B, H, T, D)`` tensors (last dimension contiguous), float32 ``(B, H, T)``.

    The term every attention backward subtracts inside ``dS = P * (dP - D)``; one pass over both
    tensors, no float32 copies of them.
    """
    bsz, heads, t, d = out.shape
    delta = torch.empty((bsz, heads, t), device=out.device, dtype=torch.float32)  # (B, H, T)
    _delta_kernel[(triton.cdiv(t, 64), bsz * heads)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], heads, t, d,
        HEAD_DIM=max(16, triton.next_power_of_2(d)), BLOCK=64)
    return delta
