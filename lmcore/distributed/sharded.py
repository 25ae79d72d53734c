"""A sharded optimizer (ZeRO stage 1): each rank keeps optimizer state for its shard only.

Data parallelism keeps a full copy of the optimizer state on every rank; for AdamW that is two
fp32 tensors per parameter, twice the weights. Here the parameters are split into ``world_size``
shards of about equal size; a rank steps only its shard (with gradients already averaged by a
data-parallel wrapper) and then broadcasts the updated values, so every rank ends the step with
the same full set of weights while holding ~1/world_size of the state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class ShardedOptimizer(torch.optim.Optimizer):
    """Wrap any ``torch.optim.Optimizer`` class: ``ShardedOptimizer(params, torch.optim.AdamW, lr=1e-3)``.

    ``param_groups`` lists every parameter (so learning-rate schedulers work as usual); the
    hyperparameters of each group are copied into the local optimizer before each step.
    ``state_dict()`` holds this rank's shard of the state.
    """

    def __init__(self, params, optimizer_cls: type, process_group=None, **kwargs: Any):
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_cls={optimizer_cls!r}: expected a torch.optim.Optimizer subclass")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedOptimizer needs an initialized process group")
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.optimizer_cls = optimizer_cls
        super().__init__(params, defaults=dict(kwargs))
        self.owner = self._assign_owners()
        local_groups = []
        for group in self.param_groups:
            mine = [p for p in group["params"] if self.owner[p] == self.rank]
            local_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
        has_any = any(g["params"] for g in local_groups)
        self.optimizer = optimizer_cls(local_groups, **kwargs) if has_any else None

    def _assign_owners(self) -> dict:
        """Greedy balance: largest parameters first, each to the rank with the fewest elements so far."""
        params = [p for g in self.param_groups for p in g["params"]]
        load = [0] * self.world_size
        owner = {}
        for p in sorted(params, key=lambda p: -p.numel()):  # stable: ties keep their order on every rank
            r = min(range(self.world_size), key=lambda r: load[r])
            owner[p] = r
            load[r] += p.numel()
        return owner

    def shard(self, rank: int | None = None) -> list[torch.nn.Parameter]:
        """The parameters whose state rank ``rank`` (default: this rank) keeps."""
        rank = self.rank if rank is None else rank
        return [p for g in self.param_groups for p in g["params"] if self.owner[p] == rank]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.optimizer is not None:
            for full, local in zip(self.param_groups, self.optimizer.param_groups):
                for k, v in full.items():  # e.g. a learning-rate scheduler changed 'lr'
                    if k != "params":
                        local[k] = v
            self.optimizer.step()
        self._broadcast_shards()
        return loss

    def _broadcast_shards(self) -> None:
        """Each owner sends its updated shard, flattened into one message per (rank, dtype)."""
        for r in range(self.world_size):
            by_dtype: dict[torch.dtype, list] = {}
            for p in self.shard(r):
                by_dtype.setdefault(p.dtype, []).append(p)
            src = dist.get_global_rank(self.process_group, r) if self.process_group else r
            for dtype in sorted(by_dtype, key=str):
                ps = by_dtype[dtype]
                flat = torch.cat([p.detach().reshape(-1) for p in ps])  # (sum of numel,)
                dist.broadcast(flat, src=src, group=self.process_group)
                if r != self.rank:
                    offset = 0
                    for p in ps:
                        p.copy_(flat[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter, not only this rank's shard."""
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict() if self.optimizer is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state_dict)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank."""
        if self.optimizer is None:
            return 0
        return optimizer_state_bytes(self.optimizer)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in an optimizer's state tensors (e.g. AdamW's two moments)."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.state_bytes()
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v))
