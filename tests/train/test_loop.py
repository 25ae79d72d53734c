"""The training loop: learning, exact resume, refused resumes, metrics and the plot."""

import fractions
import os

import numpy as np
import pytest
import torch

from lmcore.nn import ModelConfig
from lmcore.train import TrainConfig, load_checkpoint, read_metrics, train

MODEL = ModelConfig.preset("tiny", vocab_size=64, context_length=16, d_model=32, d_ff=64, n_heads=2)


def tokens(n=5000, seed=0):
    """A learnable sequence: mostly counting upwards mod 64, with some noise."""
    rng = np.random.default_rng(seed)
    seq = (np.arange(n) * 3) % 64
    noise = rng.random(n) < 0.1
    seq[noise] = rng.integers(0, 64, noise.sum())
    return seq.astype(np.uint16)


def cfg(**kw):
    base = dict(batch_size=4, max_iters=20, lr=1e-2, min_lr=1e-3, warmup_iters=3, eval_interval=10,
                eval_iters=2, log_interval=5, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


def test_loss_falls_and_metrics_are_written(tmp_path):
    data = tokens()
    result = train(MODEL, cfg(max_iters=40, out_dir=str(tmp_path), grad_accum=2), data, tokens(seed=1))
    records = read_metrics(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0
    vals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in vals] == [10, 20, 30, 40]
    assert vals[-1]["val_perplexity"] == pytest.approx(np.exp(vals[-1]["val_loss"]), rel=1e-6)
    assert all(r["tokens_per_s"] > 0 and r["memory_mb"] > 0 for r in records if "loss" in r)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert result.iteration == 40 and os.path.exists(result.checkpoint)


def test_resume_is_bit_identical(tmp_path):
    data = tokens()
    straight = train(MODEL, cfg(), data).model.state_dict()
    first = train(MODEL, cfg(out_dir=str(tmp_path)), data, stop_at=10)
    assert first.iteration == 10 and load_checkpoint(first.checkpoint)["iteration"] == 10
    resumed = train(MODEL, cfg(out_dir=str(tmp_path)), data, resume=first.checkpoint)
    assert resumed.iteration == 20
    for name, value in straight.items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    iters = [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert iters == [5, 10, 15, 20]  # the metrics file continues rather than restarting


def test_resume_with_another_config_names_the_fields(tmp_path):
    data = tokens()
    first = train(MODEL, cfg(out_dir=str(tmp_path), max_iters=2), data)
    with pytest.raises(ValueError, match=r"model\.d_model: checkpoint 32, now 64.*train\.lr"):
        train(MODEL.replace(d_model=64), cfg(max_iters=2, lr=5e-3), data, resume=first.checkpoint)
    # where the run is observed may change
    train(MODEL, cfg(max_iters=2, log_interval=1, out_dir=str(tmp_path / "b")), data, resume=first.checkpoint)


def test_truncated_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    first = train(MODEL, cfg(out_dir=str(tmp_path), max_iters=2), tokens())
    blob = open(first.checkpoint, "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(cut)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not an lmcore checkpoint"):
        load_checkpoint(other)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "lmcore-checkpoint-1", "x": fractions.Fraction(1, 3)}, evil)
    with pytest.raises(ValueError, match="truncated or corrupt"):  # arbitrary objects are never unpickled
        load_checkpoint(evil)


def test_activation_checkpointing_trains_the_same():
    data = tokens()
    a = train(MODEL, cfg(max_iters=3), data).model.state_dict()
    b = train(MODEL, cfg(max_iters=3, activation_checkpointing=True), data).model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp8")
