"""Fully sharded data parallelism (FSDP2): parameters, gradients and optimizer state split over ranks.

DDP keeps a whole model on every rank; ZeRO-1 (``ShardedOptimizer``) splits only the optimizer
state. FSDP splits everything: each parameter is stored as ``torch.distributed.tensor.DTensor``
sharded on its first dimension, so a rank holds 1/N of the weights, of their gradients and of the
optimizer state. A Transformer block's weights exist whole only while that block runs:

- forward: all-gather the block's shards (N-1)/N of its bytes in, compute, free the gathered copy;
- backward: all-gather again, compute the gradients, reduce-scatter them so each rank keeps the
  sum over ranks of its own shard, free the gathered copy.

``shard_model`` wraps each block of a ``TransformerLM`` as one FSDP unit (one all-gather per block)
and the root (embedding, final norm, head) as the last. The optimizer is then built on
``model.parameters()`` (DTensors) as usual and steps only the local shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

MIXED_PRECISION = ("auto", "bf16", "fp32")


def _policy(mixed_precision, device: torch.device):
    """``MixedPrecisionPolicy``: bf16 parameters with fp32 gradient reduction, or None (fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision={mixed_precision!r}: expected one of {', '.join(MIXED_PRECISION)} "
                         "or a torch.distributed.fsdp.MixedPrecisionPolicy")
    if mixed_precision == "fp32" or (mixed_precision == "auto" and device.type != "cuda"):
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, mesh=None, mixed_precision="auto", cpu_offload: bool = False,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 (``fully_shard``) to every block in ``model.blocks``, then to ``model`` itself.

    mesh: a 1-D ``DeviceMesh`` over the data-parallel ranks (default: every rank of the process
        group, on the model's device type).
    mixed_precision: 'auto' (bf16 parameters, fp32 gradient reduction on CUDA; fp32 elsewhere),
        'bf16', 'fp32', or a ``MixedPrecisionPolicy``.
    cpu_offload: keep the shards (and the optimizer step) in CPU memory; CUDA models only.
    reshard_after_forward: free gathered weights after forward (saves memory, gathers again in backward).

    Returns ``model``, now an ``FSDPModule`` (its parameters are DTensors; ``unwrap`` returns it as is).
    Every rank must start from the same weights: rank 0's are broadcast before sharding.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError(f"{type(model).__name__} is already sharded; call shard_model once")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialized process group: call "
                           "lmcore.distributed.init_from_env, or use launch()")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no non-empty .blocks (an nn.ModuleList of Transformer "
                         "blocks); shard_model wraps one FSDP unit per block")
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters to shard")
    device = params[0].device
    world = dist.get_world_size()
    if mesh is None:
        mesh = init_device_mesh(device.type, (world,))
    if mesh.ndim != 1 or mesh.size() != world:
        raise ValueError(f"mesh of shape {tuple(mesh.shape)}: expected a 1-D mesh over all {world} ranks")
    if cpu_offload and device.type != "cuda":
        raise ValueError(f"cpu_offload=True with parameters on {device}: offloading moves CUDA shards to the "
                         "CPU; expected a model on a CUDA device (or cpu_offload=False)")
    with torch.no_grad():  # every rank shards rank 0's weights
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    policy = _policy(mixed_precision, device)
    if policy is not None:
        kwargs["mp_policy"] = policy
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)  # the rest: embedding (tied to the head), final norm, head
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model that ``shard_model`` (or ``fully_shard``) wrapped."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into a plain tensor (a collective); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_sharded_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of a sharded model (the norm is summed over every rank's shard)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return full_tensor(norm)
