"""``python -m lmcore.bench attention [--quick] [--json OUT] [--out-dir DIR] [...]``.

On a GPU: time and TFLOP/s of every attention implementation, forward and forward+backward,
bf16, head dim 64 and 128, causal and not, sequence 512..16384 (at a fixed 16k tokens per batch
and model width 2048): our Triton kernels (``flash_triton``, as the attention registry names
them), the tiled PyTorch version (``flash_torch``), the written-out reference
(until it runs out of memory, recorded as ``oom``), and ``scaled_dot_product_attention`` with the
flash (FlashAttention-2), cuDNN and memory-efficient backends forced in turn. Also the peak
memory of each run above its inputs. Writes ``<out-dir>/attention-<gpu>.csv`` and a JSON with
provenance beside it.

The implementations of one shape are timed on the same inputs in ``--rounds`` interleaved rounds
(each a ``triton.testing.do_bench`` median over ``--rep`` ms): ``ms`` is the median over rounds and
``ms_min``/``ms_max`` its range, and the JSON gives each target ratio with its range when taken
round by round, so a reader can see how far the machine's noise moves it.

On CPU: ``--quick`` checks correctness only (Triton through its interpreter at tiny sizes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

IMPLS = ("flash_triton", "flash_torch", "reference", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
FIELDS = ("impl", "mode", "causal", "head_dim", "seq", "batch", "heads", "dtype", "status", "ms",
          "ms_min", "ms_max", "tflops", "peak_mem_mb")


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m lmcore.bench attention", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short sweep (CPU: correctness only)")
    ap.add_argument("--out-dir", default="book/results", help="where the CSV and JSON go")
    ap.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--tokens", type=int, default=16384, help="batch * seq for every row")
    ap.add_argument("--width", type=int, default=2048, help="heads * head_dim for every row")
    ap.add_argument("--tiled-max-seq", type=int, default=2048, help="longest seq for the slow tiled PyTorch version")
    ap.add_argument("--rep", type=int, default=25, help="do_bench repetition time in ms, per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--skip-check", action="store_true", help="skip the correctness check against SDPA")
    ap.add_argument("--train-check", type=int, default=0, metavar="STEPS",
                    help="also train a small TransformerLM for STEPS steps with flash_triton and with sdpa")
    ap.add_argument("--no-write", action="store_true", help="print only; write no files")
    args = ap.parse_args(argv)
    if args.seqs is None:
        args.seqs = [1024, 4096, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    for s in args.seqs:
        if s <= 0:
            ap.error(f"--seqs must be positive, got {s}")
    return args


def _cpu_check(args) -> dict:
    """Correctness only, through Triton's interpreter at tiny sizes."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from lmcore.kernels import attention_reference, flash_attention, flash_attention_torch

    errors = {}
    gen = torch.Generator().manual_seed(0)
    for causal in (False, True):
        for t, d in ((48, 16), (80, 32)):
            q, k, v, do = (torch.randn(2, 2, t, d, generator=gen) for _ in range(4))
            want = attention_reference(q, k, v, causal)
            for name, fn in (("flash_triton", flash_attention), ("flash_torch", flash_attention_torch)):
                got = fn(q, k, v, causal=causal)
                err = ((got - want).norm() / want.norm()).item()
                errors[f"{name}_causal{int(causal)}_t{t}_d{d}"] = err
    worst = max(errors.values())
    return {"metrics": {"max_rel_err": worst, "passed": worst < 1e-4}, "errors": errors,
            "note": "no CUDA: correctness only (Triton interpreter), nothing timed or written"}


