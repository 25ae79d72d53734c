"""NSA: the kernel path equals the readable path; selection and the module behave."""

import pytest
import torch

from lmcore.nn.registry import get_attention_backend
from lmcore.sparse import NSA, NSAConfig, nsa_attention
from lmcore.sparse.nsa import compress_mean, compressed_branch, select_blocks


def qkv(b=1, h=2, t=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_path_equals_readable_path(causal):
    q, k, v = qkv(t=72)  # ragged last block
    gates = torch.rand(1, 2, 72, 3, generator=torch.Generator().manual_seed(1))
    kw = dict(causal=causal, block_size=16, top_n=2, window=20, gates=gates)
    out = nsa_attention(q, k, v, impl="triton", **kw)
    ref = nsa_attention(q, k, v, impl="reference", **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(nsa_attention(q, k, v, impl="torch", **kw), ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_compression_and_causal_compressed_branch():
    x = torch.arange(8.0).reshape(1, 1, 8, 1).expand(1, 1, 8, 16)
    assert compress_mean(x, 4)[0, 0, :, 0].tolist() == [1.5, 5.5]
    q, k, v = qkv(t=8)
    out, p = compressed_branch(q, compress_mean(k, 4), compress_mean(v, 4), 4, True, 0.25)
    # token 3 is the first to see a complete block; tokens 0-2 see nothing and get 0
    assert p[0, 0, :3].abs().sum().item() == 0.0 and out[0, 0, :3].abs().sum().item() == 0.0
    assert p[0, 0, 3].tolist() == [1.0, 0.0]
    assert torch.allclose(p[0, 0, 7].sum(), torch.tensor(1.0))


def test_selection_keeps_first_own_and_heaviest_blocks():
    p = torch.zeros(1, 1, 64, 4)
    p[..., 2] = 1.0  # block 2 has all the mass; block 1 only fills a row with room left
    sel = select_blocks(p, 64, 16, top_n=3, causal=True)[0, 0]
    assert sel.tolist() == [[True, False, False, False], [True, True, False, False],
                            [True, True, True, False], [True, False, True, True]]
    sel = select_blocks(p, 64, 16, top_n=2, causal=False)[0, 0]
    assert sel.sum(-1).tolist() == [2, 2, 2, 2] and sel[:, 0].all()


def test_module_forward_backward_and_errors():
    torch.manual_seed(0)
    layer = NSA(32, 2, NSAConfig(block_size=16, top_n=2, window=16))
    x = torch.randn(2, 48, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert layer.compress_k.weight.grad.abs().sum() > 0 and layer.gate.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer(x, impl="reference"), y, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="dim=30 must be divisible"):
        NSA(30, 4)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="top_n=0"):
        nsa_attention(q, k, v, top_n=0)
    with pytest.raises(ValueError, match="gates have shape"):
        nsa_attention(q, k, v, gates=torch.ones(1, 2, 64, 2))


@pytest.mark.parametrize("old", ["kernel", "gather", "dense"])
def test_unknown_impl_names_the_valid_ones(old):
    q, k, v = qkv()
    valid = "'auto', 'triton', 'torch', 'reference'"
    with pytest.raises(ValueError, match=f"impl='{old}'; expected one of {valid}"):
        nsa_attention(q, k, v, block_size=16, impl=old)


def test_nsa_backend():
    q, k, v = qkv()
    out = get_attention_backend("nsa")(q, k, v, causal=True, block_size=16, top_n=2, window=16)
    torch.testing.assert_close(out, nsa_attention(q, k, v, True, 16, 2, 16, impl="reference"), atol=2e-5, rtol=1e-4)
