"""FlashAttention-2 (Triton and tiled PyTorch) against the written-out attention.

On CPU the Triton kernels run through the interpreter at tiny sizes (a single small tile
configuration, so the tails, the diagonal tiles and the skipped tiles are all exercised); the
``gpu`` tests repeat the checks at real sizes on CUDA.
"""

import math

import pytest
import torch

from lmcore.accounting import attention_flops
from lmcore.kernels import (FlashAttentionTriton, attention_reference,
                            flash_attention, flash_attention_torch)
from lmcore.nn.registry import get_attention_backend

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check(fn, b, h, t_q, t_k, d, causal, dtype, device, tol, scale=None, layout="bhtd"):
    """Compare out, L, dq, dk, dv of ``fn`` with the float64 reference; fresh random inputs."""
    gen = torch.Generator().manual_seed(1000 * t_q + 10 * d + causal)

    def make(t):
        if layout == "bthd":  # (B, T, H, D) memory viewed as (B, H, T, D): non-contiguous
            return torch.randn(b, t, h, d, generator=gen, dtype=torch.float64).transpose(1, 2)
        return torch.randn(b, h, t, d, generator=gen, dtype=torch.float64)

    q, k, v, do = make(t_q), make(t_k), make(t_k), make(t_q)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    out_r, lse_r = attention_reference(qr, kr, vr, causal, scale, return_lse=True)
    out_r.backward(do)
    qx, kx, vx = (x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v))
    if layout == "bthd":
        assert not qx.is_contiguous()
    out, lse = fn(qx, kx, vx, causal=causal, scale=scale, return_lse=True)
    out.backward(do.to(device=device, dtype=dtype))
    assert out.shape == (b, h, t_q, d) and out.dtype == dtype
    assert lse.shape == (b, h, t_q) and lse.dtype == torch.float32
    for name, got, want in (("out", out, out_r), ("L", lse, lse_r), ("dq", qx.grad, qr.grad),
                            ("dk", kx.grad, kr.grad), ("dv", vx.grad, vr.grad)):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        err = _rel(got.cpu(), want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


IMPLS = {"triton": flash_attention, "torch": lambda *a, **kw: flash_attention_torch(*a, block_m=32, block_n=16, **kw)}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("t", [48, 80])
def test_matches_reference_cpu_sizes(impl, t, d, causal):
    device = "cuda" if CUDA else "cpu"
    _check(IMPLS[impl], 2, 2, t, t, d, causal, torch.float32, device, tol=1e-4)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("t_q,t_k,causal", [(48, 80, False), (80, 48, False), (48, 80, True), (1, 80, True)])
def test_separate_query_and_key_lengths(impl, t_q, t_k, causal):
    """Causal with more keys than queries: the queries are the last positions (a KV cache)."""
    device = "cuda" if CUDA else "cpu"
    _check(IMPLS[impl], 2, 2, t_q, t_k, 32, causal, torch.float32, device, tol=1e-4)


def test_causal_convention_matches_lmcore_nn():
    """The kernels' causal convention is lmcore.nn's: queries are the last positions."""
    from lmcore.nn.attention import vectorized_attention

    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    torch.testing.assert_close(attention_reference(q, k, v, causal=True), vectorized_attention(q, k, v))
    with pytest.raises(ValueError, match="at least as many keys"):
        flash_attention(*(torch.randn(1, 1, n, 16) for n in (8, 4, 4)), causal=True)


def test_odd_head_dim_custom_scale_and_noncontiguous_inputs():
    device = "cuda" if CUDA else "cpu"
    _check(flash_attention, 2, 2, 37, 53, 24, True, torch.float32, device, tol=1e-4, scale=0.3,
           layout="bthd")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    device = "cuda" if CUDA else "cpu"
    _check(flash_attention, 2, 2, 48, 48, 16, True, dtype, device, tol=3e-2)


def test_registered_backends_agree():
    device = "cuda" if CUDA else "cpu"
    q, k, v = (torch.randn(2, 2, 48, 16, device=device) for _ in range(3))
    want = attention_reference(q, k, v, causal=True)
    for name in ("flash_triton", "flash_torch"):
        got = get_attention_backend(name)(q, k, v, causal=True)
        assert _rel(got.cpu(), want.cpu()) < 1e-4, name


def test_forward_without_grad_writes_every_element():
    device = "cuda" if CUDA else "cpu"
    q, k, v = (torch.randn(1, 3, 80, 32, device=device) for _ in range(3))
    with torch.no_grad():
        out, lse = FlashAttentionTriton.apply(q, k, v, False, None)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _rel(out.cpu(), attention_reference(q, k, v).cpu()) < 1e-4


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0, 0], k, v), "expected \\(batch, heads, seq, head_dim\\)"),
    (lambda q, k, v: (q, k.double(), v), "share one dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "supported dtypes"),
    (lambda q, k, v: (q, k[:, :1], v), "batch and heads"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "same sequence length"),
    (lambda q, k, v: (q, k[..., :8], v), "head_dim"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), "head_dim=8 is not supported"),
    (lambda q, k, v: (q.repeat(1, 1, 1, 9), k.repeat(1, 1, 1, 9), v.repeat(1, 1, 1, 9)),
     "head_dim=144 is not supported"),
])
def test_bad_input_raises_clear_error(bad, match):
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attention(*bad(q, k, v))


