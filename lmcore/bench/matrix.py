"""Benchmark: ``python -m lmcore.bench matrix [--quick] [--json OUT] [--out-dir DIR] [options]``.

Every attention backend crossed with every data-parallel wrapper, on one model shape:

    backends  sdpa, flash_triton, block_sparse, nsa (those that run on the device)
    wrappers  none, naive, overlapped, bucketed, torch (DDP), zero1 (bucketed + ShardedOptimizer),
              fsdp (shard_model)

Each rank trains on its own batch of ``--batch`` sequences (weak scaling). 'none' is the same step
without communication, every rank alone; it is the one-process reference of its backend:

    tokens/s            = world * batch * seq / step time
    scaling efficiency  = step time of 'none' / step time of the wrapper (1.0 = communication is free)
    memory overhead     = peak memory per rank / peak memory of 'none' - 1 (CUDA only)

Writes ``matrix-<device>-x<world>-<model>.csv``, ``.json`` (provenance, settings), ``.png`` (heat map
of scaling efficiency) and ``.md`` (a short report) into ``--out-dir``. ``--quick``: 2 gloo
processes on CPU, a tiny model, the backends that run on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time

BACKENDS = ("sdpa", "flash_triton", "block_sparse", "nsa")
CPU_BACKENDS = ("sdpa", "block_sparse", "nsa")  # flash_triton needs a GPU (or the slow interpreter)
WRAPPERS = ("none", "naive", "overlapped", "bucketed", "torch", "zero1", "fsdp")
MODELS = {  # name -> (preset, overrides); any other lmcore.nn preset name is that preset
    "tiny": ("tiny", {}),
    "gpt2-medium-shape": ("gpt2-small-shape", dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2816)),
    "qwen3-0.6b": ("qwen3-0.6b", {}),
}
CSV_FIELDS = ["model", "backend", "wrapper", "world_size", "batch", "seq", "dtype", "step_ms", "tokens_per_s",
              "scaling_efficiency", "peak_mem_gb", "estimate_gb", "mem_overhead", "status"]
SCHEME = {"zero1": "zero1", "fsdp": "fsdp"}  # wrapper -> lmcore.accounting scheme; the others replicate (ddp)


@dataclasses.dataclass
class MatrixConfig:
    model: str
    seq: int
    batch: int  # sequences per rank per step
    backends: list
    wrappers: list
    world_size: int
    backend: str  # process-group backend: gloo or nccl
    dtype: str  # bf16 or fp32
    steps: int
    warmup: int
    block_size: int  # block_sparse / nsa block
    checkpointing: bool = False  # activation checkpointing of every block
    name: str = "matrix"  # file-name prefix


def model_config(name: str, seq: int, attention: str, block_size: int, impl: str = "auto"):
    """The ``ModelConfig`` of shape ``name`` at context ``seq`` with attention backend ``attention``.

    ``impl`` is the block-sparse implementation of block_sparse and nsa ('torch' on a CPU, so that a
    Triton interpreter left on never runs them).
    """
    from lmcore.nn import PRESETS, ModelConfig

    if name not in MODELS and name not in PRESETS:
        raise ValueError(f"model {name!r}: expected one of {', '.join(MODELS)} or an lmcore.nn preset")
    preset, overrides = MODELS.get(name, (name, {}))
    options = {}
    if attention == "block_sparse":  # a sliding window of a quarter of the context
        options = dict(pattern="local", window=max(block_size, seq // 4), block_size=block_size, impl=impl)
    elif attention == "nsa":
        # the paper's design at this block size: compressed blocks of half a block every quarter,
        # up to 16 selected blocks (never more than the sequence holds), a window of an eighth
        options = dict(cmp_block=block_size // 2, cmp_stride=block_size // 4, sel_block=block_size,
                       top_n=max(2, min(16, seq // block_size)), window=max(block_size, seq // 8), impl=impl)
    return ModelConfig.preset(preset, **overrides, context_length=seq, attention_backend=attention,
                              attention_options=options)


def _measure(cfg: MatrixConfig, attention: str, wrapper: str, rank: int, device) -> dict:
    """Train ``cfg.warmup + cfg.steps`` steps of one (backend, wrapper); step time and peak memory."""
    import torch
    import torch.nn.functional as F

    from lmcore.distributed import make_optimizer, sync_gradients, wrap_model
    from lmcore.nn import TransformerLM

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    impl = "auto" if cuda else "torch"
    model = TransformerLM(model_config(cfg.model, cfg.seq, attention, cfg.block_size, impl), device=device)
    model.activation_checkpointing = cfg.checkpointing
    if wrapper == "fsdp":
        net = wrap_model(model, "fsdp", mixed_precision="bf16" if cfg.dtype == "bf16" else "fp32")
    else:
        net = wrap_model(model, {"zero1": "bucketed"}.get(wrapper, wrapper))
    opt = make_optimizer(net.parameters(), torch.optim.AdamW, sharded=wrapper == "zero1", lr=1e-4,
                         weight_decay=0.1)
    g = torch.Generator().manual_seed(1000 + rank)
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (cfg.batch, cfg.seq + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            logits = net(x)  # (B, T, V)
        F.cross_entropy(logits.reshape(-1, vocab).float(), y.reshape(-1)).backward()
        sync_gradients(net)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(cfg.warmup):
        step()
    times = []
    for _ in range(cfg.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    del net, model, opt
    return {"step_ms": statistics.median(times) * 1e3, "peak_mem_gb": peak}


def _worker(rank: int, world: int, cfg_dict: dict) -> list[dict]:
    import torch
    import torch.distributed as dist

    cfg = MatrixConfig(**cfg_dict)
    device = torch.device("cuda", rank) if cfg.backend == "nccl" else torch.device("cpu")
    rows = []
    for attention in cfg.backends:
        for wrapper in cfg.wrappers:
            row = {"backend": attention, "wrapper": wrapper}
            try:
                row.update(_measure(cfg, attention, wrapper, rank, device), status="ok")
            except Exception as err:  # noqa: BLE001 - a backend that cannot run here (or OOM) is recorded
                first = str(err).splitlines()[0][:160] if str(err) else ""
                row["status"] = f"error: {type(err).__name__}: {first}"
            failed = torch.tensor([float(row["status"] != "ok")], device=device)
            dist.all_reduce(failed)  # every rank agrees before the next configuration's collectives
            if failed.item() and row["status"] == "ok":
                row["status"] = "error on another rank"
            rows.append(row)
    return rows


def merge(per_rank: list[list[dict]], cfg: MatrixConfig) -> list[dict]:
    """One row per (backend, wrapper): the slowest rank's step time, the largest peak memory."""
    out = []
    for i, first in enumerate(per_rank[0]):
        mine = [rows[i] for rows in per_rank]
        row = {"model": cfg.model, "backend": first["backend"], "wrapper": first["wrapper"],
               "world_size": cfg.world_size, "batch": cfg.batch, "seq": cfg.seq, "dtype": cfg.dtype,
               "status": next((r["status"] for r in mine if r["status"] != "ok"), "ok")}
        if row["status"] == "ok":
            step = max(r["step_ms"] for r in mine)
            peaks = [r["peak_mem_gb"] for r in mine if r["peak_mem_gb"] is not None]
            row.update(step_ms=round(step, 3), peak_mem_gb=round(max(peaks), 4) if peaks else None,
                       estimate_gb=round(estimate_gb(cfg, row["backend"], row["wrapper"]), 6),
                       tokens_per_s=round(cfg.world_size * cfg.batch * cfg.seq / (step / 1e3), 1))
        out.append(row)
    for row in out:  # against the same backend without communication
        base = next((r for r in out if r["backend"] == row["backend"] and r["wrapper"] == "none"
                     and r["status"] == "ok"), None)
        if row["status"] == "ok" and base is not None:
            row["scaling_efficiency"] = round(base["step_ms"] / row["step_ms"], 4)
            if row["peak_mem_gb"] and base["peak_mem_gb"]:
                row["mem_overhead"] = round(row["peak_mem_gb"] / base["peak_mem_gb"] - 1, 4)
    return out


