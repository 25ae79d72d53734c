"""Bytes of optimizer state: by formula from the parameter shapes, and measured from a state dict.

Per parameter tensor of ``n`` values (a matrix ``a x b`` when it has two or more dimensions)::

    adamw        8 n                                    (m and v in float32)
    adamw8bit    2 n + 8 n / 256                        (8-bit codes + one float32 scale per block;
                 8 n below min_8bit_size or for 1-D)
    shampoo      8 n + 8 (a^2 + b^2)                    (Adam's m, v for grafting; factor + root per side)
    soap         8 n + 8 (a^2 + b^2)                    (m, v; factor + eigenbasis per side)
    soap-lowbit  2 (bits/8 n + 4 n / block) + 8 (a^2 + b^2)   (bases in 8 bits with quantize_bases)
    muon         4 n for hidden matrices (momentum), 8 n for the rest (AdamW)

A side longer than ``max_precond_dim`` has no factor. Blocks are counted whole (the last one padded).
"""

from __future__ import annotations

import math

import torch

DEFAULTS = {"min_8bit_size": 4096, "block": None, "bits": 4, "max_precond_dim": 4096, "quantize_bases": False}


def _quantized(n: int, bits: int, block: int) -> int:
    blocks = math.ceil(n / block)
    return blocks * block * bits // 8 + 4 * blocks


def tensor_state_bytes(name: str, shape: tuple, role: str = "hidden", **hp) -> int:
    """Bytes of state ``name`` keeps for one parameter of ``shape`` (``role`` as in ``param_roles``)."""
    o = {**DEFAULTS, **hp}
    n = math.prod(shape)
    sides = [shape[0], n // shape[0]] if len(shape) >= 2 else []
    factored = sum(8 * d * d for d in sides if d <= o["max_precond_dim"])  # two d x d float32 per side
    if name == "adamw":
        return 8 * n
    if name == "adamw8bit":
        if len(shape) < 2 or n < o["min_8bit_size"]:
            return 8 * n
        return 2 * _quantized(n, 8, o["block"] or 256)
    if name == "shampoo":
        return 8 * n + factored
    if name == "soap":
        return 8 * n + factored
    if name == "soap-lowbit":
        bits = o["bits"]
        block = o["block"] or (256 if bits == 8 else 128)
        moments = 2 * _quantized(n, bits, block) if len(shape) >= 2 else _quantized(n, bits, block) + \
            _quantized(n, bits, block)
        bases = sum((_quantized(d * d, 8, o["block"] or 256)
                     if o["quantize_bases"] else 4 * d * d) + 4 * d * d
                    for d in sides if d <= o["max_precond_dim"])
        return moments + bases
    if name == "muon":
        return 4 * n if role == "hidden" else 8 * n
    raise ValueError(f"optimizer name={name!r} has no memory formula; expected one of "
                     "adamw, adamw8bit, shampoo, soap, soap-lowbit, muon")


def state_bytes_formula(name: str, model_or_shapes, **hp) -> int:
    """Bytes of state for a model (or a list of ``(shape, role)``) by the formulas above."""
    if isinstance(model_or_shapes, torch.nn.Module):
        from lmcore.optim.factory import param_roles

        model_or_shapes = [(tuple(p.shape), role) for _, p, role in param_roles(model_or_shapes)]
    return sum(tensor_state_bytes(name, tuple(shape), role, **hp) for shape, role in model_or_shapes)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state_dict()`` (a sharded optimizer: this rank's)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state_dict()["state"].values()
               for v in s.values() if torch.is_tensor(v))
