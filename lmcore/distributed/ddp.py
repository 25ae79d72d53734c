"""Data-parallel wrappers: every rank holds the whole model, trains on its share of the batch,
and the gradients are averaged over ranks before the optimizer step.

Three ways to average them, from simplest to what ``torch.nn.parallel.DistributedDataParallel`` does:

- ``NaiveDDP``: after backward, all-reduce each parameter's gradient, one blocking call each.
- ``OverlappedDDP``: start an asynchronous all-reduce for a parameter the moment its gradient
  is final (a post-accumulate-grad hook), so communication overlaps the rest of backward.
- ``BucketedDDP``: the same, but gradients are packed into buckets of about ``bucket_size_mb``
  so that a few large messages replace many small ones.

Use (identical for all three)::

    model = BucketedDDP(model, bucket_size_mb=25)
    loss = loss_fn(model(x), y)
    loss.backward()
    model.finish_gradient_synchronization()  # gradients are now averaged over ranks
    optimizer.step()
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.distributed as dist
from torch import nn


class ModelMismatchError(RuntimeError):
    """The ranks were given models with different parameters or buffers."""


def _signature(module: nn.Module) -> list[tuple]:
    """What must agree across ranks: each parameter's and buffer's name, shape, dtype, trainability."""
    sig = [("param", n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in module.named_parameters()]
    sig += [("buffer", n, tuple(b.shape), str(b.dtype), False) for n, b in module.named_buffers()]
    return sig


def check_same_model(module: nn.Module, group=None) -> None:
    """Raise ``ModelMismatchError`` on every rank if the ranks' models differ in structure.

    One all-gather of a 64-bit hash of the signature; only on a mismatch are the full
    signatures exchanged, so the error can name the first differing entry.
    """
    sig = _signature(module)
    digest = int.from_bytes(hashlib.sha256(repr(sig).encode()).digest()[:8], "little", signed=True)
    device = _comm_device(module, group)
    world = dist.get_world_size(group)
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    if all(int(t) == digest for t in every):
        return
    sigs: list = [None] * world
    dist.all_gather_object(sigs, sig, group=group)
    for r, other in enumerate(sigs):
        if other == sig:
            continue
        me = dist.get_rank(group)
        if len(other) != len(sig):
            detail = f"{len(sig)} parameters+buffers on rank {me}, {len(other)} on rank {r}"
        else:
            a, b = next((a, b) for a, b in zip(sig, other) if a != b)
            detail = f"rank {me} has {a}, rank {r} has {b}"
        raise ModelMismatchError(f"the model differs across ranks: {detail}; every rank must build the same model")


def _comm_device(module: nn.Module, group=None) -> torch.device:
    """The device collectives run on: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _DataParallel(nn.Module):
    """Shared part of the wrappers: broadcast at construction, ``no_sync``, ``.module``, ``forward``."""

    def __init__(self, module: nn.Module, process_group=None, check: bool = True):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs an initialized process group: call "
                               "lmcore.distributed.init_process_group / init_from_env, or use launch()")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self._sync = True
        if check:
            check_same_model(module, process_group)
        with torch.no_grad():  # every rank starts from rank 0's weights
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=dist.get_global_rank(process_group, 0) if process_group else 0,
                               group=process_group)
        # Parameters come deduplicated: a tied weight (reached twice) is one parameter here and
        # its two gradient contributions are summed by autograd before its hook runs once.
        self._params = [p for p in module.parameters() if p.requires_grad]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Inside this block backward only accumulates gradients locally (for gradient accumulation);
        the first backward after it averages the accumulated gradients."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def finish_gradient_synchronization(self) -> None:
        """Block until every gradient is averaged over ranks; call after backward, before the step."""
        raise NotImplementedError


class NaiveDDP(_DataParallel):
    """After backward, all-reduce each parameter's gradient one by one (no overlap at all)."""

    def finish_gradient_synchronization(self) -> None:
        if not self._sync:
            return
        for p in self._params:
            if p.grad is None:
                continue
            dist.all_reduce(p.grad, group=self.process_group)  # sum over ranks ...
            p.grad.div_(self.world_size)  # ... then average


class OverlappedDDP(_DataParallel):
    """One asynchronous all-reduce per parameter, started by its post-accumulate-grad hook."""

    def __init__(self, module: nn.Module, process_group=None, check: bool = True):
        super().__init__(module, process_group, check)
        self._handles: list = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._params]

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        p.grad.div_(self.world_size)  # average as a sum of pre-divided gradients
        self._handles.append(dist.all_reduce(p.grad, group=self.process_group, async_op=True))

    def finish_gradient_synchronization(self) -> None:
        for handle in self._handles:
            handle.wait()
        self._handles.clear()


class BucketedDDP(_DataParallel):
    """Gradients grouped into buckets of about ``bucket_size_mb``, in reverse order of use.

    A bucket is flattened into one buffer and all-reduced asynchronously the moment its last
    gradient is ready; ``finish_gradient_synchronization`` waits and copies the averages back.
    """

    def __init__(self, module: nn.Module, bucket_size_mb: float = 25.0, process_group=None, check: bool = True):
        if not (isinstance(bucket_size_mb, (int, float)) and bucket_size_mb > 0):
            raise ValueError(f"bucket_size_mb={bucket_size_mb!r}: expected a positive number of megabytes")
        super().__init__(module, process_group, check)
        self.bucket_size_mb = float(bucket_size_mb)
        self.buckets = self._make_buckets(self._params, int(bucket_size_mb * 2**20))
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._ready = [0] * len(self.buckets)  # gradients ready so far, per bucket
        self._pending: dict[int, tuple] = {}  # bucket index -> (work handle, flat buffer)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._params]

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], cap_bytes: int) -> list[list[nn.Parameter]]:
        """Reverse registration order approximates the order backward produces gradients.
        A bucket holds one dtype and device, and closes once it reaches ``cap_bytes``."""
        buckets: list[list[nn.Parameter]] = []
        size = 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            last = buckets[-1] if buckets else None
            if last is None or size + nbytes > cap_bytes and size > 0 or \
                    (last[0].dtype, last[0].device) != (p.dtype, p.device):
                buckets.append([p])
                size = nbytes
            else:
                last.append(p)
                size += nbytes
        return buckets

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        i = self._bucket_of[id(p)]
        self._ready[i] += 1
        if self._ready[i] == len(self.buckets[i]):
            self._launch(i)

    def _launch(self, i: int) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[i]]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numel,) one message per bucket
        flat.div_(self.world_size)
        self._pending[i] = (dist.all_reduce(flat, group=self.process_group, async_op=True), flat)

    def finish_gradient_synchronization(self) -> None:
        if not self._sync:
            return
        # A bucket whose parameters were not all used this step is sent now (missing gradients as zeros).
        for i in range(len(self.buckets)):
            if i not in self._pending:
                self._launch(i)
        for i, (handle, flat) in sorted(self._pending.items()):
            handle.wait()
            offset = 0
            for p in self.buckets[i]:  # unflatten: each gradient becomes its slice of the average
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)  # a view: no copy back
                offset += n
        self._pending.clear()
        self._ready = [0] * len(self.buckets)
