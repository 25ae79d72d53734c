"""Sharded checkpoints of an FSDP run: every rank writes its own shards, nobody gathers the model.

A sharded checkpoint is a folder (``ckpt-sharded/``)::

    .metadata, __0_0.distcp, __1_0.distcp ...   torch.distributed.checkpoint: model and optimizer shards
    rank0.pt, rank1.pt ...                       each rank's random-number generator states
    meta.json                                    format, iteration, config, world size, SHA-256 of every file

It is written into a staging folder beside the target and moved into place in one rename once
every rank has finished, so a crash leaves the previous checkpoint intact; ``meta.json``'s
checksums are verified before anything is loaded. ``full_checkpoint_state`` gathers the same
state into what ``lmcore.train.checkpoint.save_checkpoint`` writes (the usual single file).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.distributed as dist

from lmcore.runfolders import replace_folder, staging_folder
from lmcore.train.checkpoint import CheckpointError, rng_state, set_rng_state
from lmcore.utils import atomic_write

FORMAT = "lmcore-sharded-checkpoint-1"
NAME = "ckpt-sharded"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_sharded(folder: str | os.PathLike, *, model, optimizer, iteration: int, config: dict,
                 batch_generator: torch.Generator | None = None) -> None:
    """Write a sharded checkpoint to ``folder`` (a collective: call on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = os.fspath(folder)
    rank, world = dist.get_rank(), dist.get_world_size()
    staged = [os.fspath(staging_folder(folder)) if rank == 0 else None]
    dist.broadcast_object_list(staged, src=0)
    staged = staged[0]
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=staged)
    torch.save({"rng": rng_state(batch_generator)}, os.path.join(staged, f"rank{rank}.pt"))
    dist.barrier()  # every rank's files are complete
    if rank == 0:
        files = {name: _sha256(os.path.join(staged, name)) for name in sorted(os.listdir(staged))}
        with atomic_write(os.path.join(staged, "meta.json")) as f:
            json.dump({"format": FORMAT, "iteration": int(iteration), "config": config, "world_size": world,
                       "files": files}, f, indent=1)
        replace_folder(staged, folder)
    dist.barrier()  # nobody reads the folder before it is in place


def read_meta(folder: str | os.PathLike) -> dict:
    """``meta.json`` of a sharded checkpoint, after checking every file against its checksum."""
    folder = os.fspath(folder)
    advice = "it cannot be resumed from: resume from an intact copy, or start the run again (--overwrite)"
    path = os.path.join(folder, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"sharded checkpoint {folder} has no readable meta.json "
                              f"({type(err).__name__}); {advice}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not an lmcore sharded checkpoint (expected format {FORMAT!r})")
    for name, expected in meta["files"].items():
        file = os.path.join(folder, name)
        if not os.path.exists(file) or _sha256(file) != expected:
            raise CheckpointError(f"sharded checkpoint {folder} is corrupt: {name} is missing or does not "
                                  f"match its checksum; {advice}")
    return meta


def load_sharded(folder: str | os.PathLike, *, model, optimizer,
                 batch_generator: torch.Generator | None = None) -> dict:
    """Load a sharded checkpoint into a sharded ``model`` and its ``optimizer``; returns its meta.

    The random-number states are this rank's when the world size is the one that wrote it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = os.fspath(folder)
    meta = read_meta(folder)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rank_file = os.path.join(folder, f"rank{dist.get_rank()}.pt")
    if meta["world_size"] == dist.get_world_size() and os.path.exists(rank_file):
        set_rng_state(torch.load(rank_file, weights_only=True)["rng"], batch_generator)
    return meta


def full_checkpoint_state(model, optimizer) -> tuple[dict, dict]:
    """The gathered model state dict and the optimizer state dict as an unsharded optimizer keys it
    (parameters numbered in group order). A collective; rank 0 gets the tensors, on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return {}, {}
    index: dict[str, int] = {}
    groups = []
    for group in optim_state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    state = {index[name]: s for name, s in optim_state["state"].items() if name in index}
    return model_state, {"state": dict(sorted(state.items())), "param_groups": groups}
