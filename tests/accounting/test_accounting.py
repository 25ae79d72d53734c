"""Parameter, FLOP and memory accounting against the model itself."""

import pytest
import torch

from lmcore.accounting import (count_params, flops_breakdown, flops_per_token, memory_estimate, mfu,
                              tracked_peak_memory)
from lmcore.nn import PRESETS, ModelConfig, TransformerLM


@pytest.mark.parametrize("name", list(PRESETS))
def test_count_params_matches_the_model(name):
    config = ModelConfig.preset(name)
    assert count_params(config) == TransformerLM(config, device="meta").num_parameters()


@pytest.mark.parametrize("extra", [{}, {"n_kv_heads": 2}, {"tie_weights": True}, {"d_head": 32, "qk_norm": True},
                                   {"norm": "layernorm", "norm_bias": True, "mlp": "plain", "mlp_bias": True,
                                    "attention_bias": True}])
def test_count_params_variants(extra):
    config = ModelConfig.preset("tiny", **extra)
    assert count_params(config) == TransformerLM(config).num_parameters()
    assert count_params(config, embedding=False) == count_params(config) - (0 if config.tie_weights else 512 * 64)


def test_forward_flops_match_torchs_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    config = ModelConfig.preset("tiny", context_length=32, n_kv_heads=2, attention_backend="vectorized")
    model = TransformerLM(config)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(2, 32, dtype=torch.long))
    assert counter.get_total_flops() / (2 * 32) == pytest.approx(flops_per_token(config, training=False), rel=0.01)
    assert flops_per_token(config) == 3 * sum(flops_breakdown(config).values())


