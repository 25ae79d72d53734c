"""The config-file pipeline: overrides, refusals and a tiny end-to-end run."""

import json

import pytest

from lmcore.train.__main__ import main
from lmcore.train.pipeline import apply_override, load_config, model_and_train_configs


def test_overrides_parse_values_and_nest():
    config = load_config("stories-tiny", ["train.lr=1e-3", "model.d_model=64", "sample.top_p=null",
                                          "special_tokens=['<|endoftext|>', '<|pad|>']"])
    assert config["train"]["lr"] == 0.001 and isinstance(config["train"]["lr"], float)
    assert config["model"]["d_model"] == 64 and config["model"]["preset"] == "tiny"
    assert config["sample"]["top_p"] is None
    assert config["special_tokens"] == ["<|endoftext|>", "<|pad|>"]
    model, train = model_and_train_configs(config, vocab_size=300)
    assert model.d_model == 64 and model.vocab_size == 300 and train.lr == 0.001


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="expected key=value"):
        apply_override({}, "train.lr")
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["epochs=3"])
    with pytest.raises(ValueError, match="unknown config key .train.epochs."):
        model_and_train_configs(load_config(None, ["train.epochs=3"]))
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        model_and_train_configs(load_config(None, ["model.d_model=30"]))
    assert main(["--config", "stories-tiny", "--set", "nonsense=1"]) == 2


def test_end_to_end_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", "stories-tiny", "--no-progress", "--set", f"out_dir={out}", "--set", "corpus_size=40000",
            "--set", "vocab_size=300", "--set", "model.d_model=32", "--set", "model.n_layers=1",
            "--set", "model.n_heads=2", "--set", "model.d_ff=64", "--set", "model.context_length=32",
            "--set", "train.max_iters=30", "--set", "train.batch_size=4", "--set", "train.eval_interval=15",
            "--set", "train.warmup_iters=3", "--set", "train.lr=0.01", "--set", "sample.max_new_tokens=8"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 30
    assert summary["val_loss"] < summary["unigram_val_loss"] + 1.0  # learning has started
    assert len(summary["samples"]) == 2 and all(s.startswith("Once upon a time") for s in summary["samples"])
    for name in ("tokenizer.json", "train.npy", "val.npy", "ckpt.pt", "metrics.jsonl", "curves.png"):
        assert (out / name).exists(), name
    printed = json.loads(capsys.readouterr().out)
    assert printed["iterations"] == 30


# ----------------------------------------------------------------------------------------------
# nothing a user made is lost, nothing wrong passes silently


def tiny(out, *more):
    """Arguments of a run small enough for a test (seconds), into ``out``."""
    sets = [f"out_dir={out}", "corpus_size=20000", "vocab_size=280", "model.d_model=32", "model.n_layers=1",
            "model.n_heads=2", "model.d_ff=64", "model.context_length=32", "train.max_iters=6",
            "train.batch_size=2", "train.eval_interval=6", "train.eval_iters=1", "train.warmup_iters=1",
            "train.device=cpu", "sample.max_new_tokens=4", "sample.num_samples=1", *more]
    return ["--config", "stories-tiny", "--no-progress", *[a for s in sets for a in ("--set", s)]]


def test_rerun_without_resume_leaves_the_old_run_intact(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny(out)) == 0
    kept = {name: (out / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl", "summary.json")}
    capsys.readouterr()
    assert main(tiny(out, "train.lr=0.01")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds an earlier training run" in err and "--resume" in err, err
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert main(tiny(out, "train.lr=0.01") + ["--next"]) == 0
    assert f"writing to {out}-2 instead" in capsys.readouterr().err
    assert json.loads((tmp_path / "run-2" / "summary.json").read_text())["train"]["lr"] == 0.01
    assert {name: (out / name).read_bytes() for name in kept} == kept


@pytest.mark.parametrize("setting, message", [
    ("sample.temprature=0.5", "unknown config key 'sample.temprature' (did you mean 'sample.temperature'?)"),
    ("model.dmodel=32", "did you mean 'model.d_model'"),
    ("train.lr=abc", "train.lr='abc' (str) must be a number"),
    ("train.min_lr=0.1", "min_lr=0.1 is above lr=0.003"),
    ("train.warmup_iters=50", "warmup_iters=50 is longer than the whole run"),
    ("val_fraction=0.001", "validation split"),
    ("sample.top_p=1.5", "top_p=1.5 must lie in (0, 1]"),
    ("sample.temperature=-1", "temperature=-1.0 must be >= 0"),
    ("sample.max_new_tokens=40", "sample.max_new_tokens=40 leaves no room for the prompt"),
    ("train.batch_size=10000000", "GiB (lmcore.accounting.memory_estimate)"),
])
def test_config_errors_are_one_line_before_any_work(tmp_path, capsys, setting, message):
    out = tmp_path / "never"
    assert main(tiny(out, setting)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not out.exists(), "work started before the config was checked"


def test_resume_without_checkpoint_and_torchrun_without_ddp_are_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "never"
    assert main(tiny(out) + ["--resume"]) == 2
    assert "holds no earlier training run" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it
    assert main(tiny(out)) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2" in err and "--ddp" in err
    assert not out.exists()


def test_data_stage_rebuilds_or_refuses_when_its_settings_change(tmp_path):
    from lmcore.train.pipeline import ConfigError, prepare_data

    settings = [f"out_dir={tmp_path}", "corpus_size=20000", "vocab_size=280"]
    first = prepare_data(load_config(None, settings))
    assert first["tokenizer"].vocab_size == 280
    assert json.loads((tmp_path / "data.json").read_text())["vocab_size"] == 280
    with pytest.raises(ConfigError, match=r"vocab_size: built from 280, now 300.*--overwrite"):
        prepare_data(load_config(None, settings + ["vocab_size=300"]), on_change="refuse")
    lines = []
    changed = load_config(None, settings + ["vocab_size=300", "corpus_size=25000"])
    again = prepare_data(changed, log=lines.append)
    assert again["tokenizer"].vocab_size == 300
    assert "corpus_size: built from 20000, now 25000" in lines[0] and "vocab_size" in lines[0]
    assert json.loads((tmp_path / "data.json").read_text())["corpus_size"] == 25000
    assert len((tmp_path / "train.txt").read_text()) + len((tmp_path / "val.txt").read_text()) > 20000
