"""The sparse benchmark's pure parts (the measurements themselves need a GPU)."""

import pytest
import torch

from lmcore.bench import sparse as bench
from lmcore.sparse import make_layout


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
        {**base, "method": "flash_dense", "pattern": "dense", "pass": "fwd", "ms": 3.0, "density": 0.5,
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_main_without_cuda_measures_nothing():
    out = bench.main(["--quick"])
    assert "skipped" in out and "CUDA" in out["skipped"]
