"""``python -m lmcore.bench longctx [--quick] [--json OUT] [--out-dir DIR] [options]``: long-context training.

Three measurements, each against a reference taken in the same run:

1. **Training at long context**: the ``qwen3-0.6b`` shape (grouped-query attention, QK-norm, a
   vocabulary of 151,936), batch 1, one AdamW step at a time under bf16 autocast with the chunked
   loss, activation checkpointing off and on, at 4k to 32k tokens, for the ``flash_triton`` and
   ``sdpa`` backends: tokens per second, MFU, and the peak memory against ``memory_estimate``.
   A case the estimate says cannot fit is skipped and marked so.
2. **Pythia-160m at 2048 tokens** against the same model (same weights) built from ``transformers``:
   the ratio of training tokens per second, interleaved rounds, both with torch's SDPA attention
   (what ``transformers`` uses), so the ratio compares the frameworks rather than the kernels.
3. **Grouped-query FlashAttention**: forward + backward with K and V at their ``n_kv_heads`` heads
   against the same kernel given K and V expanded to every query head (the expansion timed too).

``--quick`` runs tiny shapes on the CPU (float32, the PyTorch FlashAttention for part 3) to check
the plumbing. A GPU run writes ``<out-dir>/longctx-<gpu>.csv`` and ``.json`` (default
``book/results``; a quick run writes ``longctx-cpu-quick.*`` only where ``--out-dir`` is given) after
every finished case, so a run stopped early keeps what it measured; the JSON lists the cases still
``missing``. ``--parts train,pythia,gqa`` runs some of the parts; an existing results file is refused
unless ``--resume`` is given, which merges the new rows into it (a case measured again replaces its row).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmcore.accounting import flops_per_token, memory_estimate, mfu
from lmcore.bench.timing import ratio_spread, rounds, spread
from lmcore.nn import ModelConfig, TransformerLM
from lmcore.train import AdamW

FIELDS = ["part", "model", "backend", "context", "checkpointing", "status", "step_ms", "step_ms_min", "step_ms_max",
          "tokens_per_s", "mfu", "peak_gb", "estimate_gb", "estimate_over_peak", "ratio", "ratio_min", "ratio_max"]
QUICK_SHAPE = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_ff=128)


PARTS = ("train", "pythia", "gqa")


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m lmcore.bench longctx")
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (checks the plumbing)")
    p.add_argument("--contexts", default="4096,8192,16384,32768")
    p.add_argument("--backends", default="flash_triton,sdpa")
    p.add_argument("--steps", type=int, default=3, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loss-chunk", type=int, default=4096, help="rows of logits formed at a time")
    p.add_argument("--pythia-batch", type=int, default=8)
    p.add_argument("--parts", default=",".join(PARTS), help="which of train,pythia,gqa to run")
    p.add_argument("--out-dir", default=None, help="where longctx-<gpu>.csv/.json go (a GPU run: book/results)")
    p.add_argument("--resume", action="store_true", help="add to the results already in --out-dir")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(step, device, steps):
    """Milliseconds per call of ``step`` over ``steps`` calls."""
    def run():
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        return 1000 * (time.perf_counter() - t0) / steps
    return run


def _train_step(model, opt, ids, device, loss_chunk):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(ids[:, :-1], ids[:, 1:], loss_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def long_context_case(base: ModelConfig, backend: str, T: int, ckpt: bool, device, args) -> dict:
    """One training configuration: tokens/s, MFU and peak memory against the estimate."""
    config = base.replace(context_length=max(T, base.context_length), attention_backend=backend)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    est = memory_estimate(config, 1, T, dtype, "adamw", checkpointing=ckpt, loss_chunk=args.loss_chunk)["total"]
    row = {"part": "train", "model": "qwen3-0.6b", "backend": backend, "context": T, "checkpointing": ckpt,
           "estimate_gb": est / 1e9}
    if device.type == "cuda" and est > 0.97 * torch.cuda.get_device_properties(device).total_memory:
        return dict(row, status="estimate exceeds the GPU")
    try:
        torch.manual_seed(0)
        model = TransformerLM(config).to(device)
        model.activation_checkpointing = ckpt
        model.train()
        opt = AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
        ids = torch.randint(0, config.vocab_size, (1, T + 1), device=device)
        step = _train_step(model, opt, ids, device, args.loss_chunk)
        step()  # creates the optimizer state, compiles and tunes kernels
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = rounds({"step": _timer(step, device, args.steps)}, args.rounds)["step"]
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    except torch.OutOfMemoryError:
        return dict(row, status="out of memory")
    finally:
        model = opt = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    s = spread(times)
    tps = T / (s["median"] / 1000)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(row, status="ok", step_ms=s["median"], step_ms_min=s["min"], step_ms_max=s["max"],
                tokens_per_s=tps, mfu=mfu(tps, config, name, seq_len=T), peak_gb=None if peak is None else peak / 1e9,
                estimate_over_peak=None if peak is None else est / peak)


def pythia_against_transformers(config: ModelConfig, batch: int, backend: str, device, args) -> dict:
    """The same GPT-NeoX model and weights, trained in lmcore and in ``transformers``: tokens/s ratio."""
    import transformers

    from lmcore.nn.hf import config_to_hf, to_hf_state

    config = config.replace(attention_backend=backend)
    torch.manual_seed(0)
    ours = TransformerLM(config).to(device)
    hf_config = transformers.GPTNeoXConfig(**{k: v for k, v in config_to_hf(config, "GPTNeoXForCausalLM").items()
                                               if k not in ("architectures", "model_type", "torch_dtype")})
    theirs = transformers.GPTNeoXForCausalLM._from_config(hf_config, attn_implementation="sdpa").to(device)
    state = to_hf_state(ours.state_dict(), config, "GPTNeoXForCausalLM")
    if "embed_out.weight" not in theirs.state_dict():  # newer releases name the output head lm_head
        state["lm_head.weight"] = state.pop("embed_out.weight")
    missing, _ = theirs.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"transformers' GPT-NeoX has weights lmcore did not provide: {missing[:3]}")
    T = config.context_length
    ids = torch.randint(0, config.vocab_size, (batch, T + 1), device=device)
    fused = device.type == "cuda"
    opts = {"lmcore": AdamW(ours.parameters(), lr=1e-5, weight_decay=0.1),
            "transformers": torch.optim.AdamW(theirs.parameters(), lr=1e-5, weight_decay=0.1, fused=fused)}

    def hf_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = theirs(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        opts["transformers"].step()
        opts["transformers"].zero_grad(set_to_none=True)

    steps = {"lmcore": _train_step(ours, opts["lmcore"], ids, device, None), "transformers": hf_step}
    for step in steps.values():
        step()
    times = rounds({k: _timer(v, device, args.steps) for k, v in steps.items()}, args.rounds)
    r = ratio_spread(times["transformers"], times["lmcore"])
    rows = []
    for name, t in times.items():
        s = spread(t)
        rows.append({"part": "pythia", "model": f"pythia-160m ({name})", "backend": backend if name == "lmcore"
                     else "sdpa", "context": T, "checkpointing": False, "status": "ok", "step_ms": s["median"],
                     "step_ms_min": s["min"], "step_ms_max": s["max"], "tokens_per_s": batch * T / (s["median"] / 1e3)})
    rows[0].update(ratio=r["median"], ratio_min=r["min"], ratio_max=r["max"])
    return {"rows": rows, "ratio": r}


def gqa_kernel(T: int, n_heads: int, n_kv: int, head_dim: int, device, args) -> dict:
    """Forward + backward of FlashAttention with grouped K/V against the same kernel on expanded K/V."""
    if device.type == "cuda":
        from lmcore.kernels import flash_attention as attend
        dtype, impl = torch.bfloat16, "flash_triton"
    else:
        from lmcore.kernels import flash_attention_torch as attend
        dtype, impl = torch.float32, "flash_torch"
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, n_heads, T, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
    k, v = (torch.randn(1, n_kv, T, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(1, n_heads, T, head_dim, device=device, dtype=dtype, generator=g)
    rep = n_heads // n_kv

    def grouped():
        attend(q, k, v, causal=True).backward(grad)

    def expanded():
        attend(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), causal=True).backward(grad)

    row = {"part": "gqa", "model": f"H={n_heads} Hkv={n_kv} D={head_dim}", "backend": impl, "context": T,
           "checkpointing": False}
    try:
        grouped()
    except Exception as err:  # a kernel that does not take fewer K/V heads says so in the results
        return dict(row, status=f"grouped K/V not supported: {type(err).__name__}: {str(err)[:120]}")
    expanded()
    times = rounds({"grouped": _timer(grouped, device, args.steps), "expanded": _timer(expanded, device, args.steps)},
                   args.rounds)
    r, s = ratio_spread(times["expanded"], times["grouped"]), spread(times["grouped"])
    return dict(row, status="ok", step_ms=s["median"], step_ms_min=s["min"], step_ms_max=s["max"],
                ratio=r["median"], ratio_min=r["min"], ratio_max=r["max"])


def _key(row: dict) -> tuple:
    return (row["part"], row["model"], row["backend"], row["context"], row["checkpointing"])


def _expected(contexts, backends, pythia_context: int, gqa_model: str, gqa_impl: str) -> list[tuple]:
    """Every case of a complete run, as row keys, in the order the benchmark measures them."""
    train = [("train", "qwen3-0.6b", b, T, ck) for b in backends for T in contexts for ck in (False, True)]
    pythia = [("pythia", "pythia-160m (lmcore)", "sdpa", pythia_context, False),
              ("pythia", "pythia-160m (transformers)", "sdpa", pythia_context, False)]
    return train + pythia + [("gqa", gqa_model, gqa_impl, T, False) for T in contexts]


def _summary(rows: list, expected: list, runs: list, settings: dict) -> dict:
    """The results file's content: rows, metrics over them and the cases still missing."""
    fitted = [r["estimate_over_peak"] for r in rows if r.get("estimate_over_peak")]
    gqa = [r["ratio"] for r in rows if r["part"] == "gqa" and r["status"] == "ok"]
    pythia = [r["ratio"] for r in rows if r["part"] == "pythia" and r.get("ratio") is not None]
    have = {_key(r) for r in rows}
    return {"metrics": {"pythia_tokens_per_s_ratio_vs_transformers": pythia[0] if pythia else None,
                        "estimate_over_peak_range": [min(fitted), max(fitted)] if fitted else None,
                        "gqa_speedup_over_expanded_min": min(gqa) if gqa else None,
                        "trained_cases_ok": sum(r["status"] == "ok" for r in rows if r["part"] == "train")},
            "rows": rows, "missing": [dict(zip(("part", "model", "backend", "context", "checkpointing"), k))
                                      for k in expected if k not in have],
            "provenance": runs[-1], "runs": runs, "settings": settings}