def test_flop_count():
    assert attention_flops(1, 1, 4, 4, 8, causal=False) == 4 * 16 * 8
    assert attention_flops(1, 1, 4, 4, 8, causal=True) == 4 * 10 * 8
    assert attention_flops(1, 1, 2, 4, 8, causal=True) == 4 * (3 + 4) * 8
    assert attention_flops(1, 1, 4, 4, 8, causal=False, backward=True) == 3.5 * 4 * 16 * 8


# ----------------------------------------------------------------------------- real sizes, GPU
GPU_CASES = ([(t, d, c, torch.bfloat16) for t in (1024, 1000) for d in (64, 128) for c in (False, True)]
             + [(1000, d, True, dt) for d in (64, 128) for dt in (torch.float16, torch.float32)])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("t,d,causal,dtype", GPU_CASES)
def test_matches_reference_gpu_sizes(t, d, causal, dtype):
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    _check(flash_attention, 2, 4, t, t, d, causal, dtype, "cuda", tol=tol)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_separate_lengths_odd_head_dim_noncontiguous(causal):
    _check(flash_attention, 2, 3, 700, 1300, 80, causal, torch.bfloat16, "cuda", tol=2e-2,
           layout="bthd")
    _check(flash_attention, 2, 3, 1300, 700, 16, False, torch.bfloat16, "cuda", tol=2e-2)
    _check(flash_attention, 2, 3, 300, 1300, 64, causal, torch.bfloat16, "cuda", tol=2e-2)


@pytest.mark.skipif(CUDA, reason="the CPU branch of the benchmark (correctness only)")
def test_bench_quick_on_cpu_checks_correctness_only(tmp_path):
    from lmcore.bench import gpu_slug
    from lmcore.bench.attention import main

    result = main(["--quick", "--out-dir", str(tmp_path)])
    assert result["metrics"]["passed"] and result["metrics"]["max_rel_err"] < 1e-4
    assert not list(tmp_path.iterdir())  # nothing timed, nothing written
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100" and gpu_slug("NVIDIA H200") == "h200"
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["--out-dir", str(tmp_path)])


def test_transformer_with_flash_backends_matches_sdpa_including_kv_cache():
    """The model gives the same logits with either flash backend, also when decoding from a cache."""
    from lmcore.nn import KVCache, ModelConfig, TransformerLM

    device = "cuda" if CUDA else "cpu"
    tokens = torch.randint(0, 64, (2, 24), device=device)
    logits = {}
    for backend in ("sdpa", "flash_triton", "flash_torch"):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, context_length=32, d_model=64, n_layers=2, n_heads=2, d_ff=96,
                          attention_backend=backend)
        model = TransformerLM(cfg).to(device)
        with torch.no_grad():
            full = model(tokens)  # (B, T, vocab)
            cache = KVCache(cfg, batch_size=2, device=device)
            prefix = model(tokens[:, :20], cache=cache)
            steps = [model(tokens[:, t:t + 1], cache=cache) for t in range(20, 24)]  # one query, many keys
        logits[backend] = (full, torch.cat([prefix, *steps], dim=1))
    want = logits["sdpa"][0]
    for backend, (full, cached) in logits.items():
        assert _rel(full.cpu(), want.cpu()) < 1e-4, backend
        assert _rel(cached.cpu(), want.cpu()) < 1e-4, f"{backend} with a KV cache"


@pytest.mark.parametrize("entries", [dict(fwd=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1)),
                                     dict(fwd=(32, 32, 4, 1), dkdv=(16, 64, 4, 1), dq=(64, 16, 4, 1))])
def test_forced_tile_sizes_are_exact(entries):
    """Every kernel is exact at other tile sizes too (tails, diagonal and skipped tiles move)."""
    from lmcore.kernels.flash_triton import flash_tuning

    device = "cuda" if CUDA else "cpu"
    with flash_tuning(**entries):
        for t_q, t_k, causal in ((80, 80, True), (37, 53, True), (37, 53, False)):
            _check(flash_attention, 2, 2, t_q, t_k, 32, causal, torch.float32, device, tol=1e-4)


@pytest.mark.parametrize("t_q,t_k,causal", [(80, 80, True), (80, 80, False), (48, 80, True), (37, 53, True),
                                             (37, 53, False)])
