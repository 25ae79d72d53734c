"""TransformerLM: configs, presets, backends, grouped-query heads, caching and checkpointing."""

import pytest
import torch
from torch import nn

from lmcore.nn import KVCache, ModelConfig, PRESETS, TransformerLM, attention_backends, get_attention_backend

BACKENDS = ["reference", "vectorized", "sdpa"]


def tiny(**overrides):
    return ModelConfig.preset("tiny", context_length=32, **overrides)


def test_layers_are_written_out():
    model = TransformerLM(tiny())
    forbidden = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.MultiheadAttention)
    assert not [m for m in model.modules() if isinstance(m, forbidden)]


@pytest.mark.parametrize("extra", [{}, {"n_kv_heads": 2}, {"rope_style": "interleaved"}, {"tie_weights": True}])
def test_every_backend_gives_the_same_logits(extra):
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    logits = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        logits[backend] = TransformerLM(tiny(attention_backend=backend, **extra))(ids)
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(logits[backend], logits["reference"], atol=2e-5, rtol=1e-4)
    assert logits["sdpa"].shape == (2, 17, 512)


def test_registry_lists_and_refuses_names():
    assert set(BACKENDS) <= set(attention_backends())
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        TransformerLM(tiny(attention_backend="nope"))


def test_model_is_causal():
    torch.manual_seed(0)
    model = TransformerLM(tiny())
    ids = torch.randint(0, 512, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 512
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("bad, reason", [
    (dict(d_model=60, n_heads=8), "not divisible by n_heads"),
    (dict(d_model=36, n_heads=4), "odd"),
    (dict(n_kv_heads=3), "divisor of n_heads"),
    (dict(rope_style="spiral"), "rope_style"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_impossible_configs_are_refused_with_the_reason(bad, reason):
    with pytest.raises(ValueError, match=reason):
        tiny(**bad)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("gpt5")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"d_model": 64, "depth": 3})
    assert ModelConfig.from_dict(tiny().to_dict()) == tiny()


def test_too_long_sequence_is_a_clear_error():
    model = TransformerLM(tiny())
    with pytest.raises(ValueError, match="longer than the model's context_length=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_presets_have_the_published_shapes():
    assert set(PRESETS) >= {"tiny", "tinystories-17m", "pythia-70m-shape", "gpt2-small-shape"}
    ts = ModelConfig.preset("tinystories-17m")
    assert (ts.d_model, ts.d_ff, ts.n_layers, ts.n_heads, ts.context_length, ts.vocab_size) == (512, 1344, 4, 16, 256, 10000)
    g = ModelConfig.preset("gpt2-small-shape")
    assert (g.n_layers, g.d_model, g.n_heads, g.context_length) == (12, 768, 12, 1024)
    model = TransformerLM(g, device="meta")
    assert 120e6 < model.num_parameters() < 130e6  # GPT-2 small has 124M


def test_weight_tying_shares_one_matrix():
    model = TransformerLM(tiny(tie_weights=True))
    assert model.lm_head.weight is model.embedding.weight
    assert model.num_parameters() == TransformerLM(tiny()).num_parameters() - 512 * 64


@pytest.mark.parametrize("n_kv_heads", [None, 1])
def test_kv_cache_matches_full_forward(n_kv_heads):
    torch.manual_seed(0)
    model = TransformerLM(tiny(n_kv_heads=n_kv_heads)).eval()
    ids = torch.randint(0, 512, (2, 10))
    full = model(ids)
    cache = KVCache(model.config, batch_size=2)
    steps = [model(ids[:, :6], cache)] + [model(ids[:, t:t + 1], cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 10
    if n_kv_heads == 1:
        assert cache.k.shape[2] == 1  # grouped-query attention stores one shared key/value head


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = TransformerLM(tiny())
    ids = torch.randint(0, 512, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        model(ids).float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_backend_options_are_passed_through():
    seen = {}
    from lmcore.nn.registry import register_attention_backend

    @register_attention_backend("test_spy")
    def spy(q, k, v, causal=True, **options):
        seen.update(options, causal=causal)
        return get_attention_backend("vectorized")(q, k, v, causal=causal)

    TransformerLM(tiny(attention_backend="test_spy", attention_options={"block": 16}))(torch.zeros(1, 4, dtype=torch.long))
    assert seen == {"block": 16, "causal": True}


def test_cached_decoding_with_a_backend_that_needs_equal_lengths():
    from lmcore.nn.registry import register_attention_backend

    @register_attention_backend("test_equal_lengths_only")
    def equal_only(q, k, v, causal=True, **options):
        assert q.shape[-2] == k.shape[-2], "this backend needs as many queries as keys"
        return get_attention_backend("sdpa")(q, k, v, causal=causal)

    torch.manual_seed(0)
    model = TransformerLM(tiny(attention_backend="test_equal_lengths_only")).eval()
    ids = torch.randint(0, 512, (1, 8))
    cache = KVCache(model.config, 1)
    steps = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, reason", [
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
    (dict(norm_bias=True), "norm_bias=True needs norm='layernorm'"),
    (dict(mlp="moe"), "mlp='moe'"),
    (dict(activation="relu"), "activation='relu'"),
    (dict(rotary_fraction=0.0), "rotary_fraction"),
    (dict(rotary_fraction=0.1), "gives 1 rotated channels"),
    (dict(d_model=60, n_heads=8, d_head=0), "d_head=0"),
])
def test_impossible_family_switches_are_refused_with_the_reason(bad, reason):
    with pytest.raises(ValueError, match=reason):
        tiny(**bad)


def test_family_presets_have_the_published_shapes():
    p = ModelConfig.preset("pythia-410m")
    assert (p.d_model, p.n_layers, p.n_heads, p.d_ff, p.vocab_size, p.rotary_dim) == (1024, 24, 16, 4096, 50304, 16)
    assert p.parallel_residual and p.norm == "layernorm" and not p.tie_weights
    q = ModelConfig.preset("qwen3-32b")
    assert (q.d_model, q.n_layers, q.n_heads, q.kv_heads, q.head_dim, q.d_ff) == (5120, 64, 64, 8, 128, 25600)
    assert q.qk_norm and q.rope_theta == 1e6 and q.vocab_size == 151936
    assert ModelConfig.preset("qwen3-0.6b").tie_weights and not ModelConfig.preset("qwen3-8b").tie_weights


@pytest.mark.parametrize("grouped", [True, False])
def test_grouped_kv_backends_get_the_kv_heads_uncopied(grouped):
    from lmcore.nn.registry import register_attention_backend

    seen = []

    @register_attention_backend(f"test_grouped_{grouped}", kv_offsets=True, grouped_kv=grouped)
    def spy(q, k, v, causal=True, **options):
        seen.append((q.shape[1], k.shape[1], v.shape[1]))
        return get_attention_backend("sdpa")(q, k, v, causal=causal)

    torch.manual_seed(0)
    model = TransformerLM(tiny(attention_backend=f"test_grouped_{grouped}", n_kv_heads=1)).eval()
    torch.manual_seed(0)
    ref = TransformerLM(tiny(attention_backend="reference", n_kv_heads=1)).eval()
    ids = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(model(ids), ref(ids), atol=2e-5, rtol=1e-4)
    assert seen[0] == ((4, 1, 1) if grouped else (4, 4, 4))
    cache = KVCache(model.config, 2)  # decoding goes through the same backend, queries at the last positions
    steps = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), ref(ids), atol=2e-5, rtol=1e-4)
    assert len(seen) == 2 + 5 * 2 and cache.k.shape[2] == 1


@pytest.mark.parametrize("choice, blocks", [(False, []), (True, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3]),
                                            ([1, 3], [1, 3])])
def test_checkpointing_per_block(choice, blocks):
    from torch.utils import checkpoint as ckpt_module

    torch.manual_seed(0)
    model = TransformerLM(tiny(n_layers=4))
    ids = torch.randint(0, 512, (2, 16))
    model(ids).float().square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = choice
    calls = []
    original = ckpt_module.checkpoint

    def counting(fn, *args, **kw):
        calls.append(args[4])  # the block index
        return original(fn, *args, **kw)

    import lmcore.nn.model as model_module
    model_module.checkpoint = counting
    try:
        model(ids).float().square().mean().backward()
    finally:
        model_module.checkpoint = original
    assert calls == blocks
    for a, b in zip(plain, (p.grad for p in model.parameters())):
        torch.testing.assert_close(b, a)


def test_checkpointing_choice_is_checked():
    model = TransformerLM(tiny())
    with pytest.raises(ValueError, match="blocks \\[5\\]; the model has blocks 0..1"):
        model.activation_checkpointing = [0, 5]
    with pytest.raises(ValueError, match="positive k"):
        model.activation_checkpointing = -1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_triton", "sdpa"])
def test_qwen3_shaped_gqa_model_on_gpu_trains_and_decodes_with_its_own_backend(backend):
    """Grouped K/V heads through the backend itself (no copies where it takes them), on CUDA in bf16."""
    from lmcore.nn import attention_capabilities

    config = ModelConfig.preset("qwen3-0.6b", vocab_size=1024, n_layers=2, context_length=256,
                                attention_backend=backend)
    torch.manual_seed(0)
    model = TransformerLM(config).cuda()
    torch.manual_seed(0)
    ref = TransformerLM(config.replace(attention_backend="vectorized")).cuda()
    ids = torch.randint(0, 1024, (2, 200), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, expected = model(ids), ref(ids)
        loss = model.loss(ids[:, :-1], ids[:, 1:], chunk_size=64)
    torch.testing.assert_close(out.float(), expected.float(), atol=5e-2, rtol=5e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert attention_capabilities(backend).kv_offsets
    model.eval()
    cache = KVCache(config, 2, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        steps = [model(ids[:, :150], cache)] + [model(ids[:, t:t + 1], cache) for t in range(150, 160)]
        full = model(ids[:, :160])
    torch.testing.assert_close(torch.cat(steps, 1).float(), full.float(), atol=5e-2, rtol=5e-2)
    assert cache.k.shape[2] == config.kv_heads
