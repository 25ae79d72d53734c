"""``python -m lmcore.kernels.profile --out DIR``: what limits the FlashAttention kernels, in one go.

On a CUDA GPU, in this order (each step can be skipped; each writes a text file under ``DIR``):

1. ``gpu-tests.txt``: the repository's GPU tests (``pytest -m gpu``, one session per test folder)
   and, with ``--kernels-on-cuda``, every kernel test on CUDA, with a per-test timeout.
2. ``ncu-*.txt/csv``: an Nsight Compute profile (speed of light, pipe use, occupancy, warp stalls)
   of our forward and backward kernels and of the cuDNN SDPA kernels at one shape (bf16, causal,
   head dim 128, T=4096 by default), only the launches inside a profiler range, after autotuning.
3. ``configs.txt``: every candidate configuration of each kernel launched directly (the forward's
   "scores one tile ahead" candidates too): time, registers, spills, shared memory and the
   matrix and special-function instructions in its machine code.
4. ``outlier.txt``: the backward at T=512 against T=1024, per kernel, with the tile sizes tuned on
   the timed shape and on a small shape first (the order of the recorded benchmark).
5. ``variants.txt`` (only with ``--variants``): kernel variants that may not compile or may hang on
   a given Triton (warp-specialized loops, for example), each launched in its own process with a
   time limit, timed against cuDNN and our autotuned kernels at a few shapes, with its error.

Nothing here runs without CUDA; the functions are importable for a notebook or a test.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

NCU_SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats",
                "SchedulerStats", "MemoryWorkloadAnalysis")


def _inputs(b, h, t, d, grad=False, layout="bhtd"):
    import torch

    def make():
        if layout == "bthd":  # the layout a model produces, viewed as (B, H, T, D): non-contiguous
            x = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        else:
            x = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)  # (B, H, T, D)
        return x.requires_grad_(grad)

    return make(), make(), make(), make().detach()


def _shape(t, d, tokens=16384, width=2048):
    """Batch and heads of the benchmark's rows: a fixed number of tokens and model width."""
    return max(1, tokens // t), max(1, width // d)


# ----------------------------------------------------------------------------- 1. tests
def run_gpu_tests(out: Path, timeout_s: float, per_test_s: int = 240, kernels_on_cuda: bool = False) -> str:
    """Run the GPU tests of the whole repository (one pytest session per test folder, since two
    folders hold modules of the same name); optionally every kernel test on CUDA too."""
    try:
        import xdist  # noqa: F401
        has_xdist = True
    except ImportError:
        has_xdist = False
    tests = Path("tests")
    targets = [str(p) for p in sorted(tests.iterdir()) if p.is_dir() and not p.name.startswith(("_", "."))]
    targets += [str(p) for p in sorted(tests.glob("test_*.py"))]
    runs = [[t, "-m", "gpu"] for t in targets]
    if kernels_on_cuda:
        runs.append(["tests/kernels", "-m", "not gpu"])
    log, summary = [], []
    start = time.time()
    for sel in runs:
        left = timeout_s - (time.time() - start)
        if left < 20:
            summary.append(f"{' '.join(sel)}: not run (time budget spent)")
            continue
        par = ["-n", "4"] if has_xdist and sel[0] == "tests/kernels" else []
        cmd = [sys.executable, "-m", "pytest", *sel, "-q", "-x", "-p", "no:cacheprovider", "-rfEs",
               f"--timeout={per_test_s}", *par]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as err:
            text = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            rc = "timeout"
        log.append(f"$ {' '.join(cmd)}\n{text}\n[exit {rc}]\n")
        last = [ln for ln in text.splitlines() if re.search(r"passed|failed|error|skipped|selected|no tests", ln)]
        summary.append(f"{' '.join(sel)}: {last[-1] if last else '(no summary)'} [exit {rc}]")
    (out / "gpu-tests.txt").write_text("\n".join(summary) + "\n\n" + "\n".join(log))
    return "\n".join(summary)


# ----------------------------------------------------------------------------- 2. ncu
def ncu_binary() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    cands = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return cands[-1] if cands else None


def ncu_workload(d: int, t: int, causal: bool) -> None:
    """The profiled program: autotune and warm up outside the profiler range, then run each
    kernel once inside it (ours forward, ours backward, cuDNN forward, cuDNN backward)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmcore.kernels import flash_attention

    b, h = _shape(t, d)
    q, k, v, do = _inputs(b, h, t, d, grad=True)
    for _ in range(2):  # autotune, compile, pick cuDNN plans
        flash_attention(q, k, v, causal=causal).backward(do)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(do)
    q.grad = k.grad = v.grad = None
    ours = flash_attention(q, k, v, causal=causal)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    with torch.no_grad():
        flash_attention(q, k, v, causal=causal)  # our forward
    ours.backward(do)  # delta, dK/dV, dQ
    q.grad = k.grad = v.grad = None
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # cuDNN forward
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        theirs.backward(do)  # cuDNN backward
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


_SUMMARY_COLS = [
    ("ms", "gpu__time_duration.sum", 1e-6),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("DRAM %", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("regs", "launch__registers_per_thread", 1),
    ("smem KB", "launch__shared_mem_per_block", 1 / 1024),
    ("threads", "launch__block_size", 1),
    ("warps act %", "sm__warps_active.avg.pct_of_peak_sustained_active", 1),
    ("issue %", "sm__inst_issued.avg.pct_of_peak_sustained_active", 1),
]


def _ncu_summary(raw_csv: str) -> str:
    """One block per kernel: time, throughput, resources, the busiest pipes and the top warp stalls."""
    rows = list(csv.reader(io.StringIO(raw_csv)))
    start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if start is None:
        return "no kernels in the ncu report\n"
    head, units, data = rows[start], rows[start + 1], rows[start + 2:]
    col = {name: i for i, name in enumerate(head)}
    lines = []
    for r in data:
        if len(r) != len(head):
            continue

        def val(name, mul=1.0):
            i = col.get(name)
            try:
                return float(r[i].replace(",", "")) * mul if i is not None else None
            except ValueError:
                return None

        name = r[col["Kernel Name"]][:90]
        dur_unit = units[col["gpu__time_duration.sum"]] if "gpu__time_duration.sum" in col else "ns"
        scale = {"ns": 1e-6, "us": 1e-3, "usecond": 1e-3, "nsecond": 1e-6, "ms": 1.0, "msecond": 1.0}.get(dur_unit, 1e-6)
        parts = []
        for label, metric, mul in _SUMMARY_COLS:
            x = val(metric, scale if label == "ms" else mul)
            if x is not None:
                parts.append(f"{label} {x:.3g}")
        pipes = sorted(((val(h), h) for h in head if re.match(r"sm__(inst_executed_)?pipe_.*pct_of_peak", h)),
                       key=lambda p: -(p[0] or 0))
        pipes = [f"{re.sub(r'sm__|_cycles_active|inst_executed_|.avg.pct_of_peak_sustained_active', '', h)} "
                 f"{x:.1f}%" for x, h in pipes[:6] if x]
        stalls = sorted(((val(h), h) for h in head
                         if h.startswith("smsp__average_warps_issue_stalled_") and h.endswith("_per_issue_active.ratio")),
                        key=lambda p: -(p[0] or 0))
        stalls = [f"{h[len('smsp__average_warps_issue_stalled_'):-len('_per_issue_active.ratio')]} {x:.2f}"
                  for x, h in stalls[:6] if x]
        lines += [f"== {name}", "   " + ", ".join(parts), "   pipes: " + ", ".join(pipes),
                  "   stalls (warps per issue): " + ", ".join(stalls)]
    return "\n".join(lines) + "\n"


def ncu_profile(out: Path, d: int = 128, t: int = 4096, causal: bool = True, timeout_s: float = 240) -> str:
    """Profile ``ncu_workload`` under Nsight Compute; writes ncu-details.txt, ncu-raw.csv, ncu-summary.txt."""
    ncu = ncu_binary()
    if ncu is None:
        return "ncu not found"
    rep = Path("/tmp/lmcore-flash.ncu-rep")
    sections = [a for s in NCU_SECTIONS for a in ("--section", s)]
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
           *sections, "-c", "12", "-f", "-o", str(rep.with_suffix("")),
           sys.executable, "-m", "lmcore.kernels.profile", "--workload", f"{d},{t},{int(causal)}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        log = proc.stdout[-4000:] + proc.stderr[-4000:]
    except subprocess.TimeoutExpired:
        log = "ncu timed out"
    if not rep.exists():
        (out / "ncu-summary.txt").write_text(log)
        return "ncu wrote no report:\n" + log[-1500:]
    details = subprocess.run([ncu, "--import", str(rep), "--page", "details"], capture_output=True, text=True).stdout
    raw = subprocess.run([ncu, "--import", str(rep), "--page", "raw", "--csv"], capture_output=True, text=True).stdout
    (out / "ncu-details.txt").write_text(details)
    (out / "ncu-raw.csv").write_text(raw)
    summary = f"shape: bf16, causal={causal}, d={d}, T={t}, (B, H) = {_shape(t, d)}\n" + _ncu_summary(raw)
    (out / "ncu-summary.txt").write_text(summary + "\n--- ncu log\n" + log)
    return summary


# ----------------------------------------------------------------------------- 3. configurations
def _resources(handle) -> dict:
    """Registers, spills, shared memory, and instruction counts in the SASS of a compiled kernel."""
    info = {"regs": getattr(handle, "n_regs", None), "spills": getattr(handle, "n_spills", None),
            "smem_kb": round(handle.metadata.shared / 1024, 1) if hasattr(handle, "metadata") else None}
    try:
        sass = handle.asm["sass"]
        for op in ("HGMMA", "HMMA", "MUFU.EX2", "LDL", "STL", "LDGSTS", "UTMALDG"):
            info[op] = len(re.findall(rf"\b{re.escape(op)}\b", sass))
    except Exception as err:  # noqa: BLE001 - SASS needs the disassembler; report, don't fail
        info["sass"] = f"unavailable: {type(err).__name__}"
    return info


def config_report(d: int, t: int, causal: bool, extra: dict | None = None) -> list[dict]:
    """Time each candidate configuration of each kernel at one shape, with its resources.

    For ``dkdv`` and ``dq`` the whole backward is timed (the other kernel fixed at its first
    candidate), so differences between rows of one kind are that kernel's.
    """
    import torch
    from triton.testing import do_bench

    from lmcore.kernels import flash_triton as ft

    b, h = _shape(t, d)
    q, k, v, do = _inputs(b, h, t, d)
    scale = d ** -0.5
    group = "small" if d <= 64 else "large"
    rows = []
    out, lse2 = ft.flash_forward_triton(q, k, v, causal, scale)
    for kind in ("fwd", "dkdv", "dq"):
        entries = list(ft._CANDIDATES[kind][group]) + list((extra or {}).get(kind, []))
        fixed = {other: ft._CANDIDATES[other][group][0] for other in ("dkdv", "dq") if other != kind}
        for entry in entries:
            row = {"kind": kind, "d": d, "T": t, "causal": causal, "config": list(entry)}
            try:
                with ft.forced_configs(**{kind: tuple(entry)}, **({} if kind == "fwd" else fixed)):
                    if kind == "fwd":
                        fn = lambda: ft.flash_forward_triton(q, k, v, causal, scale)  # noqa: E731
                    else:
                        fn = lambda: ft.flash_backward_triton(q, k, v, out, lse2, do, causal, scale)  # noqa: E731
                    fn()
                    torch.cuda.synchronize()
                    row["ms"] = round(do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)
                    row.update(_resources(ft.LAST_COMPILED[kind]))
            except Exception as err:  # noqa: BLE001 - out of resources, for example
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
            rows.append(row)
            print("  config", json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- 4. the T=512 outlier
def _per_kernel_ms(fn, iters=10) -> dict:
    """Device time per kernel name (ms per call of ``fn``), from the PyTorch profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0)
        if us:
            out[ev.key[:60]] = round(us / 1000 / iters, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def outlier_report(d: int = 64) -> dict:
    """fwd+bwd at T=512 and 1024 (benchmark shapes), tuned on the timed shape or on a small one first."""
    import torch
    from triton.testing import do_bench

    from lmcore.kernels import flash_attention
    from lmcore.kernels import flash_triton as ft

    def clear():
        for kern in (ft._fwd_kernel, ft._bwd_dkdv_kernel, ft._bwd_dq_kernel):
            kern.cache.clear()

    def step_fn(t, layout="bhtd", b=None, h=None):
        bb, hh = _shape(t, d)
        q, k, v, do = _inputs(b or bb, h or hh, t, d, grad=True, layout=layout)

        def step():
            flash_attention(q, k, v, causal=True).backward(do)
        return step, (q, k, v)

    report = {}
    for label, warm in (("tuned on the timed shape", None),
                        ("tuned first on (16, 4, 512, 64), non-contiguous (the training check)", "small")):
        clear()
        if warm:
            small, _ = step_fn(512, layout="bthd", b=16, h=4)
            small()
        for t in (512, 1024, 512):
            step, tensors = step_fn(t)
            step()
            ms = do_bench(step, rep=100, grad_to_none=list(tensors), return_mode="median")
            report.setdefault(label, []).append(
                {"T": t, "fwd+bwd ms": round(ms, 4), "per kernel ms": _per_kernel_ms(step),
                 "choices": [c for c in ft.autotune_choices() if c["seq_bucket"] == t]})
            torch.cuda.synchronize()
    return report


# ----------------------------------------------------------------------------- 5. variants
#: Configurations tried by ``--variants`` (kind -> entries as in ``flash_triton._CANDIDATES``).
VARIANTS = {
    "fwd": [(128, 128, 4, 2, "ws"), (128, 64, 4, 2, "ws"), (64, 128, 4, 2, "ws")],
    "dkdv": [(64, 128, 4, 2, "ws"), (64, 64, 4, 2, "ws"), (32, 128, 4, 2, "ws"), (128, 128, 4, 2, "ws"),
             (32, 64, 4, 3)],
}


def _sdpa_ms(q, k, v, do, causal, backend, backward):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    f = torch.nn.functional.scaled_dot_product_attention
    with sdpa_kernel(be):
        if backward:
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            fn = lambda: f(qq, kk, vv, is_causal=causal).backward(do)  # noqa: E731
            return do_bench(fn, warmup=25, rep=100, grad_to_none=[qq, kk, vv], return_mode="median")
        return do_bench(lambda: f(q, k, v, is_causal=causal), warmup=25, rep=100, return_mode="median")


def _variant_rows(kind: str, entry, shapes) -> list[dict]:
    """Time one forced configuration at each shape (in this process), with its error against SDPA."""
    import torch
    from triton.testing import do_bench

    from lmcore.kernels import flash_triton as ft

    rows = []
    for d, t, causal in shapes:
        b, h = _shape(t, d)
        q, k, v, do = _inputs(b, h, t, d)
        scale = d ** -0.5
        row = {"kind": kind, "config": list(entry), "d": d, "T": t, "causal": bool(causal)}
        try:
            with ft.forced_configs(**{kind: tuple(entry)}):
                out, lse2 = ft.flash_forward_triton(q, k, v, causal, scale)
                if kind == "fwd":
                    fn = lambda: ft.flash_forward_triton(q, k, v, causal, scale)  # noqa: E731
                else:
                    fn = lambda: ft.flash_backward_triton(q, k, v, out, lse2, do, causal, scale)  # noqa: E731
                got = fn()
                torch.cuda.synchronize()
                row["ms"] = round(do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)
                row.update(_resources(ft.LAST_COMPILED[kind]))
                row["tma"] = ft._use_tma(q, k, v, want=True)
            qq, kk, vv = (x.detach().float().requires_grad_() for x in (q, k, v))
            ref = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=bool(causal))
            if kind == "fwd":
                row["max_err"] = float((got[0].float() - ref).abs().max())
            else:
                ref.backward(do.float())
                errs = [float((g.float() - r.grad).abs().max() / r.grad.abs().max()) for g, r in zip(got, (qq, kk, vv))]
                row["rel_err_dq_dk_dv"] = [round(e, 5) for e in errs]
        except Exception as err:  # noqa: BLE001 - compile errors of an experimental path
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        rows.append(row)
        print("  variant", json.dumps(row), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


def variant_report(shapes_fwd, shapes_bwd, timeout_s: float = 150, budget_s: float = 400) -> list[dict]:
    """Baselines (cuDNN, FlashAttention-2, our autotuned kernels) in this process, then each entry of
    ``VARIANTS`` in a child process with a time limit (a variant may hang or crash the context)."""
    import torch
    from triton.testing import do_bench

    from lmcore.kernels import flash_triton as ft

    start = time.time()
    rows = []
    for shapes, backward in ((shapes_fwd, False), (shapes_bwd, True)):
        for d, t, causal in shapes:
            b, h = _shape(t, d)
            q, k, v, do = _inputs(b, h, t, d)
            scale = d ** -0.5
            row = {"kind": "baseline", "d": d, "T": t, "causal": bool(causal), "pass": "bwd" if backward else "fwd"}
            for be in ("cudnn", "flash"):
                row[f"{be}_ms"] = round(_sdpa_ms(q, k, v, do, bool(causal), be, backward), 4)
            for ws in ("0", "1"):  # autotuned without, then with, the warp-specialized candidates
                os.environ[ft.WS_ENV] = ws
                for kern in (ft._fwd_kernel, ft._bwd_dkdv_kernel, ft._bwd_dq_kernel):
                    kern.cache.clear()
                tag = "" if ws == "1" else "_nows"
                out, lse2 = ft.flash_forward_triton(q, k, v, causal, scale)
                if backward:
                    fn = lambda: ft.flash_backward_triton(q, k, v, out, lse2, do, causal, scale)  # noqa: E731
                    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                    step = lambda: ft.flash_attention(qq, kk, vv, causal=bool(causal)).backward(do)  # noqa: E731
                    step()
                    row[f"ours{tag}_fwd+bwd_ms"] = round(do_bench(step, warmup=25, rep=100, grad_to_none=[qq, kk, vv],
                                                                  return_mode="median"), 4)
                else:
                    fn = lambda: ft.flash_forward_triton(q, k, v, causal, scale)  # noqa: E731
                fn()
                row[f"ours{tag}_ms"] = round(do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)
                row[f"choices{tag}"] = [f"{c['kernel']}: {c.get('BLOCK_M', c.get('BLOCK_M1', c.get('BLOCK_M2')))}x"
                                        f"{c.get('BLOCK_N', c.get('BLOCK_N1', c.get('BLOCK_N2')))} "
                                        f"w{c['num_warps']} s{c['num_stages']}{' ws' if c.get('WS') else ''}"
                                        for c in ft.autotune_choices() if c["head_dim"] == d
                                        and c["causal"] == bool(causal) and c["seq_bucket"] == t]
            rows.append(row)
            print("  baseline", json.dumps(row), flush=True)
    for kind, entries in VARIANTS.items():
        shapes = shapes_fwd if kind == "fwd" else shapes_bwd
        for entry in entries:
            left = budget_s - (time.time() - start)
            if left < 30:
                rows.append({"kind": kind, "config": list(entry), "error": "not run (time budget spent)"})
                continue
            arg = json.dumps({"kind": kind, "entry": list(entry), "shapes": shapes})
            try:
                proc = subprocess.run([sys.executable, "-m", "lmcore.kernels.profile", "--variant-child", arg],
                                      capture_output=True, text=True, timeout=min(timeout_s, left),
                                      env={**os.environ, "LMCORE_FLASH_TUNE": "first"})
                got = [json.loads(line.split("  variant ", 1)[1]) for line in proc.stdout.splitlines()
                       if line.startswith("  variant ")]
                rows += got
                for line in (l for l in proc.stdout.splitlines() if l.startswith("  variant ")):
                    print(line, flush=True)
                if proc.returncode != 0:
                    rows.append({"kind": kind, "config": list(entry), "error": f"exit {proc.returncode}: "
                                 + (proc.stderr.strip().splitlines() or [""])[-1][:200]})
                    print("  variant failed", rows[-1], flush=True)
            except subprocess.TimeoutExpired:
                rows.append({"kind": kind, "config": list(entry), "error": f"timed out after {timeout_s:.0f} s"})
                print("  variant timed out", entry, flush=True)
    return rows


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m lmcore.kernels.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="profile-out", help="directory for the reports")
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)  # "d,T,causal": the ncu child
    ap.add_argument("--skip", nargs="*", default=[], choices=("tests", "ncu", "configs", "outlier"))
    ap.add_argument("--kernels-on-cuda", action="store_true", help="also run every kernel test on CUDA")
    ap.add_argument("--tests-timeout", type=float, default=270, help="seconds for all the test runs")
    ap.add_argument("--ncu-shape", default="128,4096,1", help="d,T,causal of the ncu profile")
    ap.add_argument("--config-shapes", default="128,4096,1;64,4096,1", help="d,T,causal;... of the config sweep")
    ap.add_argument("--budget", type=float, default=520, help="seconds: later steps are skipped past this")
    ap.add_argument("--variants", action="store_true", help="also time the experimental kernel variants")
    ap.add_argument("--variant-shapes", default="64,4096,1;64,8192,1;128,4096,1;128,8192,1;128,8192,0|128,4096,1;128,8192,1;64,8192,1",
                    help="forward shapes | backward shapes, each d,T,causal;...")
    ap.add_argument("--variant-child", default=None, help=argparse.SUPPRESS)  # one variant, in its own process
    args = ap.parse_args(argv)
    if args.variant_child:
        spec = json.loads(args.variant_child)
        _variant_rows(spec["kind"], tuple(spec["entry"]), [tuple(s) for s in spec["shapes"]])
        return {}
    if args.workload:
        d, t, c = (int(x) for x in args.workload.split(","))
        ncu_workload(d, t, bool(c))
        return {}
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("lmcore.kernels.profile needs a CUDA GPU")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name()}
    t0 = time.time()
    if "tests" not in args.skip:
        result["tests"] = run_gpu_tests(out, args.tests_timeout, kernels_on_cuda=args.kernels_on_cuda)
        print("== GPU tests\n" + result["tests"], f"\n({time.time() - t0:.0f} s)", flush=True)
    if "ncu" not in args.skip:
        d, t, c = (int(x) for x in args.ncu_shape.split(","))
        result["ncu"] = ncu_profile(out, d, t, bool(c))
        print("== ncu\n" + result["ncu"], f"\n({time.time() - t0:.0f} s)", flush=True)
    if "configs" not in args.skip:
        from lmcore.kernels import flash_triton as ft

        rows = []
        for shape in args.config_shapes.split(";"):
            if time.time() - t0 > args.budget - 150:
                print("configs: time budget spent, skipping", shape, flush=True)
                continue
            d, t, c = (int(x) for x in shape.split(","))
            group = "small" if d <= 64 else "large"
            rows += config_report(d, t, bool(c), extra={"fwd": ft._AHEAD_CANDIDATES[group]})
        (out / "configs.txt").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        result["configs"] = rows
        print(f"== configs ({time.time() - t0:.0f} s)", flush=True)
    if args.variants:
        fwd_spec, bwd_spec = args.variant_shapes.split("|")
        parse = lambda spec: [[int(x) for x in sh.split(",")] for sh in spec.split(";") if sh]  # noqa: E731
        rows = variant_report(parse(fwd_spec), parse(bwd_spec), budget_s=max(60.0, args.budget - (time.time() - t0)))
        (out / "variants.txt").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        result["variants"] = rows
        print(f"== variants ({time.time() - t0:.0f} s)", flush=True)
    if "outlier" not in args.skip and time.time() - t0 > args.budget - 80:
        print("outlier: time budget spent, skipped", flush=True)
    elif "outlier" not in args.skip:
        rep = outlier_report()
        (out / "outlier.txt").write_text(json.dumps(rep, indent=1))
        result["outlier"] = {k: [(r["T"], r["fwd+bwd ms"]) for r in v] for k, v in rep.items()}
        print("== T=512 outlier (T, fwd+bwd ms):", json.dumps(result["outlier"]), f"({time.time() - t0:.0f} s)",
              flush=True)
    return result


if __name__ == "__main__":
    main()
