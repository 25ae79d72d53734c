"""Benchmark: ``python -m lmcore.bench optim [--quick] [--json OUT]``, and the optimizer comparison
``python -m lmcore.bench optim --compare --results FILE [--phase grid|final] [options]``.

Speed and memory (the default): on the gpt2-small-shape model (bf16 autocast, context 1024), every
optimizer of :mod:`lmcore.optim` and torch's fused AdamW (plus the reference single-device Muon of
the ``muon-optimizer`` package when importable) on the same parameters, timed in interleaved rounds
(:func:`lmcore.bench.timing.rounds`):

- ``step``: one ``optimizer.step()`` on fixed gradients, averaged over ``precondition_frequency``
  steps (so the refreshes of Shampoo and SOAP are counted in proportion), and the state bytes;
- ``train``: a whole training step (forward, backward, clipping, step) with each optimizer.

The comparison: a gpt2-small-shape model trained on Python sources (``python-source``: the
standard library's and the installed packages' ``.py`` files, read offline, the first 200 MB; a BPE
tokenizer trained on them), first a short learning-rate grid
per optimizer, then one longer run each at its best rate with the same token budget. Each finished
run is added to ``--results`` at once (atomically), and runs already there are skipped, so the
comparison can be spread over several calls; ``--time-budget`` stops starting new runs in time,
and ``--stop-after`` cuts a run longer than one call: it saves a checkpoint under ``--data-dir``
and stops, and the same command continues it wherever that folder is kept.
Continuing a results file with other data, model or batch settings is refused: its runs would no
longer be comparable.
``--quick`` runs either at toy size on CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import time

import torch

from lmcore.bench.timing import ratio_spread, rounds, spread
from lmcore.nn import ModelConfig, TransformerLM
from lmcore.optim import make_optimizer, state_bytes
from lmcore.train import clip_grad_norm, cross_entropy

NAMES = ("adamw", "adamw8bit", "shampoo", "soap", "soap-lowbit", "muon")
TARGETS = {  # (metric, bound, "max" or "min")
    "lmcore AdamW step / torch fused AdamW": ("lmcore_adamw_step_vs_torch", 1.0, "max"),
    "adamw8bit step time / torch fused AdamW": ("adamw8bit_step_vs_torch", 1.2, "max"),
    "adamw8bit state / torch fused AdamW": ("adamw8bit_state_vs_torch", 0.3, "max"),
    "reference Muon step time / lmcore Muon": ("muon_speedup_vs_reference", 8.0, "min"),
    "Muon training step / AdamW training step": ("muon_train_vs_adamw", 1.2, "max"),
    "SOAP training step / AdamW training step": ("soap_train_vs_adamw", 1.3, "max"),
    "Shampoo training step / AdamW training step": ("shampoo_train_vs_adamw", 1.3, "max"),
}

#: The comparison's targets, on its final runs: (optimizer, its entry in the summary, bound); all "at most".
#: ``steps_fraction_of_adamw``: steps to reach AdamW's final validation loss over AdamW's steps;
#: ``gap_to_adamw``: the distance of the final validation loss from AdamW's, in nats.
COMPARE_TARGETS = {
    "Muon steps to AdamW's final loss / AdamW's steps": ("muon", "steps_fraction_of_adamw", 0.75),
    "SOAP steps to AdamW's final loss / AdamW's steps": ("soap", "steps_fraction_of_adamw", 0.75),
    "AdamW8bit final loss, distance from AdamW's (nats)": ("adamw8bit", "gap_to_adamw", 0.02),
}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_optimizers(model, device, names=NAMES, lr: float = 1e-3, frequency: int = 10) -> dict:
    """Every optimizer under test over the same parameters (each with its own state)."""
    opts = {"torch-fused-adamw": torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
         {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")}
    extra = {"shampoo": dict(precondition_frequency=frequency),
             "soap": dict(precondition_frequency=frequency),
             "soap-lowbit": dict(precondition_frequency=frequency)}
    for name in names:
        opts[name] = make_optimizer(name, model, lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                                    **extra.get(name, {}))
    try:
        if "muon" not in names:  # the reference is timed beside lmcore's Muon only
            return opts
        import muon

        from lmcore.optim import param_roles

        roles = param_roles(model)
        opts["reference-muon"] = muon.SingleDeviceMuonWithAuxAdam([
            dict(params=[p for _, p, r in roles if r == "hidden"], use_muon=True, lr=0.02, weight_decay=0.1),
            dict(params=[p for _, p, r in roles if r != "hidden"], use_muon=False, lr=lr, weight_decay=0.0)])
    except ImportError:
        pass
    return opts


def _timer(fn, device, k: int):
    """Milliseconds per call of ``fn`` over ``k`` calls."""
    def timed() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        _sync(device)
        return 1000 * (time.perf_counter() - t0) / k
    return timed


def bench_steps(config: ModelConfig, device, n_rounds: int, frequency: int, batch: int,
                names=NAMES) -> dict:
    torch.manual_seed(0)
    model = TransformerLM(config).to(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opts = build_optimizers(model, device, names=names, lr=1e-4, frequency=frequency)
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]

    def set_grads():
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()

    set_grads()
    for opt in opts.values():  # warm-up: states created, kernels compiled, SOAP's first (measuring) step
        for _ in range(2):
            opt.step()
    _sync(device)
    step_ms = rounds({name: _timer(opt.step, device, frequency) for name, opt in opts.items()}, n_rounds)
    memory = {name: state_bytes(opt) for name, opt in opts.items()}

    model.load_state_dict(initial)  # the whole-step timing starts from the initial weights
    x = torch.randint(0, config.vocab_size, (batch, config.context_length + 1), device=device)

    def train_step(opt):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
            loss.backward()
            clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    for opt in opts.values():
        train_step(opt)()
    train_ms = rounds({name: _timer(train_step(opt), device, frequency) for name, opt in opts.items()},
                      n_rounds)
    base = "torch-fused-adamw"
    out = {"parameters": model.num_parameters(), "batch": batch, "context": config.context_length,
           "precondition_frequency": frequency, "rounds": n_rounds,
           "step_ms": {n: spread(t) for n, t in step_ms.items()},
           "train_step_ms": {n: spread(t) for n, t in train_ms.items()},
           "state_bytes": memory,
           "state_bytes_per_parameter": {n: b / model.num_parameters() for n, b in memory.items()},
           "step_vs_torch_fused": {n: ratio_spread(t, step_ms[base]) for n, t in step_ms.items()},
           "train_vs_adamw": {n: ratio_spread(t, train_ms["adamw"]) for n, t in train_ms.items()}}
    med = lambda d, n: d[n]["median"] if n in d else None  # noqa: E731
    metrics = {
        "adamw8bit_step_vs_torch": med(out["step_vs_torch_fused"], "adamw8bit"),
        "adamw8bit_state_vs_torch": memory["adamw8bit"] / memory[base] if "adamw8bit" in memory else None,
        "lmcore_adamw_step_vs_torch": med(out["step_vs_torch_fused"], "adamw"),
        "muon_train_vs_adamw": med(out["train_vs_adamw"], "muon"),
        "soap_train_vs_adamw": med(out["train_vs_adamw"], "soap"),
        "shampoo_train_vs_adamw": med(out["train_vs_adamw"], "shampoo"),
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}  # optimizers left out: no metric
    if "reference-muon" in step_ms and "muon" in step_ms:
        metrics["muon_speedup_vs_reference"] = ratio_spread(step_ms["reference-muon"],
                                                            step_ms["muon"])["median"]
    elif "muon" in step_ms:
        out["note"] = "the muon-optimizer package is not importable: the reference Muon was skipped"
    out["metrics"] = metrics
    out["targets"] = {label: {"value": metrics.get(key), "bound": bound, "kind": kind,
                              "met": None if key not in metrics else
                              (metrics[key] <= bound if kind == "max" else metrics[key] >= bound)}
                      for label, (key, bound, kind) in TARGETS.items()}
    return out


# ----------------------------------------------------------------------------------------------
# the comparison run


def prepare_corpus(folder: str, corpus: str, size: int | None, vocab_size: int) -> dict:
    """Train/val token files of ``corpus`` under ``folder`` (kept and reused when present)."""
    from lmcore.train.pipeline import load_config, prepare_data

    config = load_config(None, [f"out_dir={folder}", f"corpus={corpus}", f"vocab_size={vocab_size}",
                                "val_fraction=0.02"])
    config["corpus_size"] = size
    return prepare_data(config, progress=False)


def _wall_clock(history: list[dict], tokens_per_iter: int) -> list[tuple[int, float]]:
    """(iteration, seconds of training so far), from the logged throughput (evaluation excluded)."""
    out, seconds, last = [], 0.0, 0
    for r in history:
        if "loss" in r and r.get("tokens_per_s"):
            seconds += (r["iter"] - last) * tokens_per_iter / r["tokens_per_s"]
            last = r["iter"]
            out.append((r["iter"], seconds))
    return out


def one_run(name: str, lr: float, tokens: int, data: dict, model_config: ModelConfig, batch: int,
            device: str, evals: int, compile_: bool, work_dir: str | None = None,
            deadline: float | None = None) -> dict | None:
    """One training run of the comparison. With ``work_dir`` and ``deadline`` (a
    ``time.perf_counter()`` value) it runs in segments: a short one that measures the speed, then as
    many steps as fit before the deadline; a run not finished by then leaves its checkpoint in
    ``work_dir`` and returns None, and the next call resumes it from there (bit for bit the run it
    would have been)."""
    from lmcore.train import TrainConfig, load_tokens, train

    tokens_per_iter = batch * model_config.context_length
    iters = max(2, tokens // tokens_per_iter)
    options = {"precondition_frequency": 10} if name in ("shampoo", "soap", "soap-lowbit") else {}
    unfinished = work_dir is not None and os.path.exists(os.path.join(work_dir, "seconds.json"))
    segmented = work_dir is not None and (deadline is not None or unfinished)
    cfg = TrainConfig(batch_size=batch, max_iters=iters, lr=lr, min_lr=lr / 10,
                      warmup_iters=max(1, iters // 20), eval_interval=max(1, iters // evals),
                      eval_iters=10 if device != "cpu" else 2, log_interval=max(1, iters // (4 * evals)),
                      device=device, compile=compile_, progress=False, optimizer=name,
                      optimizer_options=options, out_dir=work_dir if segmented else None)
    train_tokens, val_tokens = load_tokens(data["train.npy"]), load_tokens(data["val.npy"])
    if not segmented:  # in one piece: no checkpoint written
        held = _held_before_training()
        t0 = time.perf_counter()
        result = train(model_config, cfg, train_tokens, val_tokens)
        seconds, segments = time.perf_counter() - t0, 1
    else:
        result, seconds, segments, held = _segments(cfg, model_config, train_tokens, val_tokens,
                                                    math.inf if deadline is None else deadline)
        if result is None:
            return None
    # segment ends add evaluations off the run's grid: keep the grid's, as an unbroken run has them
    on_grid = lambda r: r["iter"] % cfg.eval_interval == 0 or r["iter"] == iters  # noqa: E731
    clock = dict(_wall_clock(result.history, tokens_per_iter))
    curve = [{"iter": r["iter"], "tokens": r["iter"] * tokens_per_iter, "val_loss": r["val_loss"],
              "seconds": clock.get(r["iter"], max([s for i, s in clock.items() if i <= r["iter"]],
                                                  default=0.0))}
             for r in result.history if "val_loss" in r and on_grid(r)]
    train_curve = [{"iter": r["iter"], "loss": r["loss"]} for r in result.history
                   if "loss" in r and (r["iter"] % cfg.log_interval == 0 or r["iter"] == iters)]
    memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"optimizer": name, "lr": lr, "tokens": iters * tokens_per_iter, "iterations": iters,
            "batch": batch,
            "final_val_loss": result.final_val_loss, "val_curve": curve, "train_curve": train_curve,
            "state_bytes": state_bytes(result.optimizer), "peak_memory_bytes": memory,
            "seconds_total": seconds, "optimizer_options": options, "segments": segments,
            "memory_held_before_bytes": held}


def _held_before_training() -> int | None:
    """GPU bytes still allocated as a training run (or segment) starts, after collecting what earlier
    ones left in reference cycles: the run's recorded peak counts these too, so a sound record has
    next to none."""
    gc.collect()
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def _segments(cfg, model_config, train_tokens, val_tokens, deadline: float):
    """``(result, seconds, segments, held)`` of a run trained in segments up to ``deadline``, ``held``
    the bytes allocated as its last segment started; ``(None, None, segments, None)`` when it stopped
    unfinished (its checkpoint and the seconds spent so far stay in ``cfg.out_dir``). One segment's
    model and optimizer are freed (and collected) before the next is built, so the peak memory of a
    run in segments is one segment's."""
    from lmcore.train import train
    from lmcore.utils import atomic_write

    ckpt, spent_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "seconds.json")
    done, spent = 0, 0.0
    if os.path.exists(spent_path):  # written after the checkpoint of the segment it counts
        with open(spent_path, encoding="utf-8") as f:
            saved = json.load(f)
        done, spent = saved["iteration"], saved["seconds"]
    per_iter, segments = None, 0
    while True:
        if per_iter is None:  # a short segment measures the speed
            stop = min(cfg.max_iters, done + max(1, cfg.max_iters // 50))
        elif deadline == math.inf:
            stop = cfg.max_iters
        else:
            stop = min(cfg.max_iters, done + int((deadline - time.perf_counter()) / per_iter))
        if stop <= done:
            return None, None, segments, None
        result = None  # the last segment's model and optimizer go before the next segment's come
        held = _held_before_training()
        t0 = time.perf_counter()
        result = train(model_config, cfg, train_tokens, val_tokens, resume=ckpt if done else None,
                       stop_at=stop)
        segments += 1
        elapsed = time.perf_counter() - t0
        per_iter = 1.5 * elapsed / (stop - done)  # start-up, evaluation and the checkpoint included
        done, spent = result.iteration, spent + elapsed
        with atomic_write(spent_path) as f:
            json.dump({"iteration": done, "seconds": spent}, f)
        if done >= cfg.max_iters:
            return result, spent, segments, held


def summarize(runs: list[dict]) -> dict:
    """Best learning rate per optimizer (grid) and that run's loss, and for the final runs: steps and seconds to reach
    AdamW's final validation loss, as fractions of AdamW's, and the targets (:data:`COMPARE_TARGETS`;
    ``met`` is None without the final runs it needs, False for one that never reached AdamW's loss)."""
    best = {}
    for r in runs:
        if r["phase"] == "grid" and r["final_val_loss"] is not None:
            if r["optimizer"] not in best or r["final_val_loss"] < best[r["optimizer"]]["final_val_loss"]:
                best[r["optimizer"]] = r
    out = {"best_lr": {n: r["lr"] for n, r in best.items()},
           "best_grid_loss": {n: r["final_val_loss"] for n, r in best.items()}, "final": {}}
    finals = {r["optimizer"]: r for r in runs if r["phase"] == "final"}
    if "adamw" in finals:
        target = finals["adamw"]["final_val_loss"]
        base = finals["adamw"]["val_curve"][-1]
        for name, r in finals.items():
            reach = next((p for p in r["val_curve"] if p["val_loss"] <= target), None)
            out["final"][name] = {
                "final_val_loss": r["final_val_loss"], "minus_adamw": r["final_val_loss"] - target,
                "gap_to_adamw": abs(r["final_val_loss"] - target),
                "steps_to_adamw_loss": reach["iter"] if reach else None,
                "steps_fraction_of_adamw": reach["iter"] / base["iter"] if reach else None,
                "seconds_fraction_of_adamw": (reach["seconds"] / base["seconds"]
                                              if reach and base["seconds"] else None),
                "state_bytes": r["state_bytes"]}
    out["targets"] = {}
    for label, (name, key, bound) in COMPARE_TARGETS.items():
        value = out["final"].get(name, {}).get(key)
        met = None if name not in out["final"] else value is not None and value <= bound
        out["targets"][label] = {"value": value, "bound": bound, "kind": "max", "met": met}
    return out


def _save(path: str, payload: dict) -> None:
    from lmcore.utils import atomic_write

    with atomic_write(path) as f:
        json.dump(payload, f, indent=1, default=str)


def compare(args, prov: dict) -> dict:
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    payload = {"runs": [], "provenance": prov}
    if os.path.exists(args.results):
        with open(args.results, encoding="utf-8") as f:
            payload = json.load(f)
    payload.setdefault("settings", {})
    model_config = (ModelConfig.preset("tiny", vocab_size=max(args.vocab_size, 512)) if args.quick
                    else ModelConfig.preset(args.model))
    fixed = dict(corpus=args.corpus, corpus_bytes=args.corpus_bytes, vocab_size=args.vocab_size,
                 model=model_config.to_dict(), batch=args.batch)
    changed = [k for k, v in fixed.items() if k in payload["settings"] and payload["settings"][k] != v]
    if payload["runs"] and changed:
        raise ValueError(f"{args.results} holds runs with other settings ({', '.join(changed)}: "
                         f"{', '.join(repr(payload['settings'][k]) for k in changed)}); "
                         "continue with those settings or name a new --results file")
    data_dir = args.data_dir or os.path.join("runs", "optim-data")
    data = prepare_corpus(data_dir, args.corpus, args.corpus_bytes, args.vocab_size)
    from lmcore.train import load_tokens

    counts = {"train_tokens": int(len(load_tokens(data["train.npy"]))),
              "val_tokens": int(len(load_tokens(data["val.npy"])))}
    differ = [k for k, v in counts.items() if k in payload["settings"] and payload["settings"][k] != v]
    if payload["runs"] and differ:  # the same name read another environment's files
        raise ValueError(f"{args.results} was recorded on {payload['settings'][differ[0]]} "
                         f"{differ[0].replace('_', ' ')}, the data prepared here has {counts[differ[0]]}: "
                         "the corpus differs in this environment; name a new --results file")
    payload["settings"].update(command=prov.get("command"), **fixed, **counts)
    names = args.optimizers.split(",")
    grid_lrs = [float(v) for v in args.lrs.split(",")]
    best = summarize(payload["runs"])["best_lr"]
    if args.phase == "grid":
        plan = [("grid", n, lr, args.grid_tokens) for n in names for lr in grid_lrs]
    else:
        plan = [("final", n, best.get(n), args.final_tokens) for n in names]
    missing = [n for phase, n, lr, _ in plan if lr is None]
    if missing:
        raise ValueError(f"no grid run of {missing} in {args.results}: run --phase grid first")
    start = time.perf_counter()
    deadline = None if args.stop_after is None else start + args.stop_after
    for phase, name, lr, tokens in plan:
        if any((r["phase"], r["optimizer"], r["lr"], r["tokens_asked"]) == (phase, name, lr, tokens)
               for r in payload["runs"]):
            continue  # done in an earlier call
        if time.perf_counter() - start > args.time_budget:
            payload["stopped"] = f"time budget of {args.time_budget} s spent; run the same command again"
            break
        work = os.path.join(data_dir, "unfinished", f"{phase}-{name}-lr{lr:g}-{tokens}")
        run = one_run(name, lr, tokens, data, model_config, args.batch, device, args.evals, args.compile,
                      work_dir=work, deadline=deadline)
        if run is None:
            payload["stopped"] = (f"{phase} run of {name} at lr {lr:g} unfinished after --stop-after "
                                  f"{args.stop_after:g} s; its checkpoint is in {work}: the same command "
                                  "continues it where that folder is")
            break
        run.update(phase=phase, tokens_asked=tokens, provenance=prov,
                   passes_over_data=run["tokens"] / payload["settings"]["train_tokens"])
        payload["runs"].append(run)
        payload["summary"] = summarize(payload["runs"])
        _save(args.results, payload)  # each run kept as soon as it lands
        if os.path.isdir(work):  # its checkpoint is no longer needed
            shutil.rmtree(work)
        if device == "cuda":
            torch.cuda.empty_cache()
    else:
        payload.pop("stopped", None)
    payload["summary"] = summarize(payload["runs"])
    _save(args.results, payload)
    return payload


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m lmcore.bench optim")
    p.add_argument("--quick", action="store_true", help="toy sizes on CPU")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--frequency", type=int, default=10, help="precondition_frequency (steps per timing)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (speed test: 8; comparison: 16)")
    p.add_argument("--compare", action="store_true",
                   help="the optimizer comparison instead of the speed test")
    p.add_argument("--results", default="book/results/optim-compare.json", help="comparison results (JSON)")
    p.add_argument("--phase", choices=("grid", "final"), default="grid")
    p.add_argument("--optimizers", default=",".join(NAMES),
                   help="the optimizers compared, or timed in the speed test (adamw always among them)")
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="the learning-rate grid")
    p.add_argument("--grid-tokens", type=int, default=5_000_000)
    p.add_argument("--final-tokens", type=int, default=30_000_000)
    p.add_argument("--evals", type=int, default=20, help="validation evaluations per run")
    p.add_argument("--model", default="gpt2-small-shape")
    p.add_argument("--corpus", default="python-source")
    p.add_argument("--corpus-bytes", type=int, default=200_000_000)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--data-dir", default=None, help="where the token files go (default: runs/optim-data)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the comparison runs")
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds after which no new run starts")
    p.add_argument("--stop-after", type=float, default=None,
                   help="seconds after which a run still going saves a checkpoint (under --data-dir) and "
                        "stops; the same command continues it (default: runs are never cut)")
    args = p.parse_args(argv)
    from lmcore.bench import provenance

    prov = provenance()
    if args.compare:
        args.batch = args.batch or 16
        return compare(args, prov)
    device = torch.device("cpu") if args.quick or not torch.cuda.is_available() else torch.device("cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = ModelConfig.preset("tiny" if args.quick else "gpt2-small-shape", attention_backend="sdpa")
    n_rounds = 2 if args.quick else args.rounds
    frequency = 2 if args.quick else args.frequency
    batch = 2 if args.quick else (args.batch or 8)
    names = args.optimizers.split(",")
    unknown = sorted(set(names) - set(NAMES))
    if unknown or "adamw" not in names:
        raise ValueError(f"--optimizers={args.optimizers!r}: expected names among {NAMES}, adamw included")
    result = bench_steps(config, device, n_rounds, frequency, batch, names=names)
    return {"provenance": prov, "device": str(device), "model": "tiny" if args.quick else "gpt2-small-shape",
            "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32", **result,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            "nan_free": not any(math.isnan(v) for v in result["metrics"].values())}
