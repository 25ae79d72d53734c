"""Block-wise quantization of optimizer states to 8 or 4 bits (Dettmers et al., 2022; Li et al., 2023).

A tensor is cut into blocks of ``block`` consecutive values. Each block keeps one float32 scale,
its largest magnitude ``s = max |x|``, and each value becomes the index of the nearest entry of a
fixed code book ``C`` (sorted values in [-1, 1])::

    q_i = argmin_k |x_i / s - C[k]|        (an 8-bit or 4-bit integer)
    x_i ~ s * C[q_i]                       (dequantized)

so the error of a value is at most ``s`` times half the widest gap between neighbouring codes.
Blocks keep an outlier from ruining the resolution of the whole tensor: it only sets the scale of
its own block.

Code books (``code_book``):

- ``dynamic`` (signed or unsigned): codes spread over several powers of ten, with linear steps
  inside each power. Adam's moments span orders of magnitude inside a block (the second moment is a
  square), and a linear code would round every small value to zero; the dynamic code keeps relative
  precision down to ``10**-(bits-2)`` of the block maximum for signed codes (``10**-(bits-1)``
  unsigned). This is the code of the first moment, and of the second at 8 bits.
- ``linear``: ``(k + 1) / 2**bits`` for k = 0 .. 2**bits - 1, unsigned and without zero. At 4 bits
  a dynamic code has too few codes to reach small values, and rounding a second moment to zero
  turns ``m / sqrt(v)`` into ``m / eps``, a huge step; a code without zero cannot do that.

4-bit codes are packed two to a byte, so the states cost ``bits / 8`` bytes per value plus
``4 / block`` bytes of scales.
"""

from __future__ import annotations

import functools

import torch

CODE_BOOKS = ("dynamic", "linear")


@functools.cache
def _code_cpu(bits: int, signed: bool, kind: str) -> torch.Tensor:
    if kind == "linear":
        if signed:
            raise ValueError("the linear code book is unsigned (for second moments)")
        return (torch.arange(2 ** bits, dtype=torch.float64) + 1).div(2 ** bits).float()
    mag_bits = bits - 1 if signed else bits
    mags = [0.0]
    for e in range(mag_bits):  # e = how many powers of ten below the block maximum
        n = 2 ** (mag_bits - 1 - e)  # fewer codes for smaller values
        fractions = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)[1:]  # n values in (0.1, 1]
        mags += (fractions * 10.0 ** -e).tolist()
    mags = torch.tensor(sorted(mags), dtype=torch.float64)  # (2**mag_bits,)
    code = torch.cat([-mags.flip(0)[:-1], mags]) if signed else mags  # signed: 2**bits - 1 values
    return code.float()


def code_book(bits: int = 8, signed: bool = True, kind: str = "dynamic", device=None) -> torch.Tensor:
    """The sorted code values (float32): ``2**bits`` of them, or ``2**bits - 1`` when signed dynamic."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}: expected 4 or 8")
    if kind not in CODE_BOOKS:
        raise ValueError(f"code_book={kind!r}: expected one of {CODE_BOOKS}")
    return _code_cpu(bits, signed, kind).to(device)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` flattened and zero-padded to whole blocks: (n_blocks, block)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def quantize(x: torch.Tensor, code: torch.Tensor, block: int, bits: int = 8):
    """``(codes, scales)``: uint8 codes (two per byte at 4 bits) and one float32 scale per block."""
    xb = _blocks(x.float(), block)  # (n_blocks, block)
    scale = xb.abs().amax(dim=1)  # (n_blocks,)
    normed = xb / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    mids = (code[1:] + code[:-1]) / 2  # a value goes to the code whose interval holds it
    q = torch.searchsorted(mids, normed.reshape(-1).contiguous()).to(torch.uint8)  # (n_blocks * block,)
    if bits == 4:
        q = q[0::2] | (q[1::2] << 4)  # two codes per byte, the first in the low half
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, code: torch.Tensor, block: int, shape,
               bits: int = 8) -> torch.Tensor:
    """The float32 tensor of ``shape`` the codes stand for."""
    if bits == 4:
        q = torch.stack([q & 0xF, q >> 4], dim=1).reshape(-1)  # unpack: low half first
    values = code[q.long()].view(-1, block) * scale[:, None]  # (n_blocks, block)
    n = 1
    for s in shape:
        n *= s
    return values.reshape(-1)[:n].view(shape)


class QuantizedState:
    """How one kind of state is stored: bits, code book and block size, with (de)quantize methods."""

    def __init__(self, bits: int = 8, signed: bool = True, kind: str = "dynamic", block: int | None = None):
        self.bits, self.signed, self.kind = bits, signed, kind
        self.block = block or (256 if bits == 8 else 128)
        if self.block < 2 or self.block % 2:
            raise ValueError(f"block={self.block!r}: expected an even number of values >= 2")
        self.code = code_book(bits, signed, kind)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize(x, self.code.to(x.device), self.block, self.bits)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
        return dequantize(q, scale, self.code.to(q.device), self.block, shape, self.bits)

    def bytes_per_value(self) -> float:
        return self.bits / 8 + 4 / self.block
