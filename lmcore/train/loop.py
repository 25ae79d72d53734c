"""The training loop: accumulation, mixed precision, compilation, evaluation, checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lmcore.distributed.fsdp import clip_sharded_grad_norm
from lmcore.distributed.wrap import DDP_KINDS, maybe_no_sync, sync_gradients
from lmcore.nn import ModelConfig, TransformerLM
from lmcore.runfolders import remove_stale_staging
from lmcore.train.batches import get_batch
from lmcore.train.checkpoint import (CheckpointError, config_differences, load_checkpoint,
                                     remove_partial_writes, save_checkpoint, set_rng_state)
from lmcore.train.functional import clip_grad_norm, cosine_lr, cross_entropy
from lmcore.train.metrics import MetricsLog, plot_metrics
from lmcore.train.optim import AdamW
from lmcore.train.sharded_checkpoint import NAME as SHARDED_NAME
from lmcore.train.sharded_checkpoint import full_checkpoint_state, load_sharded, read_meta, save_sharded
from lmcore.utils import get_device, seed_everything

DTYPES = ("auto", "float32", "bfloat16")

#: Fields that only change how a run is observed or where it runs, and ``max_iters`` (a resumed run
#: may be extended); all others must match to resume.
RESUME_MAY_CHANGE = frozenset({"eval_interval", "eval_iters", "log_interval", "checkpoint_interval",
                               "out_dir", "device", "compile", "progress", "ddp", "bucket_size_mb",
                               "sharded_optimizer", "max_iters", "consolidate_checkpoint"})


@dataclass
class TrainConfig:
    """Everything about a training run except the model's shape."""

    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 200  # optimizer steps in the whole run
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 20  # linear warm-up steps
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on norms)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm limit (0 = off)
    eval_interval: int = 50  # evaluate every N steps (and at the end)
    eval_iters: int = 10  # batches per evaluation
    log_interval: int = 10  # log training loss every N steps
    checkpoint_interval: int = 0  # save every N steps (0 = only at the end); needs out_dir
    out_dir: str | None = None  # where metrics.jsonl, ckpt.pt and curves.png go
    device: str = "auto"
    dtype: str = "auto"  # "auto" = bfloat16 autocast on CUDA, float32 elsewhere
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute block activations in backward
    seed: int = 0
    progress: bool = True  # progress bar
    ddp: str = "none"  # data parallelism over the ranks torchrun started: none/naive/overlapped/bucketed/
    #                    torch/fsdp
    bucket_size_mb: float = 25.0  # bucket size of ddp="bucketed" and ddp="torch"
    sharded_optimizer: bool = False  # ZeRO-1: each rank keeps optimizer state for its shard only
    consolidate_checkpoint: bool = False  # ddp="fsdp": also gather the sharded checkpoint into ckpt.pt
    optimizer: str = "adamw"  # a name from lmcore.optim.OPTIMIZERS (adamw, adamw8bit, shampoo, soap, muon...)
    optimizer_options: dict = field(default_factory=dict)  # its other hyperparameters, e.g. precondition_frequency

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_iters", "eval_iters", "log_interval", "eval_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r} must be a positive integer")
        if self.warmup_iters < 0 or self.checkpoint_interval < 0:
            raise ValueError(f"warmup_iters={self.warmup_iters} and checkpoint_interval="
                             f"{self.checkpoint_interval} must be >= 0")
        if self.ddp not in DDP_KINDS:
            raise ValueError(f"TrainConfig.ddp={self.ddp!r} is not one of {DDP_KINDS}")
        if self.ddp == "fsdp" and self.sharded_optimizer:
            raise ValueError("TrainConfig.ddp='fsdp' with sharded_optimizer=True: FSDP already shards the "
                             "optimizer state; expected sharded_optimizer=False")
        if self.consolidate_checkpoint and self.ddp != "fsdp":
            raise ValueError(f"TrainConfig.consolidate_checkpoint=True with ddp={self.ddp!r}: only "
                             "ddp='fsdp' writes sharded checkpoints; expected consolidate_checkpoint=False")
        if not self.bucket_size_mb > 0:
            raise ValueError(f"TrainConfig.bucket_size_mb={self.bucket_size_mb!r} must be > 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype={self.dtype!r} is not one of {DTYPES}")
        if not self.lr > 0 or self.min_lr < 0:
            raise ValueError(f"lr={self.lr} must be > 0 and min_lr={self.min_lr} >= 0")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is above lr={self.lr}; the schedule decays from lr "
                             "down to min_lr, so expected min_lr <= lr")
        if not isinstance(self.optimizer_options, dict):
            raise ValueError(f"TrainConfig.optimizer_options={self.optimizer_options!r} must be a mapping")
        from lmcore.optim import check_settings

        check_settings(self.optimizer, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                       weight_decay=self.weight_decay, **self.optimizer_options)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    model: TransformerLM
    optimizer: AdamW
    iteration: int
    history: list[dict] = field(default_factory=list)
    checkpoint: str | None = None

    @property
    def final_val_loss(self) -> float | None:
        vals = [r["val_loss"] for r in self.history if "val_loss" in r]
        return vals[-1] if vals else None


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, sharded: bool = False):
    """AdamW with weight decay on matrices only (norm gains are not decayed); ZeRO-1 sharded if asked.
    On an FSDP model (DTensor parameters) AdamW takes its ``foreach`` path, not the fused kernel.

    ``cfg.optimizer`` other than ``"adamw"`` builds that optimizer of :mod:`lmcore.optim` instead.
    """
    if cfg.optimizer != "adamw" or cfg.optimizer_options:
        from lmcore.optim import optimizer_spec

        cls, groups, kwargs = optimizer_spec(cfg.optimizer, model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                             eps=cfg.eps, weight_decay=cfg.weight_decay, **cfg.optimizer_options)
        if sharded:
            from lmcore.distributed import ShardedOptimizer

            return ShardedOptimizer(groups, cls, **kwargs)
        return cls(groups, **kwargs)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.ddp == "fsdp":
        kwargs["fused"] = False
    if sharded:
        from lmcore.distributed import ShardedOptimizer

        return ShardedOptimizer(groups, AdamW, **kwargs)
    return AdamW(groups, **kwargs)