def test_hopper_warp_specialized_forward_is_exact(t_q, t_k, causal):
    """The single-loop forward of flash_hopper (every tile masked, tails read as zeros through
    tensor descriptors) computes the same out and L as the reference."""
    from lmcore.kernels import flash_hopper

    if CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("warp specialization needs a Hopper or newer GPU")
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float16)
    gen = torch.Generator().manual_seed(t_q + t_k)
    q = torch.randn(2, 2, t_q, 32, generator=gen).to(device, dtype)
    k, v = (torch.randn(2, 2, t_k, 32, generator=gen).to(device, dtype) for _ in range(2))
    assert flash_hopper.usable(q, k, v)
    out, lse = flash_hopper.forward(q, k, v, causal, 32 ** -0.5)
    want, want_lse = attention_reference(q.double(), k.double(), v.double(), causal, return_lse=True)
    assert _rel(out.cpu(), want.cpu()) < 2e-2
    assert _rel(lse.cpu(), want_lse.cpu()) < 1e-3


def test_hopper_forward_refuses_what_it_cannot_read():
    from lmcore.kernels import flash_hopper

    q = torch.randn(1, 2, 16, 32).transpose(1, 2)  # heads interleaved: rows of a head not contiguous
    assert not flash_hopper.usable(q, q, q)
    with pytest.raises(ValueError, match="warp-specialized forward needs"):
        flash_hopper.forward(q, q, q, True, 1.0)


def test_flash_tuning_validates_and_restores():
    from lmcore.kernels.flash_triton import _TUNING, flash_tuning

    with pytest.raises(ValueError, match="unknown kernels"):
        flash_tuning(attention=(64, 64, 4, 3))
    with pytest.raises(ValueError, match="candidates='fast'"):
        flash_tuning(candidates="fast")
    with pytest.raises(ValueError, match="expected \\(BLOCK_M, BLOCK_N, num_warps, num_stages\\)"):
        flash_tuning(fwd=(64, 64, 4))
    with flash_tuning(candidates="first", dq=(64, 64, 4, 2)):
        assert _TUNING == {"candidates": "first", "forced": {"dq": (64, 64, 4, 2)}}
    assert _TUNING == {"candidates": "default", "forced": {}}


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_three_dimensional_inputs_and_lse_contract(impl):
    """Both implementations take (batch, seq, head_dim) as well as (batch, heads, seq, head_dim), and
    return (and use) the natural-log L of shape q.shape[:-1]."""
    device = "cuda" if CUDA else "cpu"
    fn = IMPLS[impl]
    q, k, v = (torch.randn(2, 40, 32, device=device, requires_grad=True) for _ in range(3))
    out, lse = fn(q, k, v, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    want, want_lse = attention_reference(q.detach(), k.detach(), v.detach(), True, return_lse=True)
    assert _rel(out.detach().cpu(), want.cpu()) < 1e-4 and _rel(lse.cpu(), want_lse.cpu()) < 1e-5
    out.sum().backward()
    four = [x.detach().unsqueeze(1).requires_grad_() for x in (q, k, v)]
    fn(*four, causal=True).sum().backward()
    for x, y in zip((q, k, v), four):
        torch.testing.assert_close(x.grad, y.grad.squeeze(1))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q, k, v[:, :, :7]), "same sequence length"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), "dtype"),
    (lambda q, k, v: (q, k[..., :8], v), "head_dim"),
])
def test_both_implementations_refuse_what_they_cannot_compute(impl, bad, match):
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    with pytest.raises((ValueError, TypeError), match=match):
        IMPLS[impl](*bad(q, k, v))


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_heads_read_in_place(impl, group, causal):
    """K and V with fewer heads than Q (each serving `group` query heads) give what the reference
    gives with K and V repeated; their gradients are the sums over each group."""
    device = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(group + 10 * causal)
    q, do = (torch.randn(2, 8, 37, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 8 // group, 53, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    want = attention_reference(ref[0], *(x.repeat_interleave(group, dim=1) for x in ref[1:]), causal)
    want.backward(do)
    xs = [x.to(device, torch.float32).requires_grad_() for x in (q, k, v)]
    out = IMPLS[impl](*xs, causal=causal)
    out.backward(do.to(device, torch.float32))
    for got, exp in zip([out, *(x.grad for x in xs)], [want, *(x.grad for x in ref)]):
        assert got.shape == exp.shape and _rel(got.cpu(), exp) < 1e-4


def test_grouped_heads_must_divide():
    q, k = torch.randn(1, 6, 8, 16), torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="multiple of k's"):
        flash_attention(q, k, k)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d,causal,t", [(64, True, 2048), (128, True, 8192), (128, False, 4096)])
def test_grouped_query_heads_gpu_sizes(d, causal, t):
    """Grouped heads at real sizes, where the Hopper forward may be picked for the shape class."""
    gen = torch.Generator(device="cuda").manual_seed(d + t)
    q, do = (torch.randn(1, 16, t, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, 4, t, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flash_attention(*xs, causal=causal)
    out.backward(do)
    ref = [x.float().requires_grad_() for x in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(
        ref[0], *(x.repeat_interleave(4, dim=1) for x in ref[1:]), is_causal=causal)
    want.backward(do.float())
    for got, exp in zip([out, *(x.grad for x in xs)], [want, *(x.grad for x in ref)]):
        assert _rel(got.float(), exp) < 2e-2