def test_mfu_uses_the_device_peak():
    config = ModelConfig.preset("gpt2-small-shape")
    tokens_per_s = 0.5 * 989.4e12 / flops_per_token(config)
    assert mfu(tokens_per_s, config, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
    assert mfu(1.0, config, "Mystery GPU") is None


@pytest.mark.parametrize("kw, amp, ckpt", [({}, True, False), ({"n_kv_heads": 2, "tie_weights": True}, True, False),
                                           ({}, False, False), ({}, True, True)])
def test_memory_estimate_matches_tracked_peak_on_cpu(kw, amp, ckpt):
    """Every tensor alive during a training step, tracked on CPU, against the estimate."""
    pytest.importorskip("torch.distributed._tools.mem_tracker")

    config = ModelConfig.preset("tiny", vocab_size=512, context_length=64, d_model=128, n_heads=4, d_ff=352, **kw)
    dtype = "bfloat16" if amp else "float32"
    measured = tracked_peak_memory(config, 4, 64, dtype, checkpointing=ckpt)
    estimate = memory_estimate(config, 4, 64, dtype, checkpointing=ckpt)
    assert estimate["total"] == pytest.approx(measured, rel=0.10)


def test_memory_estimate_parts_and_errors():
    config = ModelConfig.preset("gpt2-small-shape")
    est = memory_estimate(config, 8, 1024)
    n = count_params(config)
    assert est["weights"] == 4 * n and est["optimizer"] == 8 * n
    assert memory_estimate(config, 8, 1024, checkpointing=True)["total"] < est["total"]
    assert memory_estimate(config, 16, 1024)["activations"] > est["activations"]
    with pytest.raises(ValueError, match="dtype"):
        memory_estimate(config, 8, 1024, dtype="int4")
    with pytest.raises(ValueError, match="exceeds context_length"):
        memory_estimate(config, 8, 4096)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "shampoo", "soap", "soap-lowbit", "muon"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_memory_estimate_with_each_optimizer_matches_tracked_peak_on_cpu(optimizer, amp):
    pytest.importorskip("torch.distributed._tools.mem_tracker")

    config = ModelConfig.preset("tiny", vocab_size=512, context_length=64, d_model=128, n_heads=4, d_ff=352)
    dtype = "bfloat16" if amp else "float32"
    options = {"min_8bit_size": 1024} if optimizer == "adamw8bit" else {}
    measured = tracked_peak_memory(config, 4, 64, dtype, optimizer=optimizer, optimizer_options=options)
    estimate = memory_estimate(config, 4, 64, dtype, optimizer=optimizer, optimizer_options=options)
    assert estimate["total"] == pytest.approx(measured, rel=0.10)
    assert estimate["optimizer"] != memory_estimate(config, 4, 64, dtype)["optimizer"]


def test_memory_estimate_counts_the_unchunked_losss_arrays_where_they_dominate():
    """A large vocabulary and a narrow model: the loss's float32 (tokens, vocabulary) arrays are
    most of the peak, so a miscounted one would show."""
    config = ModelConfig.preset("tiny", vocab_size=50304, context_length=128)
    measured = tracked_peak_memory(config, 4, 128, "float32")
    estimate = memory_estimate(config, 4, 128, "float32")
    assert estimate["logits"] > 0.75 * estimate["total"]
    assert estimate["total"] / measured == pytest.approx(1.0, abs=0.03)


def _recorded_comparison_runs():
    """(model settings, run) of one run per optimizer: the peak does not depend on the learning rate.

    Runs made with ``--stop-after`` before runs recorded the memory held as they started (collected
    first) could start with an earlier run's model and optimizer still uncollected: their peaks stand
    4.3 and 8.6 GB above the same optimizer's single runs, so they are left out."""
    import json
    from pathlib import Path

    path = Path(__file__).parents[2] / "book" / "results" / "optim-h200-compare.json"
    data = json.loads(path.read_text())
    seen = {}
    for run in data["runs"]:
        if "--stop-after" not in run["provenance"]["command"] or "memory_held_before_bytes" in run:
            seen.setdefault(run["optimizer"], run)
    return [pytest.param(data["settings"], r, id=name) for name, r in seen.items()]


@pytest.mark.parametrize("settings, run", _recorded_comparison_runs())
def test_memory_estimate_matches_each_optimizers_recorded_h200_peak(settings, run):
    """The optimizer comparison's training runs (gpt2-small shape, bf16 autocast, book/results with
    provenance): the peak each optimizer's run reached against the estimate for it."""
    config = ModelConfig(**settings["model"])
    est = memory_estimate(config, run["batch"], config.context_length, "bfloat16", run["optimizer"],
                          optimizer_options=run["optimizer_options"])["total"]
    assert est / run["peak_memory_bytes"] == pytest.approx(1.0, rel=0.10)
    assert (run.get("memory_held_before_bytes") or 0) < 0.01 * run["peak_memory_bytes"]


def test_memory_estimate_optimizer_state_follows_lmcore_optim():
    from lmcore.optim import state_bytes_formula

    config = ModelConfig.preset("gpt2-small-shape")
    n = count_params(config)
    est = {name: memory_estimate(config, 8, 1024, optimizer=name)["optimizer"]
           for name in ("adamw", "adamw8bit", "muon", "soap")}
    assert est["adamw8bit"] < 0.3 * est["adamw"] and est["muon"] < est["adamw"] < est["soap"]
    assert est["soap"] == state_bytes_formula("soap", TransformerLM(config, device="meta"))
    assert est["adamw"] == 8 * n
    with pytest.raises(ValueError, match="optimizer='lion'"):
        memory_estimate(config, 8, 1024, optimizer="lion")


def test_family_presets_have_their_published_sizes():
    """Parameter counts as the model cards give them (Pythia's include the untied output head)."""
    assert count_params(ModelConfig.preset("pythia-70m")) == 70_426_624
    assert count_params(ModelConfig.preset("pythia-160m")) == 162_322_944
    assert count_params(ModelConfig.preset("qwen3-0.6b")) == 596_049_920
    assert 7.5e9 < count_params(ModelConfig.preset("qwen3-8b")) < 8.5e9
    assert 32e9 < count_params(ModelConfig.preset("qwen3-32b")) < 33.5e9


SMALL = dict(vocab_size=512, context_length=64, d_model=128, n_heads=4, d_ff=352, n_layers=2)
FAMILIES = {"pythia": ("pythia-70m", dict(SMALL, d_ff=512)),
            "qwen3": ("qwen3-0.6b", dict(SMALL, n_kv_heads=2, d_head=64))}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype, ckpt, chunk, batch", [("bfloat16", False, None, 4), ("float32", False, None, 4),
                                                       ("bfloat16", True, None, 8), ("bfloat16", 2, None, 4),
                                                       ("bfloat16", False, 64, 4)])
def test_family_memory_estimate_matches_tracked_peak_on_cpu(family, dtype, ckpt, chunk, batch):
    """Pythia- and Qwen3-shaped models (grouped KV heads, QK-norm, parallel residual, LayerNorm, biases)
    with checkpointing of every or every other block and the chunked loss, against the tracked peak."""
    pytest.importorskip("torch.distributed._tools.mem_tracker")

    name, shape = FAMILIES[family]
    config = ModelConfig.preset(name, **shape)
    measured = tracked_peak_memory(config, batch, 64, dtype, checkpointing=ckpt, loss_chunk=chunk)
    estimate = memory_estimate(config, batch, 64, dtype, checkpointing=ckpt, loss_chunk=chunk)
    assert estimate["total"] == pytest.approx(measured, rel=0.10)


