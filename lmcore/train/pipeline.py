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

``--ddp fsdp`` shards the model (FSDP2) and writes a sharded checkpoint folder ``ckpt-sharded/``
(``--consolidate`` also gathers it into the usual ``ckpt.pt``); ``--resume`` continues from it.

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
import sys
from typing import Any

import yaml

from lmcore.runfolders import FolderInUse, choose_folder
from lmcore.train.config_checks import (ConfigError, SampleConfig, build_section, check_consistency,
                                        check_keys_and_types, check_launch, check_memory, check_token_counts)
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
    """Defaults, then the YAML file, then ``overrides``; unknown keys and wrong types are refused."""
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
    check_keys_and_types(config, DEFAULTS)
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


#: What the data stage records in ``out_dir/data.json``: the settings its files were built from.
DATA_SETTINGS = ("corpus", "corpus_size", "val_fraction", "seed", "vocab_size", "special_tokens")
DATA_FILES = ("train.txt", "val.txt", "tokenizer.json", "train.npy", "val.npy")


def data_settings(config: dict) -> dict:
    """The settings the data stage depends on (a corpus file also by its size in bytes)."""
    settings = {key: config[key] for key in DATA_SETTINGS}
    if os.path.isfile(str(config["corpus"])):
        settings["corpus_file_bytes"] = os.path.getsize(config["corpus"])
    return json.loads(json.dumps(settings))  # tuples as lists, as they are read back


def data_differences(out: str, settings: dict) -> list[str] | None:
    """How ``out``'s data files differ from ``settings`` (``[]`` if they match, None if there are none)."""
    present = [name for name in DATA_FILES if os.path.exists(os.path.join(out, name))]
    if not present:
        return None
    try:
        with open(os.path.join(out, "data.json"), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return [f"{', '.join(present)} carry no record of what they were built from (data.json)"]
    return [f"{key}: built from {recorded.get(key, '<missing>')!r}, now {settings.get(key, '<missing>')!r}"
            for key in sorted(set(recorded) | set(settings)) if recorded.get(key) != settings.get(key)]


def prepare_data(config: dict, progress: bool = False, on_change: str = "rebuild", log=None) -> dict:
    """Write the corpus split, train the tokenizer and tokenize; returns the paths.

    Files that exist are reused when ``out_dir/data.json`` says they were built from the same
    settings (``DATA_SETTINGS``). When the settings changed, ``on_change="rebuild"`` rebuilds them
    (saying so through ``log``) and ``"refuse"`` raises ``ConfigError`` listing the differences.
    """
    from lmcore.data import load_corpus, tokenize_to_npy
    from lmcore.tokenizer import Tokenizer, train_bpe

    out = config["out_dir"]
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in DATA_FILES}
    settings = data_settings(config)
    diffs = data_differences(out, settings)
    unrecorded = bool(diffs) and not os.path.exists(os.path.join(out, "data.json"))
    if unrecorded and on_change == "refuse":  # a run from before data.json existed: trust its files
        (log or print)(f"the data in {out} has no record of its settings; assuming the current ones")
        diffs = None
    if diffs:
        if on_change == "refuse":
            raise ConfigError(f"the data in {out} was built from other settings ({'; '.join(diffs)}); the "
                              "checkpoint was trained on it, so resume with the old settings or start again "
                              "with --overwrite")
        (log or print)(f"data settings changed ({'; '.join(diffs)}): rebuilding corpus, tokenizer and tokens")
        for name in (*DATA_FILES, "data.json"):
            if os.path.exists(os.path.join(out, name)):
                os.unlink(os.path.join(out, name))
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
    if diffs != []:  # record what the files were built from, once they all exist
        with atomic_write(os.path.join(out, "data.json")) as f:
            json.dump(settings, f, indent=1)
    return {**paths, "tokenizer": tokenizer}


# ----------------------------------------------------------------------------------------------
# before any work: the whole config, and the output folder


def check_config(config: dict) -> tuple:
    """Every check that needs no data (one ``ConfigError`` line); returns model, train and sample configs."""
    check_keys_and_types(config, DEFAULTS)
    model_config, train_config = build_section("model/train", lambda: model_and_train_configs(
        config, config["vocab_size"]))
    sample = build_section("sample", lambda: SampleConfig(**config["sample"]))
    check_consistency(config, model_config, train_config, sample)
    check_launch(train_config)
    check_memory(model_config, train_config)
    return model_config, train_config, sample


#: The files of a training run in ``out_dir`` (the data stage's files are not a run: they are reused).
RUN_FILES = ("ckpt.pt", "ckpt-sharded", "metrics.jsonl", "summary.json", "curves.png")


def holds_training_run(folder) -> str | None:
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]
    return ", ".join(found) if found else None


