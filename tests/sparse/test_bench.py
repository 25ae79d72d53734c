"""The sparse benchmark's pure parts (the measurements themselves need a GPU)."""

import pytest
import torch

from lmcore.bench import sparse as bench
from lmcore.sparse import make_layout


@pytest.mark.parametrize("seq", [1024, 4096, 16384])
@pytest.mark.parametrize("quick, short", [(False, False), (False, True), (True, False)])
def test_each_case_is_planned_once(seq, quick, short):
    cases = bench.patterns_for(seq, 128, quick, short)
    assert len(cases) == len({(n, tuple(sorted(p.items()))) for n, p in cases})
    assert ("local", {"window": 128}) in bench.patterns_for(1024, 128, False)  # 1/16 and 1/8 of 1k: one case


def test_patterns_span_five_to_fifty_percent():
    dens = [make_layout(n, 16384, 128, causal=True, **p).density for n, p in bench.patterns_for(16384, 128, False)]
    assert min(dens) < 0.07 and max(dens) > 0.45
    assert all(0 < d <= 0.51 for d in dens)


def test_summarize_ratios():
    base = {"params": "{}", "seq": 16384, "head_dim": 64, "note": ""}
    rows = [
        {**base, "method": "block_sparse", "pattern": "local", "pass": "fwd", "ms": 1.0, "density": 0.125,
         "work_ratio": 4.0},
        {**base, "method": "flex", "pattern": "local", "pass": "fwd", "ms": 1.5, "density": 0.125, "work_ratio": 4.0},
        {**base, "method": "flash_triton", "pattern": "dense", "pass": "fwd", "ms": 3.0, "density": 0.5,
         "work_ratio": 1.0},
    ]
    s = bench.summarize(rows)
    case = s["cases"][0]
    assert case["vs_flex"] == 1.5 and case["vs_dense"] == 3.0 and case["vs_dense_over_work"] == 0.75
    assert s["vs_flex_fwd_at_least_1"] == "1/1" and s["vs_dense_over_work_fwd_at_least_0.7"] == "1/1"
    assert "vs_flex_min" not in case  # no rounds kept: no range
    rows[0]["_rounds"], rows[1]["_rounds"] = [1.0, 1.0, 2.0], [1.5, 1.2, 1.8]
    case = bench.summarize(rows)["cases"][0]
    assert (case["vs_flex_min"], case["vs_flex_max"]) == (0.9, 1.5)
    assert "eager_over_graph" not in case  # no plain calls timed


def test_summarize_eager_calls():
    base = {"params": "{}", "seq": 8192, "head_dim": 64, "note": "", "pattern": "local", "pass": "fwd+bwd",
            "density": 0.125, "work_ratio": 4.0}
    rows = [{**base, "method": "block_sparse", "ms": 1.0, "eager_ms": 1.25},
            {**base, "method": "flex", "ms": 1.5, "eager_ms": 1.0}]
    s = bench.summarize(rows)
    case = s["cases"][0]
    assert case["eager_over_graph"] == 1.25 and case["vs_flex_eager"] == 0.8
    assert s["eager_over_graph_fwd+bwd_max_8k_up"] == 1.25
    assert s["eager_over_graph_fwd+bwd_at_most_1.1_8k_up"] == "0/1"
    assert s["vs_flex_eager_fwd+bwd_at_least_1"] == "0/1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_main_without_cuda_measures_nothing():
    out = bench.main(["--quick"])
    assert "skipped" in out and "CUDA" in out["skipped"]
