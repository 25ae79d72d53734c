"""The DDP benchmark: the profiler-trace split on a hand-made trace, and a --quick run on CPU."""

from __future__ import annotations

import csv
import json

import pytest

from lmcore.bench import ddp as bench


def _trace():
    """Two annotated phases; compute 0-100 and 150-200 us, communication 80-170 us (launched in backward)."""
    ev = [
        {"ph": "X", "cat": "user_annotation", "name": "forward", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "user_annotation", "name": "backward", "ts": 10, "dur": 60},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1, "dur": 1, "args": {"correlation": 1}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 20, "dur": 1, "args": {"correlation": 2}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 30, "dur": 1, "args": {"correlation": 3}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 100, "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "gemm_bwd", "ts": 150, "dur": 50, "args": {"correlation": 2}},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "ts": 80, "dur": 90,
         "args": {"correlation": 3}},
    ]
    return ev


def test_split_trace_separates_exposed_communication():
    split, timeline = bench.split_trace(_trace(), nsteps=1)
    assert split["compute_ms"] == pytest.approx(0.150)  # 100 + 50 us
    assert split["comm_ms"] == pytest.approx(0.090)
    assert split["exposed_comm_ms"] == pytest.approx(0.050)  # 100..150 us is communication alone
    lanes = {(lane, phase) for lane, phase, _, _ in timeline["intervals"]}
    assert lanes == {("compute", "forward"), ("compute", "backward"), ("comm", "backward")}
    assert min(s for _, _, s, _ in timeline["intervals"]) == 0.0


def test_quick_run_writes_results(tmp_path):
    result = bench.main(["--quick", "--out-dir", str(tmp_path), "--bucket-sizes", "0.001", "1",
                         "--steps", "1"])
    assert result["error"] is None
    with open(result["files"]["csv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kinds = {(r["kind"], r["sharded"]) for r in rows}
    assert {("single", "False"), ("naive", "False"), ("overlapped", "False"), ("bucketed", "False"),
            ("torch", "False"), ("bucketed", "True")} <= kinds
    assert all(r["status"] == "ok" and float(r["tokens_per_s"]) > 0 for r in rows)
    metrics = result["metrics"]["tiny"]
    assert 0.4 < metrics["sharded_opt_state_ratio"] < 0.6  # about half of AdamW's state per rank
    with open(result["files"]["json"], encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["provenance"]["world_size"] == 2 and saved["provenance"]["backend"] == "gloo"
    with open(result["files"]["allreduce"], encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="--models 'huge'"):
        bench.main(["--quick", "--models", "huge"])
    with pytest.raises(ValueError, match="--world-size=1"):
        bench.main(["--quick", "--world-size", "1"])