def choose_out_dir(config: dict, policy: str) -> tuple[str, str]:
    """Where this run writes (``lmcore.runfolders`` policies) and the decision in one line; reads only."""
    folder, decision = choose_folder(config["out_dir"], holds_training_run, policy, what="training run")
    if policy == "resume":
        checkpoint = resume_checkpoint(os.fspath(folder), config["train"].get("ddp", "none"))
        if not os.path.exists(checkpoint):
            raise ConfigError(f"--resume: there is no checkpoint {checkpoint} to continue from; run without "
                              "--resume to start training")
    if policy == "resume" and os.path.exists(os.path.join(folder, "data.json")):
        diffs = data_differences(os.fspath(folder), data_settings(config))
        if diffs:
            raise ConfigError(f"--resume: the data in {folder} was built from other settings "
                              f"({'; '.join(diffs)}); resume with those settings, or start again with --overwrite")
    return os.fspath(folder), decision


def resume_checkpoint(out_dir: str, ddp: str) -> str:
    """What ``--resume`` continues from: the sharded folder of an FSDP run, else ``ckpt.pt``."""
    return os.path.join(out_dir, "ckpt-sharded" if ddp == "fsdp" else "ckpt.pt")


def clear_training_run(out_dir: str) -> None:
    """``--overwrite``: remove the earlier run's files (its data stage stays, checked by data.json)."""
    from lmcore.train.checkpoint import remove_partial_writes

    import shutil

    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
    remove_partial_writes(out_dir)


def run(config: dict, progress: bool = True, resume: bool = False, policy: str | None = None,
        log=None) -> dict:
    """The whole pipeline; returns a summary (also written to ``out_dir/summary.json``).

    Everything that can be checked without data is checked first (``check_config``). ``policy``
    says what to do when ``out_dir`` holds an earlier training run (``lmcore.runfolders``):
    ``"refuse"`` (the default), ``"resume"`` (continue from ``out_dir/ckpt.pt``; ``resume=True`` is the
    same), ``"overwrite"``, or ``"next"`` (a numbered sibling folder). Decisions go to ``log``.
    """
    from lmcore.generate import generate_text
    from lmcore.train.batches import load_tokens
    from lmcore.train.functional import unigram_cross_entropy
    from lmcore.train.loop import data_parallel_group, train

    log = log or (lambda line: print(line, file=sys.stderr))
    policy = policy or ("resume" if resume else "refuse")
    _, probe, sample = check_config(config)  # before any work
    out_dir, decision = choose_out_dir(config, policy)  # every rank decides alike, before any rank writes
    config = {**config, "out_dir": out_dir}
    group = data_parallel_group(probe)
    writer = group is None or group.rank == 0
    if writer:
        log(decision)
        if policy == "overwrite":
            clear_training_run(out_dir)
    on_change = "refuse" if policy == "resume" else "rebuild"
    if not writer:
        import torch.distributed as dist

        dist.barrier()  # rank 0 writes the corpus, tokenizer and token files first
        data = prepare_data(config, progress=False, on_change=on_change, log=log)
    else:
        data = prepare_data(config, progress, on_change=on_change, log=log)
        if group is not None:
            import torch.distributed as dist

            dist.barrier()
    tokenizer = data["tokenizer"]
    train_tokens, val_tokens = load_tokens(data["train.npy"]), load_tokens(data["val.npy"])
    model_config, train_config = model_and_train_configs(config, tokenizer.vocab_size)
    check_token_counts(len(train_tokens), len(val_tokens), len(tokenizer.encode(sample.prompt)), model_config,
                       sample)
    train_config = dataclasses.replace(train_config, progress=progress and train_config.progress)
    checkpoint = resume_checkpoint(out_dir, train_config.ddp) if policy == "resume" else None
    result = train(model_config, train_config, train_tokens, val_tokens, resume=checkpoint)
    if not writer:
        return {"rank": group.rank, "iterations": result.iteration}
    samples = [generate_text(result.model, tokenizer, sample.prompt, sample.max_new_tokens,
                             sample.temperature, top_p=sample.top_p, top_k=sample.top_k,
                             seed=config["seed"] + i)
               for i in range(sample.num_samples)]
    summary = {
        "out_dir": out_dir,
        "val_loss": result.final_val_loss,
        "unigram_val_loss": unigram_cross_entropy(train_tokens, val_tokens, tokenizer.vocab_size),
        "iterations": result.iteration,
        "parameters": result.model.num_parameters(),
        "train_tokens": int(len(train_tokens)),
        "samples": [sample.prompt + text for text in samples],
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        "data": data_settings(config),
    }
    with atomic_write(os.path.join(out_dir, "summary.json")) as f:
        json.dump(summary, f, indent=1)
    return summary