def estimate_gb(cfg: MatrixConfig, attention: str, wrapper: str) -> float:
    """``lmcore.accounting.sharded_memory_estimate`` of one rank, in GiB."""
    from lmcore.accounting import sharded_memory_estimate

    config = model_config(cfg.model, cfg.seq, attention, cfg.block_size)
    world = 1 if wrapper == "none" else cfg.world_size
    return sharded_memory_estimate(config, cfg.batch, world, SCHEME.get(wrapper, "ddp"), seq=cfg.seq,
                                   dtype="bfloat16" if cfg.dtype == "bf16" else "float32",
                                   checkpointing=cfg.checkpointing)["total"] / 2**30


def heat_map(rows: list[dict], path: str, title: str) -> None:
    """Scaling efficiency, backend x wrapper, with tokens/s written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    wrappers = list(dict.fromkeys(r["wrapper"] for r in rows))
    grid = np.full((len(backends), len(wrappers)), np.nan)
    fig, ax = plt.subplots(figsize=(1.3 * len(wrappers) + 2, 0.8 * len(backends) + 1.6))
    for r in rows:
        i, j = backends.index(r["backend"]), wrappers.index(r["wrapper"])
        eff = r.get("scaling_efficiency")
        grid[i, j] = eff if eff is not None else np.nan
        text = f"{eff:.2f}\n{r['tokens_per_s']:.3g} tok/s" if eff is not None else "n/a"
        ax.text(j, i, text, ha="center", va="center", fontsize=7)
    top = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(1.0, top))
    ax.set_xticks(range(len(wrappers)), wrappers)
    ax.set_yticks(range(len(backends)), backends)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="scaling efficiency")
    fig.tight_layout()
    from lmcore.utils import atomic_write

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def report(rows: list[dict], cfg: MatrixConfig, device: str) -> str:
    """A short Markdown report: the table, and the best and worst wrapper of each backend."""
    lines = [f"# Kernel x data-parallel matrix: {cfg.model}, context {cfg.seq}, {cfg.world_size} x {device}",
             "", f"batch {cfg.batch} sequences per rank, {cfg.dtype}; efficiency against the same backend "
             "without communication.", "",
             "| backend | wrapper | tokens/s | scaling efficiency | peak GB/rank | estimate GB "
             "| memory overhead | status |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['backend']} | {r['wrapper']} | {fmt(r.get('tokens_per_s'), '.0f')} | "
                     f"{fmt(r.get('scaling_efficiency'), '.3f')} | {fmt(r.get('peak_mem_gb'), '.2f')} | "
                     f"{fmt(r.get('estimate_gb'), '.2f')} | "
                     f"{fmt(r.get('mem_overhead'), '+.1%')} | {r['status']} |")
    lines.append("")
    for b in dict.fromkeys(r["backend"] for r in rows):
        ok = [r for r in rows if r["backend"] == b and r.get("scaling_efficiency") is not None
              and r["wrapper"] != "none"]
        if ok:
            by_eff = sorted(ok, key=lambda r: r["scaling_efficiency"])
            best, worst = by_eff[-1], by_eff[0]
            lines.append(f"- {b}: best {best['wrapper']} ({best['scaling_efficiency']:.3f}), "
                         f"worst {worst['wrapper']} ({worst['scaling_efficiency']:.3f})")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lmcore.bench matrix", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="2 gloo processes on CPU, tiny model (a smoke test)")
    p.add_argument("--model", default=None,
                   help=f"{', '.join(MODELS)} or an lmcore.nn preset (default gpt2-medium-shape; "
                        "quick: tiny)")
    p.add_argument("--seq", type=int, default=None, help="context length (default 1024; quick: 64)")
    p.add_argument("--batch", type=int, default=None, help="sequences per rank per step (default 8; "
                   "quick: 2)")
    p.add_argument("--world-size", type=int, default=None, help="processes (default: every GPU; quick: 2)")
    p.add_argument("--backends", default=None, help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--wrappers", default=",".join(WRAPPERS), help="comma-separated subset of the wrappers")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick: 2)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--name", default="matrix", help="file-name prefix: NAME-<device>-x<world>-<model>.*")
    p.add_argument("--out-dir", default=None, help="where files go (default book/results; quick: none)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> MatrixConfig:
    """The run's settings, every one checked before any process starts."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.quick and gpus < 2:
        raise SystemExit(f"matrix: needs at least 2 CUDA GPUs (found {gpus}); use --quick for the CPU "
                         "smoke run")
    world = args.world_size or (2 if args.quick else gpus)
    if world < 2 or (not args.quick and world > gpus):
        most = gpus if not args.quick else "any"
        raise SystemExit(f"matrix: --world-size {world}: expected 2 <= world size <= {most}")
    allowed = CPU_BACKENDS if args.quick else BACKENDS
    backends = args.backends.split(",") if args.backends else list(allowed)
    wrappers = args.wrappers.split(",")
    for name, chosen, known in (("backend", backends, allowed), ("wrapper", wrappers, WRAPPERS)):
        bad = [c for c in chosen if c not in known]
        if bad:
            raise SystemExit(f"matrix: {name} {bad[0]!r}: expected one of {', '.join(known)}")
    if "none" not in wrappers:
        wrappers = ["none", *wrappers]  # the reference of every efficiency
    cfg = MatrixConfig(model=args.model or ("tiny" if args.quick else "gpt2-medium-shape"),
                       seq=args.seq or (64 if args.quick else 1024),
                       batch=args.batch or (2 if args.quick else 8),
                       backends=backends, wrappers=wrappers, world_size=world,
                       backend="gloo" if args.quick else "nccl", dtype="fp32" if args.quick else "bf16",
                       steps=args.steps or (2 if args.quick else 10), warmup=1 if args.quick else 3,
                       block_size=16 if args.quick else 64, checkpointing=args.checkpointing, name=args.name)
    if not cfg.name.replace("-", "").isalnum():
        raise SystemExit(f"matrix: --name {cfg.name!r}: expected letters, digits and dashes")
    if cfg.seq % cfg.block_size:
        raise SystemExit(f"matrix: --seq {cfg.seq}: expected a multiple of the block size {cfg.block_size}")
    try:
        model_config(cfg.model, cfg.seq, "sdpa", cfg.block_size)  # a bad shape fails here
    except ValueError as err:
        raise SystemExit(f"matrix: {err}") from None
    return cfg


