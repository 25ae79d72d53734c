"""Checks of a pipeline config, all made before any work starts; each failure is one ``ConfigError`` line.

Sections are checked generically: a section backed by a dataclass (``model`` -> ``ModelConfig``,
``train`` -> ``TrainConfig``, ``sample`` -> ``SampleConfig``) accepts that dataclass's fields with
the types they are annotated with; any other section of ``DEFAULTS`` accepts the keys and types of
its defaults. A key added to a dataclass or to ``DEFAULTS`` is therefore checked with no change here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work, named with its value and what is allowed."""


@dataclass
class SampleConfig:
    """What the pipeline samples from the trained model (``sample:`` in the config)."""

    prompt: str = "Once upon a time"
    max_new_tokens: int = 80
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = 0.95
    num_samples: int = 2

    def __post_init__(self):
        if not self.prompt:
            raise ValueError(f"prompt={self.prompt!r} must be a non-empty text")
        for name in ("max_new_tokens", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k!r} must be a positive integer or null")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must lie in (0, 1] or be null")


def section_classes() -> dict[str, type]:
    """The dataclass behind each config section that has one."""
    from lmcore.nn import ModelConfig
    from lmcore.train.loop import TrainConfig

    return {"model": ModelConfig, "train": TrainConfig, "sample": SampleConfig}


# ----------------------------------------------------------------------------------------------
# keys and types


_NAMES = {"int": "an integer", "float": "a number", "str": "a text", "bool": "true or false",
          "dict": "a mapping", "list": "a list", "None": "null"}


def _allowed_types(annotation: Any, default: Any) -> set[str]:
    """``{"float"}``, ``{"int", "None"}``, ...: from a dataclass annotation, else from the default's type."""
    if isinstance(annotation, str):
        names = {part.strip().split("[")[0] for part in annotation.split("|")}
    elif annotation is not None:
        names = {getattr(annotation, "__name__", str(annotation))}
    else:
        names = {type(default).__name__} | ({"None"} if default is None else set())
    return {n for n in names if n in _NAMES} or {"any"}


def _coerce(where: str, value: Any, allowed: set[str], default: Any) -> Any:
    """``value`` if its type is allowed (an int or a numeric text becomes a float); else ``ConfigError``."""
    if "any" in allowed:
        return value
    if value is None and "None" in allowed:
        return value
    if isinstance(value, bool):
        if "bool" in allowed:
            return value
    elif isinstance(value, int) and ("int" in allowed or "float" in allowed):
        return value if "int" in allowed else float(value)
    elif isinstance(value, float) and "float" in allowed:
        return value
    elif isinstance(value, str) and "float" in allowed and "str" not in allowed:
        try:
            return float(value)  # YAML 1.1 reads "3e-3" as text
        except ValueError:
            pass
    elif type(value).__name__ in allowed:
        return value
    expected = " or ".join(_NAMES[n] for n in sorted(allowed))
    raise ConfigError(f"{where}={value!r} ({type(value).__name__}) must be {expected} (default {default!r})")


