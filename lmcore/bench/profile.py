"""``python -m lmcore.bench profile [--ncu] [--configs] --out-dir DIR``: what limits the FlashAttention kernels.

Two tools for whoever re-tunes the kernels of chapter 4, on a CUDA GPU:

* ``--configs``: every tile candidate of each kernel launched at one shape (bf16), with its time
  and what the compiler gave it: registers, spills, shared memory, and the count of matrix
  (``HGMMA``/``HMMA``), exponential (``MUFU.EX2``) and local-memory (``LDL``/``STL``) instructions
  in its machine code. Writes ``configs.json``.
* ``--ncu``: Nsight Compute on one forward and backward of ours and of cuDNN's SDPA at that shape,
  only the launches inside a profiler range (after autotuning, clocks left alone); writes the raw
  CSV and ``ncu-summary.txt``: per kernel its time, throughput, resources, busiest pipes and top
  warp stalls.

Without CUDA the command says so and exits; ``ncu_summary`` parses a report anywhere.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

NCU_SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats",
                "SchedulerStats", "MemoryWorkloadAnalysis")
_SUMMARY_COLS = [("ms", "gpu__time_duration.sum"), ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
                 ("DRAM %", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
                 ("regs", "launch__registers_per_thread"), ("threads", "launch__block_size"),
                 ("issue %", "sm__inst_issued.avg.pct_of_peak_sustained_active")]
_STALL = ("smsp__average_warps_issue_stalled_", "_per_issue_active.ratio")
_TIME_UNITS = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}


def _inputs(t: int, d: int, tokens: int = 16384, width: int = 2048):
    """bf16 ``q, k, v, dO`` of the benchmark's shape family: ``batch * t = tokens``, ``heads * d = width``."""
    import torch

    b, h = max(1, tokens // t), max(1, width // d)
    q, k, v, do = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    return [x.requires_grad_() for x in (q, k, v)] + [do]


def ncu_summary(raw_csv: str) -> str:
    """One block per kernel of an ``ncu --page raw --csv`` report: time, throughput, resources,
    the busiest pipes and the top warp stalls (warps stalled per issued instruction)."""
    rows = list(csv.reader(io.StringIO(raw_csv)))
    start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if start is None:
        return "no kernels in the ncu report\n"
    head, units, data = rows[start], rows[start + 1], rows[start + 2:]
    col = {name: i for i, name in enumerate(head)}
    lines = []
    for r in (r for r in data if len(r) == len(head)):
        def val(name):
            try:
                return float(r[col[name]].replace(",", "")) if name in col else None
            except ValueError:
                return None

        parts = []
        for label, metric in _SUMMARY_COLS:
            x = val(metric)
            if x is not None:
                parts.append(f"{label} {x * (_TIME_UNITS.get(units[col[metric]], 1e-6) if label == 'ms' else 1):.3g}")
        pipes = sorted(((val(h) or 0, h) for h in head if re.match(r"sm__(inst_executed_)?pipe_.*pct_of_peak", h)),
                       reverse=True)
        stalls = sorted(((val(h) or 0, h[len(_STALL[0]):-len(_STALL[1])]) for h in head
                         if h.startswith(_STALL[0]) and h.endswith(_STALL[1])), reverse=True)
        lines += [f"== {r[col['Kernel Name']][:90]}", "   " + ", ".join(parts),
                  "   pipes: " + ", ".join(f"{re.sub(r'sm__|_cycles_active|inst_executed_|.avg.pct.*', '', h)} "
                                           f"{x:.1f}%" for x, h in pipes[:6] if x),
                  "   stalls (warps per issue): " + ", ".join(f"{h} {x:.2f}" for x, h in stalls[:6] if x)]
    return "\n".join(lines) + "\n"


def ncu_workload(t: int, d: int, causal: bool) -> None:
    """The profiled program: autotune and warm up outside the profiler range, then run our forward
    and backward and cuDNN's once each inside it."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmcore.kernels import flash_attention

    q, k, v, do = _inputs(t, d)
    cudnn = sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    for _ in range(2):
        flash_attention(q, k, v, causal=causal).backward(do)
        with cudnn:
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(do)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    flash_attention(q, k, v, causal=causal).backward(do)
    with cudnn:
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(do)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def ncu_profile(out: Path, t: int, d: int, causal: bool, timeout_s: float = 300) -> str:
    """Run :func:`ncu_workload` under Nsight Compute; writes ``ncu-raw.csv`` and ``ncu-summary.txt``."""
    ncu = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)), None)
    if ncu is None:
        return "ncu not found"
    rep = out / "profile.ncu-rep"
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
           *[a for s in NCU_SECTIONS for a in ("--section", s)], "-f", "-o", str(rep.with_suffix("")),
           sys.executable, "-m", "lmcore.bench", "profile", "--workload", "--seq", str(t), "--head-dim", str(d)]
    cmd += [] if causal else ["--not-causal"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if not rep.exists():
        return "ncu wrote no report:\n" + (proc.stdout + proc.stderr)[-1500:]
    raw = subprocess.run([ncu, "--import", str(rep), "--page", "raw", "--csv"], capture_output=True, text=True).stdout
    (out / "ncu-raw.csv").write_text(raw)
    summary = f"bf16, causal={causal}, d={d}, T={t}\n" + ncu_summary(raw)
    (out / "ncu-summary.txt").write_text(summary)
    return summary


def resources(handle) -> dict:
    """Registers, spills, shared memory and instruction counts in the machine code of a compiled kernel."""
    info = {"regs": getattr(handle, "n_regs", None), "spills": getattr(handle, "n_spills", None),
            "smem_kb": round(handle.metadata.shared / 1024, 1) if hasattr(handle, "metadata") else None}
    try:
        sass = handle.asm["sass"]
    except Exception as err:  # noqa: BLE001 - SASS needs the disassembler; report, don't fail
        return {**info, "sass": f"unavailable: {type(err).__name__}"}
    return {**info, **{op: len(re.findall(rf"\b{re.escape(op)}\b", sass))
                       for op in ("HGMMA", "HMMA", "MUFU.EX2", "LDL", "STL")}}


def config_report(t: int, d: int, causal: bool) -> list[dict]:
    """Time each tile candidate of each kernel at one shape, with its resources. For ``dkdv`` and
    ``dq`` the whole backward is timed with the other kernel forced to its first candidate."""
    import torch
    from triton.testing import do_bench

    from lmcore.kernels import flash_triton as ft
    from lmcore.kernels.common import head_class

    q, k, v, do = (x.detach() for x in _inputs(t, d))
    scale, group = d ** -0.5, head_class(d)
    out, lse = ft.forward_portable(q, k, v, causal, scale)
    rows = []
    for kind in ("fwd", "dkdv", "dq"):
        fixed = {other: ft.CANDIDATES[other][group][0] for other in ("dkdv", "dq") if other != kind}
        for entry in ft.CANDIDATES[kind][group]:
            row = {"kernel": kind, "head_dim": d, "seq": t, "causal": causal, "config": list(entry)}
            if kind == "fwd":
                fn = lambda: ft.forward_portable(q, k, v, causal, scale)  # noqa: E731
            else:
                fn = lambda: ft.flash_backward_triton(q, k, v, out, lse, do, causal, scale)  # noqa: E731
            try:
                with ft.flash_tuning(**{kind: entry}, **({} if kind == "fwd" else fixed)):
                    fn()
                    torch.cuda.synchronize()
                    row["ms"] = round(do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)
                    row.update(resources(ft.LAST_COMPILED[kind]))
            except Exception as err:  # noqa: BLE001 - out of resources, for example
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
            rows.append(row)
    return rows


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m lmcore.bench profile", description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default="profile", help="where the reports go")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=128, choices=(16, 32, 64, 128))
    ap.add_argument("--not-causal", action="store_true")
    ap.add_argument("--configs", action="store_true", help="time every tile candidate, with its resources")
    ap.add_argument("--ncu", action="store_true", help="profile under Nsight Compute")
    ap.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)  # the program ncu runs
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seq <= 0:
        ap.error(f"--seq must be positive, got {args.seq}")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("profiling the kernels needs a CUDA GPU")
    causal = not args.not_causal
    if args.workload:
        ncu_workload(args.seq, args.head_dim, causal)
        return {}
    from lmcore.bench import provenance

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"provenance": provenance(), "metrics": {}}
    if args.configs:
        result["configs"] = config_report(args.seq, args.head_dim, causal)
        (out / "configs.json").write_text(json.dumps(result["configs"], indent=1))
    if args.ncu:
        result["ncu_summary"] = ncu_profile(out, args.seq, args.head_dim, causal)
    return result
