"""The end-to-end run from one config file: corpus -> tokenizer -> token files -> training -> samples.

A config is a YAML mapping (see ``lmcore/train/configs/stories-tiny.yaml``)::

    out_dir: runs/stories-tiny
    corpus: builtin            # lmcore.data.load_corpus name or a text file
    corpus_size: 1000000       # bytes of text
    val_fraction: 0.05
    vocab_size: 1024
    model: {preset: tiny, context_length: 128}
    train: {max_iters: 300, batch_size: 16}
    optim: {name: soap, precondition_frequency: 10}   # lmcore.optim; default adamw
    sample: {prompt: "Once upon a time", max_new_tokens: 80, temperature: 0.8, top_p: 0.95}

``--set train.lr=1e-3`` (dotted keys, YAML values) overrides any entry.

Data-parallel: start one process per GPU (or CPU process) with ``torchrun`` and choose a wrapper::

    torchrun --nproc-per-node 2 -m lmcore.train --config stories-tiny --ddp bucketed --sharded-optimizer

Several nodes join through a rendezvous endpoint, the same command on each node::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        --rdzv-id run1 -m lmcore.train --config ... --ddp torch

Rank 0 prepares the data, logs, samples and writes checkpoints; every rank trains on its own batches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import yaml

from lmcore.utils import atomic_write

END_OF_TEXT = "<|endoftext|>"

DEFAULTS: dict[str, Any] = {
    "out_dir": "runs/default",
    "corpus": "builtin",
    "corpus_size": 1_000_000,
    "val_fraction": 0.05,
    "vocab_size": 1024,
    "special_tokens": [END_OF_TEXT],
    "seed": 0,
    "model": {"preset": "tiny"},
    "train": {},
    "optim": {"name": "adamw"},  # name: a name from lmcore.optim.OPTIMIZERS; other keys: its hyperparameters
    "sample": {"prompt": "Once upon a time", "max_new_tokens": 80, "temperature": 0.8, "top_p": 0.95,
               "num_samples": 2},
}

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_override(config: dict, assignment: str) -> dict:
    """Apply ``"a.b=value"`` (value parsed as YAML) to a nested config dict, in place."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected key=value, e.g. train.lr=1e-3")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"--set {assignment!r}: empty part in key {key!r}")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment!r}: {part!r} is not a section")
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string
    node[parts[-1]] = value
    return config


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> dict:
    """Defaults, then the YAML file, then ``overrides``; unknown top-level keys are refused."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = os.fspath(path)
        if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, path + ".yaml")):
            path = os.path.join(CONFIG_DIR, path + ".yaml")  # a bundled preset by name
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a YAML mapping at the top level")
        config = _merge(config, loaded)
    for assignment in overrides:
        apply_override(config, assignment)
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; expected some of {sorted(DEFAULTS)}")
    return config


def model_and_train_configs(config: dict, vocab_size: int | None = None):
    """The ``ModelConfig`` and ``TrainConfig`` a pipeline config describes."""
    from lmcore.nn import ModelConfig
    from lmcore.train.loop import TrainConfig

    model = dict(config["model"])
    preset = model.pop("preset", None)
    if vocab_size is not None:
        model["vocab_size"] = vocab_size
    model_config = ModelConfig.preset(preset, **model) if preset else ModelConfig(**model)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(config["train"]) - train_fields)
    if unknown:
        raise ValueError(f"unknown train setting(s) {unknown}; expected some of {sorted(train_fields)}")
    optim = dict(config.get("optim") or {})
    train = {"out_dir": config["out_dir"], "seed": config["seed"], "optimizer": optim.pop("name", "adamw"),
             "optimizer_options": optim, **config["train"]}
    return model_config, TrainConfig(**train)


def prepare_data(config: dict, progress: bool = False) -> dict:
    """Write the corpus split, train the tokenizer and tokenize; returns the paths (skips existing files)."""
    from lmcore.data import load_corpus, tokenize_to_npy
    from lmcore.tokenizer import Tokenizer, train_bpe

    out = config["out_dir"]
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in ("train.txt", "val.txt", "tokenizer.json",
                                                        "train.npy", "val.npy")}
    if not (os.path.exists(paths["train.txt"]) and os.path.exists(paths["val.txt"])):
        text = load_corpus(config["corpus"], size=config["corpus_size"], seed=config["seed"])
        if not 0 < config["val_fraction"] < 1:
            raise ValueError(f"val_fraction={config['val_fraction']} must lie strictly between 0 and 1")
        cut = int(len(text) * (1 - config["val_fraction"]))
        boundary = text.rfind(END_OF_TEXT, 0, cut)
        cut = boundary + len(END_OF_TEXT) if boundary > 0 else cut
        for name, part in (("train.txt", text[:cut]), ("val.txt", text[cut:])):
            with atomic_write(paths[name]) as f:
                f.write(part)
    if os.path.exists(paths["tokenizer.json"]):
        tokenizer = Tokenizer.load(paths["tokenizer.json"])
    else:
        tokenizer = train_bpe(paths["train.txt"], config["vocab_size"], special_tokens=config["special_tokens"])
        tokenizer.save(paths["tokenizer.json"])
    for split in ("train", "val"):
        if not os.path.exists(paths[f"{split}.npy"]):
            tokenize_to_npy(paths[f"{split}.txt"], tokenizer, paths[f"{split}.npy"], progress=progress)
    return {**paths, "tokenizer": tokenizer}


def run(config: dict, progress: bool = True, resume: bool = False) -> dict:
    """The whole pipeline; returns a summary (also written to ``out_dir/summary.json``).

    ``resume`` continues training from ``out_dir/ckpt.pt``.
    """
    from lmcore.generate import generate_text
    from lmcore.train.batches import load_tokens
    from lmcore.train.functional import unigram_cross_entropy
    from lmcore.train.loop import train

    from lmcore.train.loop import data_parallel_group

    _, probe = model_and_train_configs(config)  # validates the settings before any work
    group = data_parallel_group(probe)
    if group is not None and group.rank != 0:
        import torch.distributed as dist

        dist.barrier()  # rank 0 writes the corpus, tokenizer and token files first
        data = prepare_data(config, progress=False)
    else:
        data = prepare_data(config, progress)
        if group is not None:
            import torch.distributed as dist

            dist.barrier()
    tokenizer = data["tokenizer"]
    train_tokens, val_tokens = load_tokens(data["train.npy"]), load_tokens(data["val.npy"])
    model_config, train_config = model_and_train_configs(config, tokenizer.vocab_size)
    train_config = dataclasses.replace(train_config, progress=progress and train_config.progress)
    checkpoint = os.path.join(config["out_dir"], "ckpt.pt") if resume else None
    result = train(model_config, train_config, train_tokens, val_tokens, resume=checkpoint)
    if group is not None and group.rank != 0:
        return {"rank": group.rank, "iterations": result.iteration}
    s = config["sample"]
    samples = [generate_text(result.model, tokenizer, s["prompt"], s["max_new_tokens"], s["temperature"],
                             top_p=s.get("top_p"), top_k=s.get("top_k"), seed=config["seed"] + i)
               for i in range(s.get("num_samples", 1))]
    summary = {
        "val_loss": result.final_val_loss,
        "unigram_val_loss": unigram_cross_entropy(train_tokens, val_tokens, tokenizer.vocab_size),
        "iterations": result.iteration,
        "parameters": result.model.num_parameters(),
        "train_tokens": int(len(train_tokens)),
        "samples": [s["prompt"] + text for text in samples],
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
    }
    with atomic_write(os.path.join(config["out_dir"], "summary.json")) as f:
        json.dump(summary, f, indent=1)
    return summary
