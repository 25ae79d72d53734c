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


def test_checkpoint_with_flipped_bytes_is_refused(tmp_path):
    """Eight bytes changed inside a tensor still unpickle; the checksum catches them."""
    import zipfile

    first = train(MODEL, cfg(out_dir=str(tmp_path), max_iters=2), tokens())
    with zipfile.ZipFile(first.checkpoint) as archive:
        biggest = max(archive.infolist(), key=lambda info: info.file_size)
    with open(first.checkpoint, "r+b") as f:
        f.seek(biggest.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        f.seek(biggest.header_offset + 30 + int(name_len) + int(extra_len) + biggest.file_size // 2)
        f.write(b"\x7f" * 8)
    with pytest.raises(ValueError, match="do not match the checksum") as info:
        load_checkpoint(first.checkpoint)
    assert "weights_only" not in str(info.value) and "--overwrite" in str(info.value)
    with pytest.raises(ValueError, match="corrupt"):
        train(MODEL, cfg(out_dir=str(tmp_path), max_iters=2), tokens(), resume=first.checkpoint)


DIE_DURING_SECOND_CHECKPOINT = """
import os, signal, sys
import torch
from tests.train.test_loop import MODEL, cfg, tokens
from lmcore.train import train

real_save, calls = torch.save, []
def save_then_die(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the checkpoint of iteration 10: half written, then the process is killed
        f.write(b"PK half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save_then_die
train(MODEL, cfg(out_dir=sys.argv[1], checkpoint_interval=5), tokens())
"""


def test_killed_during_a_checkpoint_write_then_resumed(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", DIE_DURING_SECOND_CHECKPOINT, str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert load_checkpoint(tmp_path / "ckpt.pt")["iteration"] == 5  # the previous checkpoint is intact
    assert len(list(tmp_path.glob(".tmp-*ckpt.pt"))) == 1
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [5, 10]
    resumed = train(MODEL, cfg(out_dir=str(tmp_path), checkpoint_interval=5), tokens(),
                    resume=tmp_path / "ckpt.pt")
    assert not list(tmp_path.glob(".tmp-*")), "the half-written checkpoint was left behind"
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iter"] for r in records if "loss" in r] == [5, 10, 15, 20]  # iteration 10 once, not twice
    straight = train(MODEL, cfg(), tokens()).model.state_dict()
    for name, value in straight.items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_resume_can_extend_max_iters(tmp_path, capsys):
    data = tokens()
    first = train(MODEL, cfg(out_dir=str(tmp_path), max_iters=10), data)
    longer = train(MODEL, cfg(out_dir=str(tmp_path), max_iters=20), data, resume=first.checkpoint)
    assert longer.iteration == 20 and load_checkpoint(longer.checkpoint)["iteration"] == 20
    assert "max_iters 10 -> 20: the cosine schedule now spans 20 iterations" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at iteration 20, past max_iters=15"):
        train(MODEL, cfg(out_dir=str(tmp_path), max_iters=15), data, resume=longer.checkpoint)


def test_min_lr_above_lr_is_refused():
    with pytest.raises(ValueError, match="min_lr=0.1 is above lr=0.01"):
        TrainConfig(lr=0.01, min_lr=0.1)
