"""The optimizers inside the training loop, the pipeline's ``optim`` settings, and data parallelism
(BucketedDDP with ShardedOptimizer, ZeRO-1) on CPU with gloo and 2 processes."""

from __future__ import annotations

import pytest
import torch

from lmcore.distributed import BucketedDDP, ShardedOptimizer, launch, sync_gradients
from lmcore.optim import optimizer_spec
from lmcore.train import TrainConfig, cross_entropy, train
from lmcore.train.pipeline import load_config, model_and_train_configs
from tests.optim.conftest import HP, TINY, tiny_batch, tiny_model
from tests.train.test_loop import tokens

OPTIONS = {name: {k: v for k, v in hp.items() if k != "lr"} for name, hp in HP.items()}


def cfg(name, **kw):
    base = dict(batch_size=4, max_iters=8, lr=3e-3, min_lr=3e-4, warmup_iters=2, eval_interval=8,
                eval_iters=1,
                log_interval=4, device="cpu", progress=False, optimizer=name, optimizer_options=OPTIONS[name])
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["adamw8bit", "soap-lowbit", "muon"])
def test_training_loop_resumes_bit_identically(tmp_path, name):
    data = tokens()
    straight = train(TINY, cfg(name), data).model.state_dict()
    first = train(TINY, cfg(name, out_dir=str(tmp_path)), data, stop_at=4)
    resumed = train(TINY, cfg(name, out_dir=str(tmp_path)), data, resume=first.checkpoint)
    for key, value in straight.items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_pipeline_optim_settings_reach_the_optimizer():
    config = load_config(None, ["optim.name=soap", "optim.precondition_frequency=7", "train.max_iters=5"])
    _, train_config = model_and_train_configs(config)
    assert train_config.optimizer == "soap"
    assert train_config.optimizer_options == {"precondition_frequency": 7}
    with pytest.raises(ValueError, match="precondition_frequency=0 is out of range"):
        model_and_train_configs(load_config(None, ["optim.name=soap", "optim.precondition_frequency=0"]))
    with pytest.raises(ValueError, match="'muon' has no hyperparameter precondition_frequency"):
        model_and_train_configs(load_config(None, ["optim.name=muon", "optim.precondition_frequency=3"]))


def sharded_vs_single(rank, world, name, steps=4):
    """Each rank: half the batch through BucketedDDP and a ZeRO-1 shard of the optimizer state; the
    reference: the unsharded optimizer stepping on the same averaged gradients. (Not on its own
    whole-batch gradients: those differ in the last bits, and an eigendecomposition of a rank-deficient
    factor turns last bits into another basis of its null space, so the runs would part for that
    reason alone.)"""
    model, reference = tiny_model(), tiny_model()
    cls, groups, kwargs = optimizer_spec(name, model, weight_decay=0.1, **HP[name])
    opt = ShardedOptimizer(groups, cls, **kwargs)
    ref_cls, ref_groups, ref_kwargs = optimizer_spec(name, reference, weight_decay=0.1, **HP[name])
    ref = ref_cls(ref_groups, **ref_kwargs)
    ddp = BucketedDDP(model, bucket_size_mb=0.01)
    half = 2
    for t in range(steps):
        x, y = tiny_batch(seed=t, batch=4)
        mine = slice(rank * half, (rank + 1) * half)
        cross_entropy(ddp(x[mine]), y[mine]).backward()
        sync_gradients(ddp)
        for p, q in zip(model.parameters(), reference.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        opt.zero_grad()
        ref.step()
        ref.zero_grad()
    return {"gap": max((p - q).abs().max().item() for p, q in zip(model.parameters(),
                                                                  reference.parameters())),
            "moved": max((p - q).abs().max().item() for p, q in zip(model.parameters(),
                                                                    tiny_model().parameters())),
            "state": opt.state_bytes()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["adamw8bit", "shampoo", "soap", "muon"])
def test_zero1_sharded_optimizer_matches_one_process(name):
    results = launch(sharded_vs_single, 2, name, timeout=60)
    for r in results:
        assert r["gap"] < 1e-6, r
        assert r["moved"] > 1e-3 and r["state"] > 0
