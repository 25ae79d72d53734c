"""Checkpoints: everything needed to continue a run exactly, written atomically, read safely.

A checkpoint is a ``torch.save`` archive of plain tensors, numbers, strings and dicts, read back
with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects. It carries a
SHA-256 checksum of its contents (every tensor's bytes, every value), verified on load: damage
that still unpickles (a few flipped bytes inside a tensor) is refused instead of resumed from.
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Any

import torch

from lmcore.utils import atomic_write

FORMAT = "lmcore-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, damaged, foreign or from another config."""


def checksum(obj: Any) -> str:
    """SHA-256 of a checkpoint's contents: tensors by dtype, shape and bytes; other values by ``repr``."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            digest.update(repr(key).encode())
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(digest, item)
    else:
        digest.update(repr(obj).encode())


def remove_partial_writes(folder: str | os.PathLike, name: str = "ckpt.pt") -> list[str]:
    """Delete the temporary files of checkpoint writes that were killed (``.tmp-*ckpt.pt``)."""
    stale = glob.glob(os.path.join(glob.escape(os.fspath(folder)), f".tmp-*{name}"))
    for path in stale:
        os.unlink(path)
    return stale


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
                    extra: dict | None = None, optimizer_state: dict | None = None,
                    model_state: dict | None = None) -> None:
    """Write a checkpoint to ``path`` atomically: a crash mid-write leaves the previous one intact.

    ``optimizer_state`` replaces ``optimizer.state_dict()`` (a sharded optimizer's merged state),
    ``model_state`` replaces ``model.state_dict()`` (a sharded model's gathered weights).
    """
    payload = {
        "format": FORMAT,
        "iteration": int(iteration),
        "config": config,
        "model": model_state if model_state is not None else model.state_dict(),
        "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
        "rng": rng_state(batch_generator),
        "extra": extra or {},
    }
    payload["checksum"] = checksum(payload)
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling code and verify its checksum; ``CheckpointError`` if unusable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    advice = "it cannot be resumed from: resume from an intact copy, or start the run again (--overwrite)"
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError depending on the damage
        first = str(err).splitlines()[0] if str(err) else ""
        reason = type(err).__name__ + ("" if "weights_only" in str(err) or not first else f": {first}")
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({os.path.getsize(path)} bytes, "
                              f"{reason}); {advice}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lmcore checkpoint (expected format {FORMAT!r})")
    if "checksum" in payload:  # (checkpoints written before checksums existed have none)
        expected = payload.pop("checksum")
        if checksum(payload) != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the checksum "
                                  f"written with it; {advice}")
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
