"""The fused AdamW8bit kernel's pieces: its closed-form code search against torch.searchsorted, and
whole steps over chunks of several blocks (full and cut short) against the torch path."""

from __future__ import annotations

import pytest
import torch

from lmcore.kernels.common import interpreting
from lmcore.optim import AdamW8bit
from lmcore.optim.adamw8bit import _search_table
from lmcore.optim.quantize import code_book

needs_triton = pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 or CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


triton = pytest.importorskip("triton")
tl = triton.language
from lmcore.optim.adamw8bit_kernel import code_index  # noqa: E402  (after TRITON_INTERPRET is set)


@triton.jit
def index_kernel(x_ptr, out_ptr, ext_ptr, MAG_BITS: tl.constexpr, SIGNED: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, code_index(tl.load(x_ptr + offs), ext_ptr, MAG_BITS, SIGNED))


def hard_values(code: torch.Tensor) -> torch.Tensor:
    """Every code, every midpoint and their float32 neighbours, zero, both ends and random values."""
    mids = (code[1:] + code[:-1]) / 2
    points = torch.cat([code, mids, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    near = torch.cat([points, torch.nextafter(points, torch.tensor(2.0)),
                      torch.nextafter(points, torch.tensor(-2.0))])
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(3000, generator=g) * torch.logspace(-9, 0, 3000)
    return torch.cat([near, spread, -spread]).clamp(-1, 1)


@needs_triton
@pytest.mark.parametrize("signed", [True, False])
def test_closed_form_search_equals_searchsorted(signed):
    code = code_book(8, signed, "dynamic")
    x = hard_values(code)
    if not signed:
        x = x.abs()
    n = 1 << (x.numel() - 1).bit_length()
    x = torch.cat([x, x.new_zeros(n - x.numel())]).to(DEVICE)
    code_dev, ext = _search_table(code, DEVICE)
    out = torch.empty(n, dtype=torch.int32, device=DEVICE)
    index_kernel[(1,)](x, out, ext, 7 if signed else 8, signed, n)
    want = torch.searchsorted((code[1:] + code[:-1]) / 2, x.cpu())
    bad = (out.cpu() != want).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), out[i].item(), want[i].item()) for i in bad[:5]]


@needs_triton
@pytest.mark.parametrize("block", [64, 256, 4096])
def test_fused_chunks_of_several_blocks_match_the_torch_path(block):
    """Tensors of whole chunks, a chunk cut inside a block, and one shorter than a block."""
    torch.manual_seed(0)
    shapes = [(32, 256), (7, 3001), (3, 50)]
    a = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=100, block=block)
    fused, plain = AdamW8bit(a, fused=True, **kw), AdamW8bit(b, fused=False, **kw)
    for t in range(3):
        for pa, pb in zip(a, b):
            g = torch.randn_like(pa) * (1 + t)
            pa.grad, pb.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5)
        sa, sb = fused.state[pa], plain.state[pb]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[key + "_scale"], sb[key + "_scale"], rtol=1e-6, atol=0)
            same = (sa[key + "_q"] == sb[key + "_q"]).float().mean().item()
            assert same > 0.99, (key, same)  # a value on a midpoint may round either way