def test_chunked_loss_and_partial_checkpointing_save_what_they_should():
    config = ModelConfig.preset("qwen3-0.6b", context_length=32768)
    plain = memory_estimate(config, 1, 32768)
    chunked = memory_estimate(config, 1, 32768, loss_chunk=4096)
    assert plain["logits"] == 3 * 4 * 32768 * 151936  # three float32 (tokens, vocabulary) arrays
    assert chunked["logits"] < plain["logits"] / 5
    every = [memory_estimate(config, 1, 32768, checkpointing=k)["activations"] for k in (False, 4, 2, True)]
    assert every == sorted(every, reverse=True)  # checkpointing more blocks keeps fewer activations
    with pytest.raises(ValueError, match="activation_checkpointing=0"):
        memory_estimate(config, 1, 1024, checkpointing=0)


def test_sharded_memory_estimate_splits_model_states_over_ranks():
    from lmcore.accounting import memory_estimate, sharded_memory_estimate

    config = ModelConfig.preset("qwen3-0.6b")
    from lmcore.accounting import memory_peaks

    one = memory_peaks(config, 1, 4096, checkpointing=True)
    assert {k: one[k] for k in memory_estimate(config, 1, 4096, checkpointing=True)} == \
        memory_estimate(config, 1, 4096, checkpointing=True)
    ddp = sharded_memory_estimate(config, 1, 8, "ddp", seq=4096, checkpointing=True)
    zero1 = sharded_memory_estimate(config, 1, 8, "zero1", seq=4096, checkpointing=True)
    fsdp = sharded_memory_estimate(config, 1, 8, "fsdp", seq=4096, checkpointing=True)
    assert ddp["total"] == one["total"]
    assert zero1["total"] == one["total"] - int(one["optimizer"] * 7 / 8)
    states = one["weights"] + one["gradients"] + one["optimizer"]
    assert fsdp["at_step"] == one["at_step"] - int(states * 7 / 8)
    assert fsdp["at_backward"] == one["at_backward"] - int((one["weights"] + one["optimizer"]) * 7 / 8)
    assert fsdp["total"] == max(fsdp["at_backward"], fsdp["at_step"]) + fsdp["gathered"]
    longer = sharded_memory_estimate(config, 1, 8, "fsdp", seq=32768, checkpointing=True)
    assert longer["total"] > fsdp["total"]  # once sharded, activations decide the peak
    assert 0 < fsdp["gathered"] < one["weights"] / 2  # a few blocks and the root, not the model
    assert fsdp["total"] < zero1["total"] < ddp["total"]
    single = sharded_memory_estimate(config, 1, 1, "fsdp", seq=4096, checkpointing=True)
    assert single["gathered"] == 0 and single["total"] == one["total"]
    with pytest.raises(ValueError, match="scheme='zero3'"):
        sharded_memory_estimate(config, 1, 8, "zero3")
    with pytest.raises(ValueError, match="world_size=0"):
        sharded_memory_estimate(config, 1, 0)


def _recorded_h200_cases():
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).parent / "data" / "longctx-h200-peaks.json").read_text())
    return data, [pytest.param(case, id=f"{case['backend']}-{case['context']}-ckpt{int(case['checkpointing'])}")
                  for case in data["cases"]]


@pytest.mark.parametrize("case", _recorded_h200_cases()[1])
def test_memory_estimate_matches_the_recorded_h200_peaks(case):
    """The qwen3-0.6b shape trained at 4k-32k tokens on an H200 (peaks recorded in data/, with provenance)."""
    data = _recorded_h200_cases()[0]
    base = ModelConfig.preset(data["model"])
    T = case["context"]
    config = base.replace(context_length=max(T, base.context_length), attention_backend=case["backend"])
    est = memory_estimate(config, data["batch"], T, data["dtype"], data["optimizer"],
                          checkpointing=case["checkpointing"], loss_chunk=data["loss_chunk"])["total"]
    assert est / 1e9 == pytest.approx(case["peak_gb"], rel=0.10)


def test_chunked_loss_single_chunk_peaks_lower_than_several():
    """From the second chunk on, the previous chunk's softmax and gradient are still alive."""
    config = ModelConfig.preset("qwen3-0.6b")
    one = memory_estimate(config, 1, 4096, checkpointing=True, loss_chunk=4096)["logits"]
    two = memory_estimate(config, 1, 8192, checkpointing=True, loss_chunk=4096)["logits"]
    assert two - one == 4 * 4096 * config.vocab_size + 4 * 4096 * config.d_model