def data_parallel_group(cfg: TrainConfig):
    """The ``DistInfo`` of a data-parallel run (``torchrun``/``launch`` started several ranks), else None."""
    if cfg.ddp == "none" and not cfg.sharded_optimizer:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:
            raise ValueError(f"started as {world} processes (WORLD_SIZE={world}) but ddp='none': every "
                             "process would train the same model into the same out_dir; choose a ddp mode "
                             f"({', '.join(k for k in DDP_KINDS if k != 'none')}) or start a single process")
        return None
    from lmcore.distributed import init_from_env

    info = init_from_env()
    return info if info.world_size > 1 else None  # one process: nothing to synchronise


def autocast_for(device: torch.device, dtype: str):
    """The mixed-precision context for ``dtype`` on ``device`` (a no-op for float32)."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, tokens, batch_size: int, iters: int, device, dtype: str = "auto", seed: int = 0) -> float:
    """Mean cross-entropy on ``iters`` batches drawn with a fixed seed (the same batches every time)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ctx = model.config.context_length if hasattr(model, "config") else model._orig_mod.config.context_length
    losses = []
    for _ in range(iters):
        x, y = get_batch(tokens, batch_size, ctx, device, gen)
        with autocast_for(torch.device(device), dtype):
            losses.append(cross_entropy(model(x), y).item())
    model.train(was_training)
    return float(np.mean(losses))