def _previous(path: Path, resume: bool, settings: dict) -> tuple[list, list, list]:
    """Rows, runs and cases of an earlier results file: refused without ``--resume``, or when measured
    with other settings."""
    if not path.exists():
        return [], [], []
    if not resume:
        raise SystemExit(f"{path} already holds results; pass --resume to add to them, or choose another --out-dir")
    old = json.loads(path.read_text())
    if old.get("settings") != settings:
        raise SystemExit(f"{path} was measured with settings {old.get('settings')}, this run uses {settings}; "
                         "use the same options or another --out-dir")
    return old.get("rows", []), old.get("runs", [old["provenance"]] if "provenance" in old else []), \
        [_key(r) for r in old.get("rows", []) + old.get("missing", [])]


def main(argv: list[str]) -> dict:
    args = _args(argv)
    from lmcore.bench import gpu_slug, provenance, write_results

    parts = args.parts.split(",")
    if not parts or any(p not in PARTS for p in parts):
        raise SystemExit(f"--parts {args.parts!r}: expected a comma-separated list of {', '.join(PARTS)}")
    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        raise SystemExit("the long-context benchmark needs a CUDA GPU; on CPU use --quick")
    device = torch.device("cuda" if cuda else "cpu")
    if args.quick:
        base = ModelConfig.preset("qwen3-0.6b", context_length=128, **QUICK_SHAPE)
        contexts, backends, args.loss_chunk, args.steps, args.rounds = [64, 128], ["sdpa"], 32, 1, 2
        pythia = ModelConfig.preset("pythia-160m", vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                                    context_length=64)
        pythia_batch, gqa_shape = 2, (4, 2, 16)
    else:
        base = ModelConfig.preset("qwen3-0.6b")
        contexts, backends = [int(t) for t in args.contexts.split(",")], args.backends.split(",")
        pythia, pythia_batch = ModelConfig.preset("pythia-160m"), args.pythia_batch
        gqa_shape = (base.n_heads, base.kv_heads, base.head_dim)
        torch.backends.cuda.matmul.allow_tf32 = True
    shown = ["book/results" if i and argv[i - 1] == "--out-dir" and cuda else a for i, a in enumerate(argv)]
    run = dict(provenance(" ".join(["python -m lmcore.bench longctx", *shown])), parts=parts)
    settings = {"batch": 1, "dtype": "bfloat16 autocast" if cuda else "float32", "optimizer": "adamw",
                "loss_chunk": args.loss_chunk, "steps_per_round": args.steps, "rounds": args.rounds,
                "pythia_batch": pythia_batch, "device": str(device)}
    gqa_model = "H={} Hkv={} D={}".format(*gqa_shape)
    gqa_impl = "flash_triton" if cuda else "flash_torch"
    expected = _expected(contexts, backends, pythia.context_length, gqa_model, gqa_impl)
    # a GPU run records in book/results unless --no-write; a quick run only where --out-dir is given
    out_dir = None if args.no_write else args.out_dir or ("book/results" if cuda else None)
    stem = f"longctx-{gpu_slug(torch.cuda.get_device_name())}" if cuda else "longctx-cpu-quick"
    path = Path(out_dir) / f"{stem}.json" if out_dir else None
    rows, runs, before = _previous(path, args.resume, settings) if path else ([], [], [])
    # cases of earlier calls (other --backends or --contexts) stay expected
    expected = sorted(before + [k for k in expected if k not in before], key=lambda k: PARTS.index(k[0]))
    runs = runs + [run]
    files = []

    def record(new: list) -> None:
        nonlocal files
        keys = {_key(r) for r in new}
        rows[:] = [r for r in rows if _key(r) not in keys] + new
        rows.sort(key=lambda r: expected.index(_key(r)) if _key(r) in expected else len(expected))
        for r in new:
            print(json.dumps(r, default=str), flush=True)
        if path:  # after every finished case, so a run stopped early keeps what it measured
            files = write_results(path.parent, stem, FIELDS, rows,
                                  _summary(rows, expected, runs, settings))

    if "train" in parts:
        for backend in backends:
            for T in contexts:
                for ckpt in (False, True):
                    record([long_context_case(base, backend, T, ckpt, device, args)])
    if "pythia" in parts:
        # the attention transformers uses (sdpa) on both sides, so the ratio compares the frameworks
        record(pythia_against_transformers(pythia, pythia_batch, "sdpa", device, args)["rows"])
    if "gqa" in parts:
        for T in contexts:
            record([gqa_kernel(T, *gqa_shape, device, args)])
    result = _summary(rows, expected, runs, settings)
    if files:
        result["files"] = files
    return result
