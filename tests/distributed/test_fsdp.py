"""FSDP2 (``shard_model``) on CPU with gloo and 2 processes: each rank trains on half the batch and,
after every step, the gathered parameters must equal a single-process model trained on the whole batch."""

from __future__ import annotations

import pytest
import torch

from lmcore.distributed import RankFailedError, launch, shard_model

pytestmark = pytest.mark.timeout(180)

BATCH, SEQ = 4, 16


def tiny_config(**overrides):
    from lmcore.nn import ModelConfig

    return ModelConfig.preset("tiny", vocab_size=37, context_length=SEQ, d_model=16, n_heads=2, d_ff=40,
                              **overrides)


def fsdp_vs_single(rank, world, tie, steps=3):
    from lmcore.distributed.fsdp import clip_sharded_grad_norm, is_sharded
    from lmcore.nn import TransformerLM
    from lmcore.train.functional import clip_grad_norm, cross_entropy
    from lmcore.train.optim import AdamW

    config = tiny_config(tie_weights=tie)
    torch.manual_seed(100 + rank)  # different weights per rank: shard_model must broadcast rank 0's
    model = TransformerLM(config)
    torch.manual_seed(100)
    reference = TransformerLM(config)
    sharded = shard_model(model, mixed_precision="auto")
    opt = AdamW(sharded.parameters(), lr=1e-2, weight_decay=0.1, fused=False)
    ref_opt = AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, fused=False)
    g = torch.Generator().manual_seed(5)
    half = BATCH // world
    gaps, norm_gaps = [], []
    for _ in range(steps):
        x = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g)
        y = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g)
        mine = slice(rank * half, (rank + 1) * half)
        cross_entropy(sharded(x[mine]), y[mine]).backward()
        norm = clip_sharded_grad_norm(sharded, 0.5)
        opt.step()
        opt.zero_grad()
        cross_entropy(reference(x), y).backward()
        ref_norm = clip_grad_norm(reference.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad()
        norm_gaps.append(abs(float(norm) - float(ref_norm)))
        full = [p.full_tensor() for p in sharded.parameters()]
        gaps.append(max((a - b).abs().max().item() for a, b in zip(full, reference.parameters())))
    local = sum(p.to_local().numel() for p in sharded.parameters())
    return {"gaps": gaps, "norm_gaps": norm_gaps, "sharded": is_sharded(sharded), "local_numel": local,
            "numel": reference.num_parameters(), "tied": sharded.lm_head.weight is sharded.embedding.weight}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fsdp_training_equals_single_process(tie):
    results = launch(fsdp_vs_single, 2, tie, timeout=60)
    for r in results:
        assert len(r["gaps"]) == 3
        assert max(r["gaps"]) < 1e-5, r["gaps"]
        assert max(r["norm_gaps"]) < 1e-5, r["norm_gaps"]
        assert r["sharded"] and r["tied"] == tie
        assert r["local_numel"] < r["numel"]  # each rank keeps only its shard
    assert results[0]["local_numel"] + results[1]["local_numel"] >= results[0]["numel"]


def shard_bad(rank, world, what):
    from torch import nn

    from lmcore.nn import TransformerLM

    if what == "no-blocks":
        shard_model(nn.Sequential(nn.Linear(3, 3)))
    elif what == "offload-on-cpu":
        shard_model(TransformerLM(tiny_config()), cpu_offload=True)
    elif what == "precision":
        shard_model(TransformerLM(tiny_config()), mixed_precision="fp8")
    elif what == "mesh":
        from torch.distributed.device_mesh import init_device_mesh

        shard_model(TransformerLM(tiny_config()), mesh=init_device_mesh("cpu", (1, 2)))
    return "sharded"


@pytest.mark.parametrize("what,message", [
    ("no-blocks", "has no non-empty .blocks"),
    ("offload-on-cpu", "cpu_offload=True with parameters on cpu"),
    ("precision", "mixed_precision='fp8'"),
    ("mesh", r"mesh of shape \(1, 2\): expected a 1-D mesh over all 2 ranks"),
])
def test_bad_input_is_refused_clearly(what, message):
    with pytest.raises(RankFailedError, match=message):
        launch(shard_bad, 2, what, timeout=30, grace=5)


def test_needs_a_process_group():
    from lmcore.nn import TransformerLM

    with pytest.raises(RuntimeError, match="initialized process group"):
        shard_model(TransformerLM(tiny_config()))
