"""Checkpoints: everything needed to continue a run exactly, written atomically, read safely.

A checkpoint is a ``torch.save`` archive of plain tensors, numbers, strings and dicts, read back
with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lmcore.utils import atomic_write

FORMAT = "lmcore-checkpoint-1"


def rng_state(batch_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The random-number generator states a run depends on."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if batch_generator is not None:
        state["batches"] = batch_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], batch_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if batch_generator is not None and "batches" in state:
        batch_generator.set_state(state["batches"])


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    iteration: int, config: dict, batch_generator: torch.Generator | None = None,
                    extra: dict | None = None, optimizer_state: dict | None = None) -> None:
    """Write a checkpoint to ``path`` atomically: a crash mid-write leaves the previous one intact.

    ``optimizer_state`` replaces ``optimizer.state_dict()`` (a sharded optimizer's merged state).
    """
    payload = {
        "format": FORMAT,
        "iteration": int(iteration),
        "config": config,
        "model": model.state_dict(),
        "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
        "rng": rng_state(batch_generator),
        "extra": extra or {},
    }
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling code; a truncated or foreign file raises ``ValueError``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError depending on the damage
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({os.path.getsize(path)} bytes): "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lmcore checkpoint (expected format {FORMAT!r})")
    return payload


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``["model.d_model: checkpoint 64, now 32", ...]`` for every field that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out
