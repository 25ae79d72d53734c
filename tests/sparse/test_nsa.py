"""NSA: the Triton kernels equal the readable PyTorch definition; selection, config, layer, model."""

import pytest
import torch

from lmcore.nn.registry import get_attention_backend
from lmcore.sparse import NSA, NSAConfig, nsa_attention
from lmcore.sparse.nsa import compress_mean, nsa_torch, overlap_weights, select_blocks
from lmcore.sparse.nsa_triton import nsa_triton

TINY = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, top_n=3, window=24, n_local=1)


def qkv(b=1, hq=2, hkv=1, t=64, d=16, tq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq or t, d, generator=g)
    k, v = (torch.randn(b, hkv, t, d, generator=g) for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v)]


def both(q, k, v, cfg=TINY, gates=None, **kw):
    kc, vc = compress_mean(k, cfg.cmp_block, cfg.cmp_stride), compress_mean(v, cfg.cmp_block, cfg.cmp_stride)
    fast = nsa_triton(q, k, v, kc, vc, cfg, 0.25, gates, return_parts=True)
    ref = nsa_torch(q, k, v, kc, vc, cfg, 0.25, gates, return_parts=True)
    return fast, ref


def assert_same(fast, ref, inputs):
    (out, parts), (out_r, parts_r) = fast, ref
    for name in ("o_cmp", "o_sel", "o_win"):
        torch.testing.assert_close(parts[name], parts_r[name], atol=2e-5, rtol=1e-4, msg=name)
    assert torch.equal(parts["idx"].long().sort(-1).values, parts_r["idx"].sort(-1).values)
    torch.testing.assert_close(out, out_r, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
    for a, b, name in zip(grads, torch.autograd.grad(out_r, inputs, g, allow_unused=True), "qkvg"):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2), (4, 1)])  # groups of 1, 2 and 4
def test_kernels_equal_definition_for_every_group_size(hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv, t=77)  # ragged: 77 is no multiple of any block
    gates = torch.rand(1, hq, 77, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
    assert_same(*both(q, k, v, gates=gates), (q, k, v, gates))


def test_decoding_rows_equal_the_last_rows_of_the_full_sequence():
    q, k, v = qkv(hq=4, hkv=2, t=70)
    full, _ = both(q, k, v)
    last = q[:, :, -3:].detach().requires_grad_()
    fast, ref = both(last, k, v)
    assert_same(fast, ref, (last, k, v))
    torch.testing.assert_close(fast[0], full[0][:, :, -3:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_key_splits_equal_one_pass(splits):
    # split-K (decoding): partial softmaxes over slices of the keys, combined, equal one pass
    from lmcore.sparse.nsa_triton import attn_forward, block_scores

    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, top_n=3, window=40, n_local=1)
    q, k, v = (x.detach() for x in qkv(hq=4, hkv=2, t=1100, tq=5))  # 69 blocks: 5 groups of 16
    kc, vc = compress_mean(k, cfg.cmp_block, cfg.cmp_stride), compress_mean(v, cfg.cmp_block, cfg.cmp_stride)
    ranges = {"compressed": (kc, vc, 0, cfg.cmp_stride, cfg.cmp_block - 1),
              "window": (k, v, cfg.window, 1, 0)}
    idx = torch.randint(-1, 60, (2, 5, 9), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    ranges["selected"] = (k, v, 0, 1, 0)
    for name, (kk, vv, window, ks, ko) in ranges.items():
        sel = idx if name == "selected" else None
        one = attn_forward(q, kk, vv, 0.25, 1095, 16, sel, window, ks, ko, splits=1)
        split = attn_forward(q, kk, vv, 0.25, 1095, 16, sel, window, ks, ko, splits=splits)
        for a, b in zip(split, one):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    lse = attn_forward(q, kc, vc, 0.25, 1095, 16, None, 0, cfg.cmp_stride, cfg.cmp_block - 1, splits=1)[1]
    torch.testing.assert_close(block_scores(q, kc, lse, 1100, cfg, 0.25, splits=splits),
                               block_scores(q, kc, lse, 1100, cfg, 0.25, splits=1), atol=1e-6, rtol=1e-5)


def test_first_blocks_of_the_sequence():
    # before a compressed block ends the branch is 0; early tokens select every block they have
    q, k, v = qkv(t=20)
    (out, parts), ref = both(q, k, v)
    assert parts["o_cmp"][0, :, :7].abs().max() == 0  # the first compressed block ends at position 7
    assert parts["idx"][0, 0, 5].tolist() == [0, -1, -1]
    assert_same((out, parts), ref, (q, k, v))


def test_ties_go_to_the_lower_block():
    # equal keys make every compressed score equal: the choice must be the lowest free blocks
    q, _, _ = qkv(t=68)  # 16 compressed tokens: each probability is exactly 1/16
    k = torch.ones(1, 1, 68, 16).requires_grad_()
    v = torch.randn(1, 1, 68, 16).requires_grad_()
    (out, parts), ref = both(q, k, v)
    # where the number of ended compressed blocks is a power of two the probabilities are exact,
    # so the scores tie exactly and both paths must pick the same blocks in the same order
    n_ended = (torch.arange(68) - 7).div(4, rounding_mode="floor") + 1
    exact = (n_ended > 0) & ((n_ended & (n_ended - 1)) == 0)
    assert torch.equal(parts["idx"].long()[0, 0, exact], ref[1]["idx"][0, 0, exact])
    # the last token (block 4): block 0 and its own block forced, then blocks 1-3 tie: 1 wins
    assert parts["idx"][0, 0, -1].tolist() == [0, 4, 1]


def test_overlap_weights_split_straddling_tokens():
    w = overlap_weights(n_cmp=5, n_blocks=2, cfg=NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, top_n=2,
                                                            n_local=1))
    # token 1 spans positions 4..11: half in block 0, half in block 1
    assert w.tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 0.5], [0.0, 0.0]]