def main(argv: list[str]) -> dict:
    from lmcore.bench import gpu_slug, provenance
    from lmcore.distributed import launch
    from lmcore.utils import atomic_write

    args = parse_args(argv)
    cfg = make_config(args)
    began = time.monotonic()
    per_rank = launch(_worker, cfg.world_size, dataclasses.asdict(cfg), backend=cfg.backend, timeout=600,
                      start_method="spawn" if cfg.backend == "nccl" else None)
    rows = merge(per_rank, cfg)
    prov = provenance()
    prov.update(world_size=cfg.world_size, backend=cfg.backend)
    effs = {f"{r['backend']}/{r['wrapper']}": r["scaling_efficiency"] for r in rows
            if r.get("scaling_efficiency") is not None and r["wrapper"] != "none"}
    metrics = {"min_scaling_efficiency": min(effs.values()) if effs else math.nan,
               "configurations": len(rows), "failed": sum(r["status"] != "ok" for r in rows)}
    result = {"metrics": metrics, "provenance": prov, "settings": dataclasses.asdict(cfg), "rows": rows,
              "wall_s": round(time.monotonic() - began, 1)}
    default_dir = None if args.quick else os.path.join("book", "results")
    out_dir = args.out_dir if args.out_dir is not None else default_dir
    if out_dir:
        stem = os.path.join(out_dir, f"{cfg.name}-{gpu_slug(prov.get('gpu'))}-x{cfg.world_size}-{cfg.model}")
        files = {"csv": stem + ".csv", "json": stem + ".json", "png": stem + ".png", "report": stem + ".md"}
        with atomic_write(files["csv"]) as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)
        with atomic_write(files["json"]) as f:
            json.dump(result, f, indent=1, default=str)
        device = prov.get("gpu", "CPU process")
        heat_map(rows, files["png"], f"{cfg.model}, T={cfg.seq}, {cfg.world_size} x {device}")
        with atomic_write(files["report"]) as f:
            f.write(report(rows, cfg, device))
        result["files"] = files
    print(report(rows, cfg, prov.get("gpu", "CPU process")), file=sys.stderr)
    return result