def _unknown(where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{where}{close[0]}'?)" if close else ""
    place = where.rstrip(".") or "the top level"
    return ConfigError(f"unknown config key '{where}{key}'{hint}; {place} takes: {', '.join(sorted(known))}")


def _check_section(where: str, values: dict, schema: dict[str, tuple[Any, Any]]) -> None:
    """Refuse unknown keys, coerce and check the types of known ones (in place)."""
    for key in list(values):
        if key not in schema:
            raise _unknown(where, key, list(schema))
        annotation, default = schema[key]
        values[key] = _coerce(f"{where}{key}", values[key], _allowed_types(annotation, default), default)


def _dataclass_schema(cls: type) -> dict[str, tuple[Any, Any]]:
    schema = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        schema[f.name] = (f.type, default)
    return schema


def check_keys_and_types(config: dict, defaults: dict) -> None:
    """Every key of every section known, every value of an allowed type (numbers coerced in place)."""
    _check_section("", config, {k: (None, v) for k, v in defaults.items()})
    classes = section_classes()
    for name, default in defaults.items():
        if not isinstance(default, dict):
            continue
        values = config.get(name)
        if not isinstance(values, dict):
            raise ConfigError(f"{name}={values!r} must be a mapping of settings, e.g. {name}: {default}")
        if name in classes:
            schema = _dataclass_schema(classes[name])
            if name == "model":
                schema["preset"] = (None, "tiny")
                from lmcore.nn.config import PRESETS

                if values.get("preset") is not None and values["preset"] not in PRESETS:
                    raise ConfigError(f"model.preset={values['preset']!r} is not one of: "
                                      f"{', '.join(PRESETS)}")
        elif name == "optim":  # its other keys are the optimizer's own, checked by lmcore.optim.check_settings
            schema = {"name": (None, default["name"]), **{k: ("any", None) for k in values if k != "name"}}
        else:
            schema = {k: (None, v) for k, v in default.items()}
        _check_section(f"{name}.", values, schema)


# ----------------------------------------------------------------------------------------------
# values that cannot work together


def build_section(name: str, make):
    """``make()`` with a dataclass's own refusal turned into a ``ConfigError`` naming the section."""
    try:
        return make()
    except (ValueError, TypeError) as err:
        text = str(err)
        for prefix in ("ModelConfig.", "TrainConfig."):
            text = text.replace(prefix, "")
        raise ConfigError(f"{name}: {text}") from None


def check_consistency(config: dict, model_config, train_config, sample: SampleConfig) -> None:
    """Values that are each fine but cannot work together."""
    if not 0 < config["val_fraction"] < 1:
        raise ConfigError(f"val_fraction={config['val_fraction']!r} must lie strictly between 0 and 1")
    if train_config.warmup_iters > train_config.max_iters:
        raise ConfigError(f"train.warmup_iters={train_config.warmup_iters} is longer than the whole run "
                          f"(train.max_iters={train_config.max_iters}); expected at most max_iters")
    ctx = model_config.context_length
    val_bytes = int(config["corpus_size"] * config["val_fraction"])
    if val_bytes <= ctx:  # a token is at least one byte
        raise ConfigError(f"the validation split (val_fraction={config['val_fraction']} of corpus_size="
                          f"{config['corpus_size']}, about {val_bytes} bytes) is shorter than one window of "
                          f"model.context_length={ctx} tokens; raise corpus_size or val_fraction")
    if sample.max_new_tokens >= ctx:
        raise ConfigError(f"sample.max_new_tokens={sample.max_new_tokens} leaves no room for the prompt in "
                          f"model.context_length={ctx}; expected at most {ctx - 1}")


def check_token_counts(train_tokens: int, val_tokens: int, prompt_tokens: int, model_config, sample) -> None:
    """After the data stage, before training: both splits hold a window, the prompt fits with its samples."""
    ctx = model_config.context_length
    for name, n in (("training", train_tokens), ("validation", val_tokens)):
        if n <= ctx:
            raise ConfigError(f"the {name} split has {n} tokens, not more than model.context_length={ctx}; "
                              f"raise corpus_size{' or val_fraction' if name == 'validation' else ''}")
    if prompt_tokens + sample.max_new_tokens > ctx:
        raise ConfigError(f"sample.prompt is {prompt_tokens} tokens; with sample.max_new_tokens="
                          f"{sample.max_new_tokens} that exceeds model.context_length={ctx}")


def check_launch(train_config) -> None:
    """Several processes (``torchrun``) need a data-parallel mode, or they would race on one out_dir."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and train_config.ddp == "none" and not train_config.sharded_optimizer:
        raise ConfigError(f"started as {world} processes (WORLD_SIZE={world}) but train.ddp='none': every "
                          "process would train the same model into the same out_dir; pass --ddp naive, "
                          "overlapped, bucketed, torch or fsdp, or start a single process")


def device_memory(device) -> tuple[int, str]:
    """Bytes of memory of ``device`` and its name (a GPU's own memory, else the machine's)."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(props.total_memory), props.name
    import psutil

    return int(psutil.virtual_memory().total), "this machine's memory"


def check_memory(model_config, train_config) -> None:
    """Refuse a batch whose training step clearly cannot fit on one rank
    (``lmcore.accounting.sharded_memory_estimate``: FSDP and ZeRO-1 split the model states)."""
    from lmcore.accounting import sharded_memory_estimate
    from lmcore.utils import get_device

    device = get_device(train_config.device)
    bf16 = train_config.dtype == "bfloat16" or (train_config.dtype == "auto" and device.type == "cuda")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    scheme = "fsdp" if train_config.ddp == "fsdp" else "zero1" if train_config.sharded_optimizer else "ddp"
    need = sharded_memory_estimate(model_config, train_config.batch_size, world, scheme,
                                   dtype="bfloat16" if bf16 else "float32",
                                   checkpointing=train_config.activation_checkpointing)["total"]
    have, name = device_memory(device)
    if need > have:
        raise ConfigError(f"train.batch_size={train_config.batch_size}: one training step needs about "
                          f"{need / 2**30:.1f} GiB (lmcore.accounting.memory_estimate), more than the "
                          f"{have / 2**30:.1f} GiB of {name}; lower train.batch_size (raise train.grad_accum "
                          "to keep the tokens per step)")