def test_selection_shared_by_the_group():
    p = torch.zeros(1, 2, 1, 3)
    p[0, 0, 0, 2] = 1.0  # head 0 likes compressed token 2 (block 1), head 1 nothing
    idx = select_blocks(p, 48, NSAConfig(cmp_block=8, cmp_stride=8, sel_block=16, top_n=2, n_local=0), group=2)
    assert idx.shape == (1, 1, 1, 2) and idx[0, 0, 0].tolist() == [0, 1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(cmp_block=32, cmp_stride=12), "multiple of cmp_stride"),
    (dict(sel_block=40), "sel_block=40 must be a multiple"),
    (dict(cmp_block=128), "at most sel_block"),
    (dict(top_n=2, n_local=2), "top_n=2 must be at least"),
    (dict(window=-1), "window"),
])
def test_impossible_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NSAConfig(**kwargs)


def test_bad_inputs_are_refused():
    q, k, v = qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match="multiple of the 2 KV heads"):
        nsa_attention(q, k, v, TINY, impl="torch")
    q, k, v = qkv(t=64)
    with pytest.raises(ValueError, match="top_n=16 is more than the 1 blocks"):
        nsa_attention(q, k, v, impl="torch")
    with pytest.raises(ValueError, match="unknown NSA option"):
        nsa_attention(q, k, v, block_size=16)
    with pytest.raises(ValueError, match="causal"):
        get_attention_backend("nsa")(q, k, v, causal=False)


def test_module_gqa_forward_backward_and_both_paths():
    torch.manual_seed(0)
    layer = NSA(dim=64, n_heads=4, n_kv_heads=2, config=TINY)
    x = torch.randn(2, 40, 64, requires_grad=True)
    y = layer(x, impl="triton")
    torch.testing.assert_close(y, layer(x, impl="torch"), atol=2e-5, rtol=1e-4)
    y.square().mean().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    assert NSA(dim=64, n_heads=4).config == NSAConfig()  # the paper's sizes by default


def test_backend_decodes_with_grouped_kv_cache():
    q, k, v = qkv(hq=4, hkv=2, t=64)
    fn = get_attention_backend("nsa")
    opts = dict(cmp_block=8, cmp_stride=4, sel_block=16, top_n=2, window=16, n_local=1)
    full = fn(q, k, v, **opts)
    torch.testing.assert_close(fn(q[:, :, -5:], k, v, **opts), full[:, :, -5:], atol=2e-5, rtol=1e-4)