def _make_fn(impl, q, k, v, causal, backward, do, tiled_block):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmcore.kernels import attention_reference, flash_attention, flash_attention_torch

    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}

    def forward():
        if impl == "flash_triton":
            return flash_attention(q, k, v, causal=causal)
        if impl == "flash_torch":
            return flash_attention_torch(q, k, v, causal=causal, block_m=tiled_block, block_n=tiled_block)
        if impl == "reference":
            return attention_reference(q, k, v, causal=causal, upcast=False)
        with sdpa_kernel([backends[impl]]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    if not backward:
        return lambda: forward()

    def step():
        out = forward()
        if impl.startswith("sdpa"):
            with sdpa_kernel([backends[impl]]):
                out.backward(do)
        else:
            out.backward(do)
    return step


def _measure_cell(impls, b, h, t, d, causal, backward, args):
    """Rows for every implementation on one shape, on the same inputs.

    Each implementation is warmed up (compiled, autotuned) and its peak memory read; then all
    that ran are timed in ``args.rounds`` interleaved rounds (``lmcore.bench.timing.rounds``),
    each a ``do_bench`` median over ``args.rep`` ms. ``ms`` is the median over rounds, ``ms_min``
    and ``ms_max`` the range; the per-round times stay in ``_rounds`` for paired ratios."""
    import torch
    from triton.testing import do_bench

    from lmcore.bench.timing import rounds, spread
    from lmcore.accounting import attention_flops

    q, k, v, do = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    if backward:
        for x in (q, k, v):
            x.requires_grad_(True)
    rows, timers = {}, {}
    for impl in impls:
        row = dict(impl=impl, mode="fwd+bwd" if backward else "fwd", causal=causal, head_dim=d, seq=t,
                   batch=b, heads=h, dtype="bf16", status="ok", ms="", ms_min="", ms_max="", tflops="",
                   peak_mem_mb="")
        rows[impl] = row
        if impl == "flash_torch" and t > args.tiled_max_seq:
            row["status"] = "skipped"
            continue
        fn = _make_fn(impl, q, k, v, causal, backward, do, tiled_block=128)
        try:
            fn()  # compile / autotune / pick algorithms outside the timed region
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            row["peak_mem_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            if backward:
                for x in (q, k, v):
                    x.grad = None
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
        except RuntimeError as err:  # a backend that does not support this shape, for example
            row["status"] = "error: " + str(err).splitlines()[0][:120]
        else:
            timers[impl] = (lambda fn=fn: _bench_or_nan(do_bench, fn, args.rep, [q, k, v] if backward else None))
        torch.cuda.empty_cache()
    for impl, times in rounds(timers, args.rounds).items():
        if any(ms != ms for ms in times):  # ran out of memory in a timed round
            rows[impl]["status"] = "oom"
            continue
        st = spread(times)
        ms = st["median"]
        rows[impl].update(ms=round(ms, 4), ms_min=round(st["min"], 4), ms_max=round(st["max"], 4), _rounds=times,
                          tflops=round(attention_flops(b, h, t, t, d, causal, backward) / ms / 1e9, 1))
    del q, k, v, do, timers
    torch.cuda.empty_cache()
    return list(rows.values())


def _bench_or_nan(do_bench, fn, rep, grads):
    import torch

    try:
        return do_bench(fn, rep=rep, grad_to_none=grads, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan")


def _gpu_correctness(d, causal) -> dict:
    """Relative error of our kernel's output and gradients against SDPA in float32, bf16 inputs."""
    import torch

    from lmcore.kernels import flash_attention

    gen = torch.Generator(device="cuda").manual_seed(d + causal)
    q, k, v, do = (torch.randn(2, 4, 1024, d, device="cuda", generator=gen) for _ in range(4))
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=causal).backward(do)
    ours = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    out = flash_attention(*ours, causal=causal)
    out.backward(do.bfloat16())
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    errs = {"out": out.float(), "dq": ours[0].grad.float(), "dk": ours[1].grad.float(), "dv": ours[2].grad.float()}
    wants = {"out": want, "dq": ref[0].grad, "dk": ref[1].grad, "dv": ref[2].grad}
    return {n: ((errs[n] - wants[n]).norm() / wants[n].norm()).item() for n in errs}


def _train_check(steps: int) -> dict:
    """Train the same small TransformerLM (same seed, same batches) with ``flash_triton`` and ``sdpa``.

    The data is a learnable synthetic language (each token a fixed function of the previous two,
    with 10% noise), so the loss falls well below uniform within a few hundred steps.
    """
    import torch

    from lmcore.nn import ModelConfig, TransformerLM

    vocab, t, batch = 512, 512, 16
    gen = torch.Generator(device="cuda").manual_seed(0)

    def batches():
        x = torch.randint(0, vocab, (batch, t + 1), device="cuda", generator=gen)
        noise = torch.rand(batch, t + 1, device="cuda", generator=gen) < 0.1
        for i in range(2, t + 1):
            x[:, i] = torch.where(noise[:, i], x[:, i], (7 * x[:, i - 1] + 3 * x[:, i - 2] + 1) % vocab)
        return x[:, :-1], x[:, 1:]

    data = [batches() for _ in range(16)]
    curves = {}
    for backend in ("sdpa", "flash_triton"):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=vocab, context_length=t, d_model=256, n_layers=4, n_heads=4, d_ff=688,
                          attention_backend=backend)
        model = TransformerLM(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        losses = []
        for step in range(steps):
            x, y = data[step % len(data)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 4))
        curves[backend] = losses
    tail = max(1, steps // 5)
    final = {b: sum(c[-tail:]) / tail for b, c in curves.items()}
    return {"steps": steps, "loss_curves": curves, "final_loss_mean_last_20pct": final,
            "max_abs_diff": max(abs(a - b) for a, b in zip(curves["sdpa"], curves["flash_triton"]))}


def _ratios(rows) -> tuple[dict, dict]:
    """Our speed over each SDPA backend's (higher is better) for causal bf16 rows with seq >= 4096:
    the ratio of the medians, and the range of the ratio taken round by round (paired rounds)."""
    from lmcore.bench.timing import ratio_spread

    ok = {(r["impl"], r["mode"], r["causal"], r["head_dim"], r["seq"]): r for r in rows if r["status"] == "ok"}
    out, ranges = {}, {}
    for (impl, mode, causal, d, t), ours in ok.items():
        if impl != "flash_triton" or not causal or t < 4096:
            continue
        for other in ("sdpa_cudnn", "sdpa_flash"):
            theirs = ok.get((other, mode, causal, d, t))
            if theirs:
                key = f"{impl}_{mode}_{other}_d{d}_t{t}"
                out[key] = round(theirs["ms"] / ours["ms"], 3)
                if len(theirs.get("_rounds", ())) == len(ours.get("_rounds", ())) > 0:
                    st = ratio_spread(theirs["_rounds"], ours["_rounds"])
                    ranges[key] = [round(st["min"], 3), round(st["max"], 3)]
    return out, ranges


def _write_csv(path, rows):
    from lmcore.utils import atomic_write

    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str]) -> dict:
    args = _parse(argv)
    import torch

    if not torch.cuda.is_available():
        if not args.quick:
            raise SystemExit("the attention benchmark needs a CUDA GPU; on CPU use --quick (correctness only)")
        return _cpu_check(args)

    from lmcore.bench import gpu_slug, provenance
    from lmcore.kernels.flash_triton import autotune_choices

    shown = ["book/results" if i and argv[i - 1] == "--out-dir" else a for i, a in enumerate(argv)]
    command = " ".join(["python -m lmcore.bench attention", *shown])
    flags = {"both": (True, False), "yes": (True,), "no": (False,)}[args.causal]
    correctness = {} if args.skip_check else {
        f"d{d}_causal{int(c)}": _gpu_correctness(d, c) for d in args.head_dims for c in flags}
    print("correctness (relative error vs SDPA in fp32):", json.dumps(correctness), flush=True)
    training = _train_check(args.train_check) if args.train_check else None
    if training:
        print("training check (mean loss, last 20% of steps):", training["final_loss_mean_last_20pct"],
              "max |diff| per step:", training["max_abs_diff"], flush=True)
    rows = []
    gpu = torch.cuda.get_device_name()
    out_dir, stem = Path(args.out_dir), f"attention-{gpu_slug(gpu)}"
    if not args.no_write:  # provenance first, completed at the end
        from lmcore.utils import atomic_write

        with atomic_write(out_dir / f"{stem}.json") as f:
            json.dump({"provenance": provenance(command), "partial": True, "correctness_rel_err": correctness,
                       "training_check": training}, f, indent=1)
    for causal in flags:  # causal first: the rows the targets are about
        for d in args.head_dims:
            for t in args.seqs:
                b, h = max(1, args.tokens // t), max(1, args.width // d)
                for backward in (False, True):
                    cell = _measure_cell(args.impls, b, h, t, d, causal, backward, args)
                    rows += cell
                    if not args.no_write:  # rewrite as we go, so a cut-short run keeps its rows
                        _write_csv(out_dir / f"{stem}.csv", rows)
                    for row in cell:
                        spread = f"{row['ms_min']}-{row['ms_max']}" if row["ms"] != "" else ""
                        print(f"{row['impl']:15s} {row['mode']:8s} causal={int(causal)} d={d:4d} T={t:6d} "
                              f"{row['status']:8s} {row['ms']!s:>9s} ms [{spread:>15s}] {row['tflops']!s:>7s} "
                              f"TFLOP/s {row['peak_mem_mb']!s:>9s} MB", flush=True)
    ratios, ratio_ranges = _ratios(rows)

    def worst(prefix):
        return min((v for k, v in ratios.items() if k.startswith(prefix)), default=None)

    result = {"metrics": {"ratios": ratios, "ratio_ranges_over_rounds": ratio_ranges,
                          "min_ratio_vs_cudnn_fwd": worst("flash_triton_fwd_sdpa_cudnn"),
                          "min_ratio_vs_cudnn_fwdbwd": worst("flash_triton_fwd+bwd_sdpa_cudnn"),
                          "correctness_rel_err": correctness},
              "training_check": training,
              "provenance": provenance(command), "autotune": autotune_choices(), "rows": len(rows),
              "settings": {"tokens": args.tokens, "width": args.width, "dtype": "bf16",
                           "timer": "triton.testing.do_bench median per round; median over interleaved rounds",
                           "rep_ms": args.rep, "rounds": args.rounds}}
    if not args.no_write:
        from lmcore.utils import atomic_write

        _write_csv(out_dir / f"{stem}.csv", rows)
        with atomic_write(out_dir / f"{stem}.json") as f:
            json.dump(result, f, indent=1, sort_keys=True, default=str)
        result["files"] = [str(out_dir / f"{stem}.csv"), str(out_dir / f"{stem}.json")]
    return result