def gathered_model(model, model_config: ModelConfig, writer: bool):
    """A sharded model's weights gathered into a plain ``TransformerLM`` on rank 0 (a collective);
    other ranks keep the sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not writer:
        return model
    plain = TransformerLM(model_config)
    plain.load_state_dict(state)
    device = next(model.parameters()).device
    return plain.to(device)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def train(model_config: ModelConfig, cfg: TrainConfig, train_tokens, val_tokens=None,
          resume: str | os.PathLike | None = None, stop_at: int | None = None) -> TrainResult:
    """Train a ``TransformerLM`` on a 1-D array of token ids; returns the model and its history.

    ``resume`` continues from a checkpoint (which must come from the same configuration);
    ``stop_at`` ends the run early at that iteration (the schedule still spans ``max_iters``).
    """
    group = data_parallel_group(cfg)
    rank, world = (group.rank, group.world_size) if group else (0, 1)
    device = group.device if group else get_device(cfg.device)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    model = TransformerLM(model_config).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    fsdp = group is not None and cfg.ddp == "fsdp"
    if fsdp:  # sharded before the optimizer is built: it steps the shards
        from lmcore.distributed import wrap_model

        precision = {"float32": "fp32", "bfloat16": "bf16"}.get(cfg.dtype, "auto")
        model = wrap_model(model, "fsdp", mixed_precision=precision)
    optimizer = configure_optimizer(model, cfg, sharded=group is not None and cfg.sharded_optimizer)
    batches = torch.Generator().manual_seed(cfg.seed + 1 + rank)  # each rank draws its own batches
    config = {"model": model_config.to_dict(), "train": cfg.to_dict()}
    start = 0
    if resume is not None and fsdp != os.path.isdir(resume):
        mode = "ddp=fsdp" if fsdp else f"ddp={cfg.ddp!r}"
        raise CheckpointError(f"cannot resume {mode} from {os.fspath(resume)}: "
                              + ("a sharded run resumes from its sharded checkpoint folder (ckpt-sharded)"
                                 if fsdp else "a sharded checkpoint folder is resumed with ddp='fsdp' on as "
                                 "many ranks; or resume from a consolidated ckpt.pt"))
    if resume is not None:
        payload = read_meta(resume) if fsdp else load_checkpoint(resume)
        saved_train = payload["config"].get("train", {})  # checkpoints from before optimizers had a name
        saved_train.setdefault("optimizer", "adamw")
        saved_train.setdefault("optimizer_options", {})
        keep = lambda c: {**c, "train": {k: v for k, v in c["train"].items() if k not in RESUME_MAY_CHANGE}}  # noqa: E731
        diffs = config_differences(keep(payload["config"]), keep(config))
        if diffs:
            raise CheckpointError(f"checkpoint {os.fspath(resume)} was written by another configuration; "
                                  f"fields that differ: {'; '.join(diffs)}")
        start = payload["iteration"]
        if start > cfg.max_iters:
            raise CheckpointError(f"checkpoint {os.fspath(resume)} is at iteration {start}, past max_iters="
                                  f"{cfg.max_iters}; expected max_iters >= {start}")
        before = payload["config"]["train"].get("max_iters", cfg.max_iters)
        if before != cfg.max_iters and rank == 0:
            print(f"resuming at iteration {start} with max_iters {before} -> {cfg.max_iters}: the cosine "
                  f"schedule now spans {cfg.max_iters} iterations, so the learning rate continues from its "
                  f"value at iteration {start} of the longer schedule", file=sys.stderr)
        if fsdp:
            meta = load_sharded(resume, model=model, optimizer=optimizer, batch_generator=batches)
            same_world = meta["world_size"] == world
        else:
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            set_rng_state(payload["rng"], batches)
            same_world = False
        if world > 1 and not same_world:  # only rank 0's generator was saved: every rank gets its own stream
            batches.manual_seed(cfg.seed + 1 + rank + 1_000_003 * start)
    if group is not None and not fsdp:
        from lmcore.distributed import wrap_model

        net = wrap_model(model, cfg.ddp, bucket_size_mb=cfg.bucket_size_mb)  # averages gradients over ranks
    else:
        net = model
    def loss_of(x, y):
        return cross_entropy(net(x), y)

    loss_of_batch = torch.compile(loss_of) if cfg.compile else loss_of  # the loss compiles with the model
    end = cfg.max_iters if stop_at is None else min(stop_at, cfg.max_iters)
    out = cfg.out_dir
    writer = rank == 0  # only rank 0 logs and writes files
    if out and writer:
        remove_partial_writes(out)  # a checkpoint write that was killed leaves its temporary file
        remove_stale_staging(out)  # (a sharded one, its staging folder)
    log = MetricsLog(os.path.join(out, "metrics.jsonl") if out and writer else None,
                     append=resume is not None, after=start)
    ckpt_path = os.path.join(out, "ckpt.pt") if out else None
    sharded_path = os.path.join(out, SHARDED_NAME) if out and fsdp else None
    tokens_per_iter = cfg.batch_size * model_config.context_length * cfg.grad_accum * world

    def save(iteration):
        if fsdp:  # every rank writes its shards; gathered into ckpt.pt only when asked
            save_sharded(sharded_path, model=model, optimizer=optimizer, iteration=iteration, config=config,
                         batch_generator=batches)
            if cfg.consolidate_checkpoint:
                model_state, optim_state = full_checkpoint_state(model, optimizer)
                if writer:
                    save_checkpoint(ckpt_path, model=model, optimizer=optimizer, iteration=iteration,
                                    config=config, batch_generator=batches, optimizer_state=optim_state,
                                    model_state=model_state)
            return
        # a sharded optimizer merges its shards (a collective: every rank takes part)
        state = optimizer.full_state_dict() if hasattr(optimizer, "full_state_dict") else None
        if writer:
            save_checkpoint(ckpt_path, model=model, optimizer=optimizer, iteration=iteration, config=config,
                            batch_generator=batches, optimizer_state=state)

    from tqdm.auto import tqdm

    bar = tqdm(range(start, end), disable=not (cfg.progress and writer), desc="training", leave=False)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_last, it_last = time.perf_counter(), start
    for it in bar:
        lr = cosine_lr(it + 1, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = get_batch(train_tokens, cfg.batch_size, model_config.context_length, device, batches)
            with maybe_no_sync(net, micro < cfg.grad_accum - 1):  # synchronise on the last micro-batch only
                with autocast_for(device, cfg.dtype):
                    loss = loss_of_batch(x, y) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        sync_gradients(net)  # wait for the averaged gradients (a no-op without data parallelism)
        if cfg.grad_clip <= 0:
            grad_norm = None
        elif fsdp:
            grad_norm = clip_sharded_grad_norm(model, cfg.grad_clip)
        else:
            grad_norm = clip_grad_norm(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iteration = it + 1
        if iteration % cfg.log_interval == 0 or iteration == end:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            record = log.log(iter=iteration, loss=loss_sum.item(), lr=lr,
                             grad_norm=float(grad_norm) if grad_norm is not None else None,
                             tokens_per_s=(iteration - it_last) * tokens_per_iter / max(now - t_last, 1e-9),
                             memory_mb=_memory_mb(device))
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            t_last, it_last = time.perf_counter(), iteration
        if val_tokens is not None and (iteration % cfg.eval_interval == 0 or iteration == end):
            val = evaluate(model, val_tokens, cfg.batch_size, cfg.eval_iters, device, cfg.dtype, cfg.seed + 2)
            log.log(iter=iteration, val_loss=val, val_perplexity=math.exp(min(val, 50)))
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if ckpt_path and cfg.checkpoint_interval and iteration % cfg.checkpoint_interval == 0:
            save(iteration)
    bar.close()
    final = max(end, start)
    if ckpt_path:
        save(final)
        if writer:
            plot_metrics(log.records, os.path.join(out, "curves.png"))
    if fsdp:  # rank 0 gets a plain model with the gathered weights (to sample, count, save)
        model = gathered_model(model, model_config, writer)
    return TrainResult(model=model, optimizer=optimizer, iteration=final, history=log.records, checkpoint=ckpt_path)