def test_bench_quick_reports_every_target(tmp_path):
    from lmcore.bench import nsa as bench

    result = bench.main(["--quick", "--rounds", "1", "--out-dir", str(tmp_path)])
    assert {r["method"] for r in result["rows"]} == {"nsa", "nsa_cs", "sdpa"}
    assert {r["pass"] for r in result["rows"]} == {"fwd", "fwd+bwd", "decode"}
    assert all(r["ms"] > 0 for r in result["rows"])
    assert set(result["targets"]) == set(bench.TARGETS)
    with pytest.raises(SystemExit, match="unknown \\['c'\\]"):
        bench.main(["--quick", "--settings", "a,c"])


# ---------------------------------------------------------------------------------------------
# On a GPU, at real sizes.

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_inputs(hq, hkv, t, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, hq, t, d, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(1, hkv, t, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hq, hkv, d, dtype", [(16, 1, 64, torch.bfloat16), (8, 2, 128, torch.bfloat16),
                                               (4, 4, 96, torch.float16)])
def test_gpu_paper_sizes_match_the_definition(hq, hkv, d, dtype):
    cfg = NSAConfig()
    q, k, v = gpu_inputs(hq, hkv, 2000, d, dtype)  # ragged, 32 selection blocks
    kc, vc = compress_mean(k, 32, 16), compress_mean(v, 32, 16)
    out, parts = nsa_triton(q, k, v, kc, vc, cfg, d ** -0.5, return_parts=True)
    f = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref, rparts = nsa_torch(*f, compress_mean(f[1], 32, 16), compress_mean(f[2], 32, 16), cfg, d ** -0.5,
                            return_parts=True)
    same = (parts["idx"].long().sort(-1).values == rparts["idx"].sort(-1).values).all(-1)  # (B, Hkv, T)
    assert same.float().mean() > 0.99  # near-ties may fall either way in half precision
    for name in ("o_cmp", "o_win"):
        torch.testing.assert_close(parts[name].float(), rparts[name], atol=2e-2, rtol=2e-2, msg=name)
    rows = same.repeat_interleave(hq // hkv, 1)  # (B, Hq, T)
    torch.testing.assert_close(parts["o_sel"].float()[rows], rparts["o_sel"][rows], atol=2e-2, rtol=2e-2)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    rgrads = torch.autograd.grad(ref, f, g.float())
    if same.all():
        for a, b in zip(grads, rgrads):
            torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2)
    assert all(torch.isfinite(x).all() for x in grads)


@pytest.mark.gpu
@gpu
def test_gpu_forward_backward_captures_in_a_cuda_graph_without_host_syncs():
    q, k, v = gpu_inputs(16, 1, 4096, 64)
    do = torch.randn_like(q)
    gates = torch.rand(1, 16, 4096, 3, device="cuda", dtype=torch.bfloat16)

    def step():
        return torch.autograd.grad(nsa_attention(q, k, v, gates=gates), (q, k, v), do)

    first = step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronization now raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, first):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@gpu
def test_gpu_model_with_nsa_compiles_trains_and_decodes():
    from lmcore.nn import KVCache, ModelConfig, TransformerLM

    cfg = ModelConfig(vocab_size=256, context_length=2048, d_model=512, n_layers=2, n_heads=16, n_kv_heads=1,
                      d_ff=1024, attention_backend="nsa")
    torch.manual_seed(0)
    model = TransformerLM(cfg).cuda()
    compiled = torch.compile(model)
    ids = torch.randint(0, 256, (2, 2048), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(compiled(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    cache = KVCache(cfg, 1, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        steps = [model(ids[:1, :1500], cache)] + [model(ids[:1, t:t + 1], cache) for t in range(1500, 1510)]
        full = model(ids[:1, :1510])
    torch.testing.assert_close(torch.cat(steps, 1).float(), full.float(), atol=5e-2, rtol=5e-2)


def test_bench_resume_replaces_only_the_passes_measured_again():
    from lmcore.bench.nsa import unmeasured

    old = [dict(setting=s, seq=n, pas=p, method="nsa") for s in "ab" for n in (8, 16) for p in ("fwd", "decode")]
    old = [dict(r, **{"pass": r.pop("pas")}) for r in old]
    new = [{"setting": "a", "seq": 8, "pass": "decode", "method": "nsa"}]
    kept = unmeasured(old, new)
    assert len(kept) == len(old) - 1 and new[0] not in kept
    assert {"setting": "a", "seq": 8, "pass": "fwd", "method": "nsa"} in kept
