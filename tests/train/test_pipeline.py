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
