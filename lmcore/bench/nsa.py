"""Benchmark: ``python -m lmcore.bench nsa [--quick] [--json OUT]``.

Native Sparse Attention (``lmcore.sparse.nsa_attention``, Triton path) against what a user would
pick instead, on the same inputs, in one process, timed in interleaved rounds as CUDA-graph
replays (:mod:`lmcore.bench.timing`): bf16, causal, batch 1, two head settings

- ``a``: 64 query heads in 4 KV groups, head dim 128 (the NSA paper's shape family);
- ``b``: 16 query heads sharing 1 KV head, head dim 64 (where fla-core runs),

and, per length, three passes: forward, forward+backward, and one decoding step (the last query
against a cache of every key, the compressed keys cached as a server would hold them).

Implementations (``method``):

- ``nsa``: our NSA at the paper's sizes (all three branches, equal gates);
- ``nsa_cs``: our NSA with fla-core's sizes and only the compressed and selected branches
  (compression = selection block 64, top 16, no window), the fair match for ``fla_cs``;
- ``fla_cs``: fla-core's ``parallel_nsa`` (compressed + selected; its sliding window needs
  ``flash_attn``), when installed;
- ``flash_triton``: our dense FlashAttention-2 kernel (grouped K/V read in place);
- ``cudnn``: torch SDPA with the cuDNN backend (``enable_gqa``).

Ratios are the others' time over ours (above 1: ours is faster). ``--quick`` runs the plumbing
at toy size through the PyTorch path on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

SETTINGS = {"a": dict(hq=64, hkv=4, d=128), "b": dict(hq=16, hkv=1, d=64)}
FIELDS = ["setting", "seq", "hq", "hkv", "head_dim", "method", "pass", "ms", "ms_min", "ms_max", "timing",
          "peak_mb", "note"]
TARGETS = {  # name: (metric, bound, "min")
    "NSA forward vs dense at 16k": ("fwd_vs_flash_16k", 2.5),
    "NSA forward+backward vs dense at 16k": ("fwdbwd_vs_flash_16k", 1.5),
    "NSA forward vs dense at 64k": ("fwd_vs_flash_64k", 6.0),
    "NSA forward+backward vs dense at 64k": ("fwdbwd_vs_flash_64k", 3.0),
    "NSA forward vs fla-core (compressed + selected)": ("fwd_vs_fla_min", 1.0),
    "NSA forward+backward vs fla-core (compressed + selected)": ("fwdbwd_vs_fla_min", 1.5),
    "NSA decoding step vs dense decoding at 64k": ("decode_vs_flash_64k", 5.0),
}


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m lmcore.bench nsa")
    p.add_argument("--quick", action="store_true", help="toy sizes through the PyTorch path on a CPU")
    p.add_argument("--seqs", default="8192,16384,32768,65536,131072")
    p.add_argument("--settings", default="a,b")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--passes", default="fwd,fwd+bwd,decode")
    p.add_argument("--out-dir", default="book/results", help="where nsa-<gpu>.csv/.json go")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files for this GPU")
    p.add_argument("--resume", action="store_true",
                   help="add to the results file for this GPU (a case measured again replaces its rows)")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def _fla():
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as err:  # noqa: BLE001 - optional reference: any import failure is reported
        return None, f"{type(err).__name__}: {err}"
    return parallel_nsa, None


def implementations(q, k, v, quick: bool) -> dict:
    """name -> (forward(q, k, v), decode(q1)) on (B, H, T, D) inputs; decode takes the last query."""
    import torch.nn.functional as F

    from lmcore.sparse import NSAConfig, nsa_attention
    from lmcore.sparse.nsa import compress_mean

    impl = "torch" if quick else "triton"
    paper = NSAConfig() if not quick else NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, top_n=4, window=32)
    fla_sizes = NSAConfig(cmp_block=64, cmp_stride=64, sel_block=64, top_n=16, window=0) if not quick else \
        NSAConfig(cmp_block=16, cmp_stride=16, sel_block=16, top_n=4, window=0)
    g = torch.Generator(device=q.device).manual_seed(1)
    gates = torch.rand(*q.shape[:3], 3, device=q.device, generator=g).to(q.dtype)
    gates_cs = gates.clone()
    gates_cs[..., 2] = 0
    caches = {}

    def decode_nsa(cfg, gts):
        def step(q1):
            if cfg not in caches:  # the compressed keys a decoding server keeps next to its KV cache
                caches[cfg] = (compress_mean(k, cfg.cmp_block, cfg.cmp_stride).detach(),
                               compress_mean(v, cfg.cmp_block, cfg.cmp_stride).detach())
            kc, vc = caches[cfg]
            return nsa_attention(q1, k, v, cfg, gts[:, :, -1:], kc, vc, impl=impl)
        return step

    out = {
        "nsa": (lambda q, k, v: nsa_attention(q, k, v, paper, gates, impl=impl), decode_nsa(paper, gates)),
        "nsa_cs": (lambda q, k, v: nsa_attention(q, k, v, fla_sizes, gates_cs, impl=impl),
                   decode_nsa(fla_sizes, gates_cs)),
    }
    if quick:
        out["sdpa"] = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                       lambda q1: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True))
        return out
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmcore.kernels import flash_attention

    def cudnn(q, k, v, causal=True):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    out["flash_triton"] = (lambda q, k, v: flash_attention(q, k, v, causal=True),
                           lambda q1: flash_attention(q1, k, v, causal=True))
    out["cudnn"] = (cudnn, lambda q1: cudnn(q1, k, v, causal=False))
    parallel_nsa, _ = _fla()
    if parallel_nsa is not None and q.shape[1] // k.shape[1] >= 16:
        gc, gs = (gates[..., i].transpose(1, 2).contiguous() for i in (0, 1))  # (B, T, Hq)

        def fla(q, k, v):  # fla's layout is (B, T, H, D)
            o = parallel_nsa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g_cmp=gc, g_slc=gs,
                             block_counts=16, block_size=64, window_size=0)
            return o.transpose(1, 2)
        out["fla_cs"] = (fla, None)
    return out


def _ratio(rows, setting, seq, pas, theirs, ours="nsa"):
    ms = {r["method"]: r["ms"] for r in rows if (r["setting"], r["seq"], r["pass"]) == (setting, seq, pas)}
    a, b = ms.get(theirs), ms.get(ours)
    return round(a / b, 3) if a and b and math.isfinite(a) and math.isfinite(b) else None


def summarize(rows: list[dict]) -> dict:
    """Every ratio of the targets, per setting, plus the ratios at every length."""
    ratios = []
    for (setting, seq) in sorted({(r["setting"], r["seq"]) for r in rows}):
        for pas in ("fwd", "fwd+bwd", "decode"):
            entry = {"setting": setting, "seq": seq, "pass": pas,
                     "vs_flash_triton": _ratio(rows, setting, seq, pas, "flash_triton"),
                     "vs_cudnn": _ratio(rows, setting, seq, pas, "cudnn"),
                     "cs_vs_fla": _ratio(rows, setting, seq, pas, "fla_cs", ours="nsa_cs")}
            ratios.append(entry)

    def pick(seq, pas, key="vs_flash_triton"):
        vals = [e[key] for e in ratios if e["seq"] == seq and e["pass"] == pas and e[key] is not None]
        return min(vals) if vals else None

    def worst(pas):
        vals = [e["cs_vs_fla"] for e in ratios if e["pass"] == pas and e["cs_vs_fla"] is not None]
        return min(vals) if vals else None

    metrics = {"fwd_vs_flash_16k": pick(16384, "fwd"), "fwdbwd_vs_flash_16k": pick(16384, "fwd+bwd"),
               "fwd_vs_flash_64k": pick(65536, "fwd"), "fwdbwd_vs_flash_64k": pick(65536, "fwd+bwd"),
               "fwd_vs_fla_min": worst("fwd"), "fwdbwd_vs_fla_min": worst("fwd+bwd"),
               "decode_vs_flash_64k": pick(65536, "decode")}
    targets = {name: {"metric": m, "at_least": bound, "value": metrics[m],
                      "met": None if metrics[m] is None else metrics[m] >= bound}
               for name, (m, bound) in TARGETS.items()}
    return {"metrics": metrics, "targets": targets, "ratios": ratios}


def _measure(fns: dict, q, k, v, do, pas: str, rounds_n: int, cuda: bool) -> dict:
    from lmcore.bench.timing import Replay, rounds, spread

    q1 = q[:, :, -1:].detach().contiguous()
    out, timers = {}, {}
    for name, (fwd, dec) in fns.items():
        row = {"method": name, "pass": pas, "note": ""}
        if pas == "decode" and dec is None:
            continue
        if pas == "fwd":
            fn = lambda fwd=fwd: fwd(q, k, v)  # noqa: E731
        elif pas == "fwd+bwd":
            fn = lambda fwd=fwd: torch.autograd.grad(fwd(q, k, v), (q, k, v), do)  # noqa: E731
        else:
            fn = lambda dec=dec: dec(q1)  # noqa: E731
        try:
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            fn()  # warm-up: compile, tune
            if cuda:
                torch.cuda.synchronize()
                row["peak_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                timers[name] = Replay(fn)
                row["timing"] = timers[name].mode
                if timers[name].error:
                    row["note"] = f"not captured: {timers[name].error}"
            else:
                timers[name] = lambda fn=fn: _cpu_ms(fn)
                row["timing"] = "cpu"
        except Exception as err:  # noqa: BLE001 - record and go on
            row.update(ms=float("nan"), note=f"error: {type(err).__name__}: {str(err)[:200]}")
        out[name] = row
    for name, times in rounds(timers, rounds_n).items():
        st = spread(times)
        out[name].update(ms=round(st["median"], 4), ms_min=round(st["min"], 4), ms_max=round(st["max"], 4))
    for t in timers.values():
        if hasattr(t, "close"):
            t.close()
    return out


def _cpu_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def unmeasured(earlier: list[dict], rows: list[dict]) -> list[dict]:
    """The rows of an earlier file that this run did not measure again (setting, length and pass)."""
    done = {(r["setting"], r["seq"], r["pass"]) for r in rows}
    return [r for r in earlier if (r["setting"], r["seq"], r["pass"]) not in done]


def main(argv: list[str]) -> dict:
    args = _args(argv)
    from lmcore.bench import gpu_slug, provenance, write_results

    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        raise SystemExit("the NSA benchmark needs a CUDA GPU; on a CPU use --quick")
    unknown = sorted(set(args.settings.split(",")) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"--settings {args.settings!r}: unknown {unknown}; expected some of {sorted(SETTINGS)}")
    passes = args.passes.split(",")
    if set(passes) - {"fwd", "fwd+bwd", "decode"}:
        raise SystemExit(f"--passes {args.passes!r}: expected some of fwd, fwd+bwd, decode")
    seqs = [int(s) for s in args.seqs.split(",")] if not args.quick else [64, 128]
    device = torch.device("cuda" if cuda else "cpu")
    stem = f"nsa-{gpu_slug(torch.cuda.get_device_name()) if cuda else 'cpu'}"
    out_dir = Path(args.out_dir)
    write = cuda and not args.no_write
    earlier, runs = [], []
    if write and (out_dir / f"{stem}.json").exists():
        if args.resume:
            old = json.loads((out_dir / f"{stem}.json").read_text())
            earlier, runs = old["rows"], old.get("runs", [old["provenance"]])
        elif not args.overwrite:
            raise SystemExit(f"{out_dir / stem}.json exists; pass --resume to add to it, --overwrite to "
                             "replace it, or --out-dir elsewhere")
    dtype = torch.bfloat16 if cuda else torch.float32
    shown = ["book/results" if i and argv[i - 1] == "--out-dir" else a for i, a in enumerate(argv)]
    prov = provenance(" ".join(["python -m lmcore.bench nsa", *shown]))
    _, fla_error = _fla()
    rows, result = [], {}
    for setting in args.settings.split(","):
        s = SETTINGS[setting] if not args.quick else dict(hq=4, hkv=1, d=16)
        for seq in seqs:
            gen = torch.Generator(device=device).manual_seed(0)
            try:
                q, do = (torch.randn(1, s["hq"], seq, s["d"], device=device, dtype=dtype, generator=gen)
                         for _ in range(2))
                k, v = (torch.randn(1, s["hkv"], seq, s["d"], device=device, dtype=dtype, generator=gen)
                        for _ in range(2))
            except torch.cuda.OutOfMemoryError:
                break
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            fns = implementations(q, k, v, args.quick)
            for pas in passes:
                for row in _measure(fns, q, k, v, do, pas, args.rounds, cuda).values():
                    rows.append({"setting": setting, "seq": seq, "hq": s["hq"], "hkv": s["hkv"],
                                 "head_dim": s["d"], **row})
                    print(json.dumps(rows[-1], default=str), flush=True)
            del q, k, v, do, fns
            if cuda:
                torch.cuda.empty_cache()
            kept = unmeasured(earlier, rows)
            result = {**summarize(kept + rows), "rows": kept + rows, "provenance": prov, "runs": runs + [prov],
                      "settings": {"dtype": str(dtype), "batch": 1, "causal": True, "rounds": args.rounds,
                                   "fla_core": fla_error or "installed",
                                   "nsa": "paper sizes: cmp_block 32, stride 16, sel_block 64, top 16, window 512",
                                   "nsa_cs": "fla sizes: cmp = sel block 64, top 16, no window"}}
            if write:  # after every length, so a stopped run keeps what it measured
                result["files"] = write_results(out_dir, stem, FIELDS, kept + rows, result)
    return result
