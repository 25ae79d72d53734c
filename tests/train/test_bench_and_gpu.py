"""The training benchmark's quick mode, and the training stack on a GPU."""

import numpy as np
import pytest
import torch

from lmcore.nn import ModelConfig, TransformerLM
from lmcore.train import TrainConfig, train

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bench_quick_runs_both_stacks_and_the_cache(tmp_path):
    from lmcore.bench.train import main
    from lmcore.results import gpu_slug, load_recorded

    result = main(["--quick", "--out-dir", str(tmp_path)])
    row = result["metrics"]["tiny"]
    assert row["lmcore"]["tokens_per_s"] > 0 and row["baseline"]["tokens_per_s"] > 0
    assert abs(row["lmcore"]["loss"] - row["baseline"]["loss"]) < 1.0  # both start near log(vocab)
    assert result["decode"]["identical_tokens"] is True
    assert result["provenance"]["torch"] == torch.__version__
    recorded = load_recorded("train", directory=tmp_path)  # written as the book's recorded results are
    assert recorded.slug == gpu_slug(result["provenance"].get("gpu"))
    assert recorded.provenance["torch"] == torch.__version__ and recorded.meta["metrics"]["tiny"]["batch"] == 8
    assert recorded.rows["stack"].tolist() == ["baseline", "lmcore"] and (recorded.rows["tokens_per_s"] > 0).all()


def test_baseline_model_has_the_same_parameter_count():
    from lmcore.bench.train import BaselineLM

    for extra in ({}, {"tie_weights": True, "n_kv_heads": 2}):
        config = ModelConfig.preset("tiny", **extra)
        assert sum(p.numel() for p in BaselineLM(config).parameters()) == TransformerLM(config).num_parameters()


@pytest.mark.gpu
@gpu
def test_bf16_compiled_training_on_gpu(tmp_path):
    data = (np.arange(20000) * 7 % 512).astype(np.uint16)
    result = train(ModelConfig.preset("tiny"), TrainConfig(max_iters=30, batch_size=8, log_interval=5, compile=True,
                                                           device="cuda", progress=False, out_dir=str(tmp_path)),
                   data, data)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert next(result.model.parameters()).is_cuda


@pytest.mark.gpu
@gpu
def test_backends_agree_on_gpu_in_bf16():
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    outs = []
    for backend in ("reference", "vectorized", "sdpa"):
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig.preset("tiny", attention_backend=backend)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(model(ids).float())
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@gpu
def test_memory_estimate_within_ten_percent_on_gpu():
    from lmcore.bench.train import measure_training_memory

    # a real preset: on tiny models fixed allocations (library workspaces) dominate the total
    row = measure_training_memory(ModelConfig.preset("tinystories-17m"), 32, torch.device("cuda"))
    assert 0.9 < row["ratio"] < 1.1
