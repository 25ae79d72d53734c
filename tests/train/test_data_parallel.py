"""The training loop and pipeline under data parallelism: 2 CPU processes on gloo, a free port each time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmcore.distributed import free_port, launch
from lmcore.nn import ModelConfig, TransformerLM
from lmcore.train.checkpoint import load_checkpoint
from lmcore.train.loop import TrainConfig, train

TOKENS = np.random.default_rng(0).integers(0, 64, size=4000).astype(np.uint16)


def _model_config() -> ModelConfig:
    return ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2, d_ff=64)


def _train_rank(rank, world, kind, sharded, out_dir):
    cfg = TrainConfig(batch_size=2, grad_accum=2, max_iters=4, warmup_iters=1, eval_interval=4, eval_iters=1,
                      log_interval=2, device="cpu", ddp=kind, sharded_optimizer=sharded, bucket_size_mb=0.01,
                      out_dir=out_dir, progress=False)
    result = train(_model_config(), cfg, TOKENS, TOKENS)
    flat = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
    return flat.numpy(), result.iteration


@pytest.mark.parametrize("kind, sharded", [("naive", False), ("bucketed", True), ("torch", False)])
def test_ranks_stay_identical_and_rank_zero_writes(tmp_path, kind, sharded):
    out = str(tmp_path / kind)
    results = launch(_train_rank, 2, kind, sharded, out, backend="gloo", timeout=60)
    (w0, it0), (w1, it1) = results
    assert it0 == it1 == 4
    np.testing.assert_array_equal(w0, w1)  # averaged gradients keep every replica the same
    single, _ = _train_rank(0, 1, "none", False, None)
    assert not np.array_equal(w0, single), "two ranks saw twice the data; the result must differ"
    payload = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert payload["iteration"] == 4 and payload["config"]["train"]["ddp"] == kind
    # the sharded optimizer's checkpoint holds the merged state: every parameter has its moments
    assert len(payload["optimizer"]["state"]) == len(list(TransformerLM(_model_config()).parameters()))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iter"] for r in records if "loss" in r] == [2, 4]  # one writer, not two


def test_train_config_refuses_unknown_ddp():
    with pytest.raises(ValueError, match="ddp='zero3' is not one of"):
        TrainConfig(ddp="zero3")
    with pytest.raises(ValueError, match="FSDP already shards the optimizer state"):
        TrainConfig(ddp="fsdp", sharded_optimizer=True)
    with pytest.raises(ValueError, match="only ddp='fsdp' writes sharded checkpoints"):
        TrainConfig(ddp="torch", consolidate_checkpoint=True)


def test_torchrun_pipeline_with_bucketed_ddp_and_sharded_optimizer(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "lmcore.train", "--config", "stories-tiny", "--no-progress",
               "--ddp", "bucketed", "--sharded-optimizer", "--bucket-size-mb", "0.05",
               "--set", f"out_dir={out}", "--set", "corpus_size=20000", "--set", "vocab_size=280",
               "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
               "--set", "model.d_ff=64", "--set", "model.context_length=32", "--set", "train.max_iters=6",
               "--set", "train.batch_size=2", "--set", "train.eval_interval=6", "--set", "train.device=cpu",
               "--set", "train.warmup_iters=1", "--set", "sample.max_new_tokens=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 6 and summary["train"]["ddp"] == "bucketed"
    assert summary["train"]["sharded_optimizer"] is True
    assert len(json.loads(done.stdout)["samples"]) == 2  # only rank 0 printed its summary


def test_torchrun_without_a_ddp_mode_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "lmcore.train", "--config", "stories-tiny", "--no-progress",
               "--set", f"out_dir={out}", "--set", "train.device=cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "WORLD_SIZE=2" in done.stderr and "--ddp" in done.stderr, done.stderr[-3000:]
    assert not out.exists(), "two processes started training into one out_dir"
