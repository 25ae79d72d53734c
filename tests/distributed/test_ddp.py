"""Data-parallel wrappers on CPU with gloo and 2 processes: each rank trains on half the batch and,
after every step, its parameters must equal a single-process model trained on the whole batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmcore.distributed import (
    BucketedDDP,
    ModelMismatchError,
    NaiveDDP,
    OverlappedDDP,
    RankFailedError,
    ShardedOptimizer,
    launch,
    sync_gradients,
    wrap_model,
)

pytestmark = pytest.mark.timeout(120)

VOCAB, DIM, BATCH, SEQ = 11, 8, 4, 5


class TiedToy(nn.Module):
    """Embedding tied to the output head (one parameter reached twice), a frozen scale, a buffer."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, hidden), nn.GELU(), nn.Linear(hidden, DIM))
        self.scale = nn.Parameter(torch.full((DIM,), 0.5), requires_grad=False)  # frozen
        self.register_buffer("shift", torch.linspace(-0.1, 0.1, DIM))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, x):  # x: (B, T)
        h = self.embed(x)  # (B, T, D)
        h = h + self.mlp(h) * self.scale + self.shift  # (B, T, D)
        return self.head(h)  # (B, T, V)


def loss_of(model, x, y):
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g))
            for _ in range(steps)]


def make_wrapped(kind, bucket_mb, model):
    if kind == "naive":
        return NaiveDDP(model)
    if kind == "overlapped":
        return OverlappedDDP(model)
    if kind == "bucketed":
        return BucketedDDP(model, bucket_size_mb=bucket_mb)
    return wrap_model(model, "torch", bucket_size_mb=bucket_mb)


def _device(rank):
    import torch.distributed as dist

    return torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def train_and_compare(rank, world, kind, bucket_mb, steps=3, accumulate=False):
    """Train DDP on this rank's half and a reference on the whole batch; return the worst gap."""
    dev = _device(rank)
    torch.manual_seed(1234 + rank)  # different init per rank: the wrapper must broadcast rank 0's
    model = TiedToy().to(dev)
    torch.manual_seed(1234)
    reference = TiedToy().to(dev)
    ddp = make_wrapped(kind, bucket_mb, model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    gaps = []
    half = BATCH // world
    for x, y in batches(steps):
        x, y = x.to(dev), y.to(dev)
        mine = slice(rank * half, (rank + 1) * half)
        if accumulate:  # two micro-batches, the first without synchronizing
            quarter = half // 2
            parts = [slice(mine.start, mine.start + quarter), slice(mine.start + quarter, mine.stop)]
            with ddp.no_sync():
                (loss_of(ddp, x[parts[0]], y[parts[0]]) / 2).backward()
            (loss_of(ddp, x[parts[1]], y[parts[1]]) / 2).backward()
        else:
            loss_of(ddp, x[mine], y[mine]).backward()
        sync_gradients(ddp)
        opt.step()
        opt.zero_grad()
        loss_of(reference, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        gaps.append(max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters())))
    buckets = [len(b) for b in ddp.buckets] if isinstance(ddp, BucketedDDP) else None
    return {"gaps": gaps, "buckets": buckets, "frozen_grad": model.scale.grad,
            "scale": model.scale.detach().cpu(), "tied": model.head.weight is model.embed.weight,
            "first": next(model.parameters()).detach().cpu()}


CASES = [("naive", None), ("overlapped", None), ("bucketed", 1e-6), ("bucketed", 0.001),
         ("bucketed", 1000.0), ("torch", 25.0)]


