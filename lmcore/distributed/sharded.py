"""A sharded optimizer (ZeRO stage 1): each rank keeps optimizer state for its shard only.

Data parallelism keeps a full copy of the optimizer state on every rank; for AdamW that is two
fp32 tensors per parameter, twice the weights. Here the parameters are split into ``world_size``
shards of about equal size; a rank steps only its shard (with gradients already averaged by a
data-parallel wrapper) and then broadcasts the updated values, so every rank ends the step with
the same full set of weights while holding ~1/world_size of the state.

The broadcasts of all shards are done as one all-gather: at construction the parameters are
moved into one flat buffer per dtype, laid out shard after shard (each padded to the same
length), so that after the step every rank's shard is already in place to be gathered.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lmcore.utils import closure_loss


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
        if self.optimizer is not None:  # show the optimizer's own defaults (e.g. betas) in param_groups
            for full, local in zip(self.param_groups, self.optimizer.param_groups):
                for k, v in local.items():
                    full.setdefault(k, v)
        self._flat = self._flatten()

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
        loss = closure_loss(closure)
        if self.optimizer is not None:
            for full, local in zip(self.param_groups, self.optimizer.param_groups):
                for k, v in full.items():  # e.g. a learning-rate scheduler changed 'lr'
                    if k != "params":
                        local[k] = v
            self.optimizer.step()
        self._broadcast_shards()
        return loss

    @torch.no_grad()
    def _flatten(self) -> list[tuple[torch.Tensor, int]]:
        """Move the parameters into flat buffers, one per (dtype, device): rank 0's shard, then rank 1's...

        Each parameter becomes a view into its buffer; returns (buffer, padded shard length) pairs.
        """
        keys: dict[tuple, list] = {}
        for g in self.param_groups:
            for p in g["params"]:
                keys.setdefault((p.dtype, p.device), []).append(p)
        flats = []
        for (dtype, device), params in keys.items():
            per_rank = [[p for p in params if self.owner[p] == r] for r in range(self.world_size)]
            length = max(sum(p.numel() for p in ps) for ps in per_rank)  # every shard padded to this
            flat = torch.zeros(self.world_size * length, dtype=dtype, device=device)  # (world * length,)
            for r, ps in enumerate(per_rank):
                offset = r * length
                for p in ps:
                    view = flat[offset : offset + p.numel()]
                    view.copy_(p.detach().reshape(-1))
                    p.data = view.view_as(p)  # the parameter now lives in the buffer
                    offset += p.numel()
            flats.append((flat, length))
        return flats

    def _broadcast_shards(self) -> None:
        """Send every rank's updated shard to every other rank: one all-gather per flat buffer."""
        for flat, length in self._flat:
            mine = flat[self.rank * length : (self.rank + 1) * length]  # this rank's shard, in place
            if dist.get_backend(self.process_group) == "nccl":
                dist.all_gather_into_tensor(flat, mine, group=self.process_group)
            else:  # gloo: gather into views of the buffer
                chunks = list(flat.chunk(self.world_size))
                dist.all_gather(chunks, mine.clone(), group=self.process_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter, not only this rank's shard."""
        super().zero_grad(set_to_none=set_to_none)

    def _all_params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """This rank's shard of the state, keyed like ``optimizer_cls``'s own state dict over *all*
        parameters (so shards of different ranks merge into one; see ``full_state_dict``)."""
        index = {id(p): i for i, p in enumerate(self._all_params())}
        state = {}
        if self.optimizer is not None:
            local = self.optimizer.state_dict()
            local_params = [p for g in self.optimizer.param_groups for p in g["params"]]
            state = {index[id(local_params[i])]: s for i, s in local["state"].items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def full_state_dict(self) -> dict:
        """Every rank's shard merged: the state dict an unsharded ``optimizer_cls`` would have.

        A collective: call it on every rank (e.g. before rank 0 writes a checkpoint).
        """
        mine = self.state_dict()
        cpu_state = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in mine["state"].items()}
        every: list = [None] * self.world_size
        dist.all_gather_object(every, cpu_state, group=self.process_group)
        merged = {}
        for part in every:
            merged.update(part)
        return {"state": dict(sorted(merged.items())), "param_groups": mine["param_groups"]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full (``full_state_dict``, or an unsharded optimizer's) or this rank's sharded state dict."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("optimizer state dict does not match: expected "
                             f"{[len(g['params']) for g in self.param_groups]} parameters per group, "
                             f"got {[len(g['params']) for g in groups]}")
        for full, saved in zip(self.param_groups, groups):
            full.update({k: v for k, v in saved.items() if k != "params"})
        if self.optimizer is None:
            return
        all_params = self._all_params()
        position = {id(p): i for i, p in enumerate(all_params)}
        saved_index = [i for g in groups for i in g["params"]]  # position -> key in the saved state
        local_state, local_groups, k = {}, [], 0
        for full, local in zip(self.param_groups, self.optimizer.param_groups):
            ids = []
            for p in local["params"]:
                key = saved_index[position[id(p)]]
                if key in state_dict["state"]:
                    local_state[k] = state_dict["state"][key]
                ids.append(k)
                k += 1
            local_groups.append({**{n: v for n, v in local.items() if n != "params"},
                                 **{n: v for n, v in full.items() if n != "params"}, "params": ids})
        self.optimizer.load_state_dict({"state": local_state, "param_groups": local_groups})

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
