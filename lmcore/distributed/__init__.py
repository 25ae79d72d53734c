"""Data-parallel training (chapter 6): three DDP wrappers, a sharded optimizer, and a launcher.

- ``NaiveDDP``, ``OverlappedDDP``, ``BucketedDDP``: average gradients over ranks, each a step
  closer to how ``torch.nn.parallel.DistributedDataParallel`` works (``lmcore.distributed.ddp``).
- ``shard_model``: FSDP2, parameters, gradients and optimizer state sharded per Transformer block
  (``lmcore.distributed.fsdp``).
- ``ShardedOptimizer``: ZeRO stage 1, optimizer state split over ranks (``lmcore.distributed.sharded``).
- ``launch``: run a function on N processes (gloo on CPU, NCCL on GPUs) from a script or a
  notebook, with collective timeouts so a failing rank never hangs the others
  (``lmcore.distributed.launch``); ``init_from_env`` for jobs started by ``torchrun``.
- ``wrap_model``, ``make_optimizer``, ``sync_gradients``: what a training loop calls (``lmcore.distributed.wrap``).
"""

from lmcore.distributed.ddp import BucketedDDP, ModelMismatchError, NaiveDDP, OverlappedDDP, check_same_model
from lmcore.distributed.fsdp import is_sharded, shard_model
from lmcore.distributed.launch import (
    DistInfo,
    RankFailedError,
    default_backend,
    free_port,
    init_from_env,
    init_process_group,
    launch,
)
from lmcore.distributed.sharded import ShardedOptimizer, optimizer_state_bytes
from lmcore.distributed.wrap import DDP_KINDS, make_optimizer, maybe_no_sync, sync_gradients, unwrap, wrap_model

__all__ = [
    "BucketedDDP", "DDP_KINDS", "DistInfo", "ModelMismatchError", "NaiveDDP", "OverlappedDDP",
    "RankFailedError", "ShardedOptimizer", "check_same_model", "default_backend", "free_port",
    "init_from_env", "init_process_group", "is_sharded", "launch", "make_optimizer", "maybe_no_sync",
    "optimizer_state_bytes", "shard_model", "sync_gradients", "unwrap", "wrap_model",
]