@pytest.mark.parametrize("kind,bucket_mb", CASES, ids=[f"{k}-{b}" for k, b in CASES])
def test_matches_single_process(kind, bucket_mb):
    results = launch(train_and_compare, 2, kind, bucket_mb, timeout=30)
    for r in results:
        assert len(r["gaps"]) == 3
        assert max(r["gaps"]) < 1e-5, r["gaps"]
        assert r["frozen_grad"] is None
        torch.testing.assert_close(r["scale"], torch.full((DIM,), 0.5))
        assert r["tied"]
    torch.testing.assert_close(results[0]["first"], results[1]["first"], rtol=0, atol=0)
    if kind == "bucketed":
        sizes = results[0]["buckets"]
        n_trainable = 5  # tied embedding/head weight + two Linear layers' weights and biases
        assert sum(sizes) == n_trainable
        if bucket_mb == 1e-6:
            assert sizes == [1] * n_trainable  # one parameter per bucket
        elif bucket_mb == 1000.0:
            assert sizes == [n_trainable]  # everything in one bucket
        else:
            assert 1 < len(sizes) < n_trainable


@pytest.mark.parametrize("kind", ["naive", "overlapped", "bucketed"])
def test_no_sync_gradient_accumulation(kind):
    results = launch(train_and_compare, 2, kind, 0.001, 2, True, timeout=30)
    for r in results:
        assert max(r["gaps"]) < 1e-5, r["gaps"]


