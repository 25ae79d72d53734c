"""What a training loop calls to train data-parallel with any of the wrappers.

::

    info = init_from_env()                      # torchrun / launch set RANK, WORLD_SIZE, LOCAL_RANK
    model = wrap_model(model.to(info.device), "bucketed", bucket_size_mb=25)
    opt = make_optimizer(model.parameters(), torch.optim.AdamW, sharded=True, lr=3e-4)
    for micro in range(accum):
        with maybe_no_sync(model, micro < accum - 1):
            loss = loss_fn(model(x), y) / accum
            loss.backward()
    sync_gradients(model)                       # no-op for 'none' and 'torch'
    opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from lmcore.distributed.ddp import BucketedDDP, NaiveDDP, OverlappedDDP, _DataParallel, check_same_model
from lmcore.distributed.fsdp import is_sharded, shard_model
from lmcore.distributed.sharded import ShardedOptimizer

DDP_KINDS = ("none", "naive", "overlapped", "bucketed", "torch", "fsdp")


def wrap_model(model: nn.Module, kind: str, bucket_size_mb: float = 25.0, **fsdp_options) -> nn.Module:
    """Wrap ``model`` for data parallelism: ``kind`` is one of none, naive, overlapped, bucketed, torch, fsdp.

    'none' returns the model itself; 'torch' is ``torch.nn.parallel.DistributedDataParallel``
    with ``bucket_cap_mb=bucket_size_mb`` (after the same cross-rank model check as ours); 'fsdp'
    shards the model in place with ``shard_model(model, **fsdp_options)`` (build the optimizer after).
    """
    if kind not in DDP_KINDS:
        raise ValueError(f"ddp kind {kind!r}: expected one of {', '.join(DDP_KINDS)}")
    if kind == "none":
        return model
    if kind == "naive":
        return NaiveDDP(model)
    if kind == "overlapped":
        return OverlappedDDP(model)
    if kind == "bucketed":
        return BucketedDDP(model, bucket_size_mb=bucket_size_mb)
    if not dist.is_initialized():
        raise RuntimeError(f"ddp={kind!r} needs an initialized process group (init_from_env)")
    check_same_model(model)
    if kind == "fsdp":
        return shard_model(model, **fsdp_options)
    device = next(model.parameters()).device
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_size_mb)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any wrapper (for saving, generating, counting parameters)."""
    if isinstance(model, (_DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def sync_gradients(model: nn.Module) -> None:
    """Wait until gradients are averaged over ranks; call after the last backward, before ``step``."""
    if isinstance(model, _DataParallel):
        model.finish_gradient_synchronization()


def maybe_no_sync(model: nn.Module, skip_sync: bool):
    """``model.no_sync()`` when ``skip_sync`` (a micro-batch that is not the last), else a null context.

    A sharded model (FSDP) is told whether this backward reduce-scatters its gradients.
    """
    if is_sharded(model):
        model.set_requires_gradient_sync(not skip_sync)
        return contextlib.nullcontext()
    if skip_sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def make_optimizer(params, optimizer_cls: type = torch.optim.AdamW, sharded: bool = False, **kwargs):
    """``optimizer_cls(params, **kwargs)``, or its ZeRO-1 ``ShardedOptimizer`` when ``sharded``."""
    if sharded:
        if not dist.is_initialized():
            raise RuntimeError("sharded=True needs an initialized process group (init_from_env)")
        return ShardedOptimizer(params, optimizer_cls, **kwargs)
    return optimizer_cls(params, **kwargs)
