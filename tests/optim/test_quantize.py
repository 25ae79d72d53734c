"""Block-wise quantization: code books, error bounds, 4-bit packing."""

from __future__ import annotations

import pytest
import torch

from lmcore.optim import QuantizedState, code_book


@pytest.mark.parametrize("bits,signed,kind", [(8, True, "dynamic"), (8, False, "dynamic"), (4, True,
                                                                                            "dynamic"),
                                              (4, False, "dynamic"), (4, False, "linear"), (8, False,
                                                                                            "linear")])
def test_code_books_are_sorted_and_fit_the_bits(bits, signed, kind):
    code = code_book(bits, signed, kind)
    assert torch.all(code[1:] > code[:-1])
    assert code.numel() <= 2 ** bits and code.max() == 1.0
    assert code.min() == (-1.0 if signed else code.min()) and (signed or code.min() >= 0)
    if kind == "linear":
        assert code.min() > 0  # no zero: a second moment is never rounded to nothing


@pytest.mark.parametrize("bits,signed,kind", [(8, True, "dynamic"), (8, False, "dynamic"), (4, True,
                                                                                            "dynamic"),
                                              (4, False, "linear")])
@pytest.mark.parametrize("shape", [(37,), (300, 7), (128, 64)])
def test_error_is_bounded_by_half_a_gap_times_the_block_scale(bits, signed, kind, shape):
    torch.manual_seed(0)
    fmt = QuantizedState(bits, signed, kind, block=64)
    x = torch.randn(shape) * torch.logspace(-4, 1, shape[-1])  # values over five orders of magnitude
    x = x if signed else x.square()
    q, scale = fmt.quantize(x)
    assert q.dtype == torch.uint8 and q.numel() == scale.numel() * 64 * bits // 8
    y = fmt.dequantize(q, scale, x.shape)
    assert y.shape == x.shape
    code = fmt.code
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    if kind == "linear":  # values below the smallest code round up to it
        half_gap = max(half_gap, code[0].item())
    flat = torch.cat([x.reshape(-1), x.new_zeros(-x.numel() % 64)]).view(-1, 64)
    bound = (scale * half_gap * (1 + 1e-6))[:, None].expand(-1, 64).reshape(-1)[: x.numel()]
    err = (y - x).abs().reshape(-1)
    assert torch.all(err <= bound), (err - bound).max()
    assert torch.allclose(scale, flat.abs().amax(1))


def test_dynamic_code_keeps_small_values_a_linear_code_would_zero():
    fmt = QuantizedState(8, signed=False, kind="dynamic", block=256)
    x = torch.tensor([1.0, 1e-3, 1e-5] + [0.0] * 253)
    y = fmt.dequantize(*fmt.quantize(x), x.shape)
    assert y[1] == pytest.approx(1e-3, rel=0.1) and y[2] == pytest.approx(1e-5, rel=0.1)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="bits=3"):
        code_book(3)
    with pytest.raises(ValueError, match="block=5"):
        QuantizedState(8, block=5)