def sharded_vs_adamw(rank, world, steps=10):
    torch.manual_seed(7)
    model = TiedToy()
    torch.manual_seed(7)
    reference = TiedToy()
    ddp = NaiveDDP(model)
    opt = ShardedOptimizer(ddp.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    half = BATCH // world
    for x, y in batches(steps, seed=3):
        mine = slice(rank * half, (rank + 1) * half)
        loss_of(ddp, x[mine], y[mine]).backward()
        sync_gradients(ddp)
        opt.step()
        opt.zero_grad()
        loss_of(reference, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    shard = {id(p) for p in opt.shard()}
    return {"params": [p.detach().clone() for p in model.parameters()],
            "ref": [p.detach().clone() for p in reference.parameters()],
            "state_bytes": opt.state_bytes(),
            "full_state_bytes": sum(v.numel() * v.element_size() for s in ref_opt.state.values()
                                    for v in s.values() if torch.is_tensor(v) and v.dim() > 0),
            "shard_numel": sum(p.numel() for p in model.parameters() if id(p) in shard),
            "grads_cleared": all(p.grad is None for p in model.parameters())}


@pytest.mark.gpu
@pytest.mark.parametrize("kind,bucket_mb", CASES, ids=[f"{k}-{b}" for k, b in CASES])
def test_matches_single_process_on_gpus_with_nccl(kind, bucket_mb):
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs for NCCL")
    for r in launch(train_and_compare, 2, kind, bucket_mb, backend="nccl", timeout=60):
        assert max(r["gaps"]) < 1e-4, r["gaps"]  # GPU kernels may sum in another order for half a batch
        assert r["frozen_grad"] is None and r["tied"]


def test_sharded_optimizer_equals_adamw_after_10_steps():
    results = launch(sharded_vs_adamw, 2, timeout=30)
    for r in results:
        for p, q in zip(r["params"], r["ref"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
        assert r["grads_cleared"]
        assert 0 < r["state_bytes"] < r["full_state_bytes"]
    total = sum(p.numel() for p in results[0]["params"])
    assert results[0]["shard_numel"] + results[1]["shard_numel"] == total  # the shards partition the model
    for a, b in zip(results[0]["params"], results[1]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def build_per_rank(rank, world):
    model = TiedToy(hidden=16 if rank == 0 else 24)  # rank 1 builds a different model
    OverlappedDDP(model)
    return "constructed"


def test_models_that_differ_across_ranks_are_detected():
    with pytest.raises(RankFailedError, match="differs across ranks") as info:
        launch(build_per_rank, 2, timeout=30)
    assert all(ModelMismatchError.__name__ in text for text in info.value.failures.values())


def raise_on_rank_1(rank, world):
    model = BucketedDDP(TiedToy(), bucket_size_mb=1e-6)
    x, y = batches(1)[0]
    if rank == 1:
        raise ValueError("rank 1 read a corrupt batch")
    loss_of(model, x, y).backward()
    model.finish_gradient_synchronization()
    return "finished"


def exit_on_rank_1(rank, world):
    import os

    import torch.distributed as dist

    if rank == 1:
        os._exit(7)
    dist.all_reduce(torch.ones(3))
    return "finished"


def sleep_on_rank_1(rank, world):
    import time

    import torch.distributed as dist

    if rank == 1:
        time.sleep(600)  # never joins the collective
    dist.all_reduce(torch.ones(3))
    return "finished"


def test_a_raising_rank_stops_the_other_with_a_clear_error():
    with pytest.raises(RankFailedError) as info:
        launch(raise_on_rank_1, 2, timeout=10, grace=5)
    message = str(info.value)
    assert message.startswith("rank 1 of 2 failed: ValueError: rank 1 read a corrupt batch")
    assert set(info.value.failures) == {0, 1}  # rank 0 did not finish: its collective failed


def test_a_dying_rank_stops_the_other():
    with pytest.raises(RankFailedError, match=r"rank 1 of 2 failed: died without a result \(exit code 7\)") as info:
        launch(exit_on_rank_1, 2, timeout=10, grace=5)
    assert 0 in info.value.failures


def test_a_stalled_rank_makes_the_collective_time_out():
    with pytest.raises(RankFailedError) as info:
        launch(sleep_on_rank_1, 2, timeout=2, grace=2)
    failures = info.value.failures
    assert str(info.value).startswith("rank 1 of 2 stalled"), str(info.value)  # not rank 0, which waited
    assert "terminated" in failures[1]  # the sleeping rank was stopped, not waited for
    assert "timed out" in failures[0].lower() or "timeout" in failures[0].lower()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="world_size=0"):
        launch(train_and_compare, 0)
    with pytest.raises(RuntimeError, match="initialized process group"):
        NaiveDDP(TiedToy())
    with pytest.raises(ValueError, match="ddp kind 'fast'"):
        wrap_model(TiedToy(), "fast")


def sharded_checkpoint_and_groups(rank, world, optimizer_cls, steps=4):
    """Two parameter groups, a learning-rate change, and a save/restore of the merged state."""
    torch.manual_seed(11)
    model = TiedToy()
    torch.manual_seed(11)
    reference = TiedToy()

    def groups(m):
        return [{"params": [p for p in m.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                {"params": [p for p in m.parameters() if p.ndim < 2], "weight_decay": 0.0}]

    ddp = BucketedDDP(model, bucket_size_mb=0.001)
    opt = ShardedOptimizer(groups(model), optimizer_cls, lr=1e-2)
    ref_opt = optimizer_cls(groups(reference), lr=1e-2)
    half = BATCH // world
    for i, (x, y) in enumerate(batches(2 * steps, seed=5)):
        if i == steps:  # restart from the merged state, as a resumed run would
            saved = opt.full_state_dict()
            opt = ShardedOptimizer(groups(model), optimizer_cls, lr=1.0)
            opt.load_state_dict(saved)
        for o in (opt, ref_opt):  # a schedule changing the learning rate
            for g in o.param_groups:
                g["lr"] = 1e-2 / (1 + i)
        loss_of(ddp, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]).backward()
        sync_gradients(ddp)
        opt.step()
        opt.zero_grad()
        loss_of(reference, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    full, ref_state = opt.full_state_dict(), ref_opt.state_dict()
    return {"gap": max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())),
            "same_keys": sorted(full["state"]) == sorted(ref_state["state"]),
            "state_gap": max((full["state"][i]["exp_avg"] - ref_state["state"][i]["exp_avg"]).abs().max().item()
                             for i in ref_state["state"])}


def _lmcore_adamw():
    return pytest.importorskip("lmcore.train.optim").AdamW


@pytest.mark.parametrize("which", ["torch", "lmcore"])
def test_sharded_optimizer_groups_schedules_and_checkpoints(which):
    optimizer_cls = torch.optim.AdamW if which == "torch" else _lmcore_adamw()
    for r in launch(sharded_checkpoint_and_groups, 2, optimizer_cls, timeout=30):
        assert r["gap"] < 1e-5
        assert r["same_keys"]
        assert r["state_gap"] < 1e-6
