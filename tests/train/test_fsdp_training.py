"""The training loop with ``ddp="fsdp"`` on 2 gloo processes: it trains as torch DDP does, its sharded
checkpoint resumes exactly, is verified before use, and gathers into the usual single file on request."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lmcore.distributed import RankFailedError, launch
from lmcore.nn import ModelConfig, TransformerLM
from lmcore.train.checkpoint import load_checkpoint
from lmcore.train.loop import TrainConfig, configure_optimizer, train

pytestmark = pytest.mark.timeout(240)

TOKENS = np.random.default_rng(1).integers(0, 64, size=4000).astype(np.uint16)


def _model_config() -> ModelConfig:
    return ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                       tie_weights=True)


def _run(rank, world, kind, out_dir, stop_at=None, resume=None, consolidate=False):
    cfg = TrainConfig(batch_size=2, grad_accum=2, max_iters=4, warmup_iters=1, eval_interval=2, eval_iters=1,
                      log_interval=2, device="cpu", ddp=kind, out_dir=out_dir, progress=False,
                      dtype="float32", checkpoint_interval=2, consolidate_checkpoint=consolidate)
    result = train(_model_config(), cfg, TOKENS, TOKENS, stop_at=stop_at, resume=resume)
    if rank != 0:
        return None
    return torch.cat([p.detach().reshape(-1) for p in result.model.parameters()]).numpy(), result.iteration


def test_fsdp_trains_like_ddp_and_resumes_exactly_from_its_sharded_checkpoint(tmp_path):
    straight, it = launch(_run, 2, "fsdp", str(tmp_path / "a"), None, None, True, timeout=90)[0]
    assert it == 4
    ddp, _ = launch(_run, 2, "torch", str(tmp_path / "ddp"), timeout=90)[0]
    np.testing.assert_allclose(straight, ddp, rtol=0, atol=1e-5)  # same math, sharded
    half = str(tmp_path / "b")
    _, it = launch(_run, 2, "fsdp", half, 2, timeout=90)[0]
    assert it == 2 and os.path.exists(os.path.join(half, "ckpt-sharded", "meta.json"))
    assert not os.path.exists(os.path.join(half, "ckpt.pt"))  # consolidation only on request
    resumed, it = launch(_run, 2, "fsdp", half, None, os.path.join(half, "ckpt-sharded"), timeout=90)[0]
    assert it == 4
    np.testing.assert_array_equal(resumed, straight)
    # the consolidated file is an ordinary checkpoint: a plain model and optimizer load it
    payload = load_checkpoint(tmp_path / "a" / "ckpt.pt")
    assert payload["iteration"] == 4
    model = TransformerLM(_model_config())
    model.load_state_dict(payload["model"])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    np.testing.assert_array_equal(flat, straight)
    optimizer = configure_optimizer(model, TrainConfig(device="cpu"))
    optimizer.load_state_dict(payload["optimizer"])
    assert len(payload["optimizer"]["state"]) == len(list(model.parameters()))
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in model.parameters())
    reference = load_checkpoint(tmp_path / "ddp" / "ckpt.pt")["optimizer"]  # numbered alike
    assert sorted(reference["state"]) == sorted(payload["optimizer"]["state"])
    for i, state in reference["state"].items():
        torch.testing.assert_close(payload["optimizer"]["state"][i]["exp_avg"], state["exp_avg"],
                                   rtol=0, atol=1e-5)


def test_a_damaged_sharded_checkpoint_is_refused(tmp_path):
    out = str(tmp_path / "run")
    launch(_run, 2, "fsdp", out, 2, timeout=90)
    folder = os.path.join(out, "ckpt-sharded")
    shard = next(os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".distcp"))
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(RankFailedError, match="does not match its checksum"):
        launch(_run, 2, "fsdp", out, None, folder, timeout=60, grace=10)
    with pytest.raises(RankFailedError, match="resumes from its sharded checkpoint folder"):
        launch(_run, 2, "fsdp", out, None, os.path.join(out, "ckpt.pt"), timeout=60, grace=10)


def test_torchrun_pipeline_with_fsdp_resumes_from_the_sharded_checkpoint(tmp_path):
    import json
    import subprocess
    import sys

    from lmcore.distributed import free_port

    out = tmp_path / "run"

    def run(max_iters, *flags):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                   str(free_port()), "-m", "lmcore.train", "--config", "stories-tiny", "--no-progress",
                   "--ddp", "fsdp", *flags, "--set", f"out_dir={out}", "--set", "corpus_size=20000",
                   "--set", "vocab_size=280", "--set", "model.d_model=32", "--set", "model.n_layers=2",
                   "--set", "model.n_heads=2", "--set", "model.d_ff=64", "--set", "model.context_length=32",
                   "--set", f"train.max_iters={max_iters}", "--set", "train.batch_size=2",
                   "--set", "train.eval_interval=2", "--set", "train.device=cpu",
                   "--set", "train.warmup_iters=1", "--set", "sample.max_new_tokens=4"]
        return subprocess.run(command, capture_output=True, text=True, timeout=240,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    done = run(2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "ckpt-sharded" / "meta.json").exists() and not (out / "ckpt.pt").exists()
    refused = run(4)  # the folder holds a run: never written over silently
    assert refused.returncode != 0 and "--resume" in refused.stderr
    done = run(4, "--resume", "--consolidate")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 4 and summary["train"]["ddp"] == "fsdp"
    assert load_checkpoint(out / "ckpt.pt")["iteration"] == 4
    assert len(json.loads(done.stdout)["samples"]) == 2
    done = run(4, "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (out / "ckpt.pt").exists()  # the earlier run's files were removed
