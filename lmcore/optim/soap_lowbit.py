"""SOAP with its moments (and optionally its bases) stored block-quantized in 8 or 4 bits.

The update is SOAP's (:mod:`lmcore.optim.soap`), computed in float32; only the storage between
steps changes, through the quantizer of AdamW8bit (:mod:`lmcore.optim.quantize`)::

    first moment m        signed dynamic code
    second moment v       unsigned dynamic code at 8 bits, linear code without zero at 4 bits
    bases Q_L, Q_R        (``quantize_bases=True``) signed dynamic code at 8 bits, then one
                          orthogonalization step  Q <- Q (3 I - Q^T Q) / 2  after dequantizing

At 4 bits a moment costs an eighth of its float32 size: 0.5 byte per value, plus the block
scales. The factors ``L`` and ``R`` stay float32: their small eigenvalues matter, and they
are what the bases are recomputed from.
"""

from __future__ import annotations

import torch

from lmcore.optim.quantize import QuantizedState
from lmcore.optim.soap import SOAP

QUANTIZED = ("exp_avg", "exp_avg_sq", "left_basis", "right_basis")


class SOAPLowBit(SOAP):
    """``SOAPLowBit(params, ..., bits=4, quantize_bases=False, block=None)`` (SOAP's other arguments)."""

    name = "SOAPLowBit"

    def __init__(self, params, *args, bits: int = 4, quantize_bases: bool = False, block: int | None = None,
                 **kwargs):
        if bits not in (4, 8):
            raise ValueError(f"SOAPLowBit: bits={bits!r} is out of range; expected 4 or 8")
        if block is not None and (not isinstance(block, int) or block < 2 or block % 2):
            raise ValueError(f"SOAPLowBit: block={block!r} is out of range; expected an even integer >= 2")
        super().__init__(params, *args, **kwargs)
        self.bits, self.quantize_bases = bits, bool(quantize_bases)
        self.formats = {
            "exp_avg": QuantizedState(bits, signed=True, kind="dynamic", block=block),
            "exp_avg_sq": QuantizedState(bits, signed=False, kind="dynamic" if bits == 8 else "linear",
                                         block=block),
        }
        if self.quantize_bases:
            self.formats["left_basis"] = self.formats["right_basis"] = QuantizedState(8, signed=True,
                                                                                      block=block)

    def _load(self, state: dict, key: str) -> torch.Tensor:
        if key not in self.formats:
            return state[key]
        value = self.formats[key].dequantize(state[key + "_q"], state[key + "_scale"], state[key + "_shape"])
        if key.endswith("_basis"):  # rounding broke orthogonality a little: one Newton-Schulz step back
            value = value @ (1.5 * torch.eye(value.shape[1], device=value.device) - 0.5 * value.T @ value)
        return value

    def _save(self, state: dict, key: str, value: torch.Tensor) -> None:
        if key not in self.formats:
            state[key] = value
            return
        state[key + "_q"], state[key + "_scale"] = self.formats[key].quantize(value)
        state[key + "_shape"] = tuple(value.shape)
