"""``python -m lmcore.bench matrix --quick``: the whole backend x wrapper matrix on 2 gloo processes."""

from __future__ import annotations

import csv

import pytest

from lmcore.bench import BENCHMARKS, matrix

pytestmark = pytest.mark.timeout(180)


def test_quick_matrix_measures_every_backend_and_wrapper(tmp_path):
    result = matrix.main(["--quick", "--out-dir", str(tmp_path)])
    rows = result["rows"]
    assert [(r["backend"], r["wrapper"]) for r in rows] == [
        (b, w) for b in matrix.CPU_BACKENDS for w in matrix.WRAPPERS]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["world_size"] == 2
        assert r["scaling_efficiency"] > 0 and r["estimate_gb"] > 0
        if r["wrapper"] == "none":
            assert r["scaling_efficiency"] == 1.0
    assert result["metrics"]["failed"] == 0 and "matrix" in BENCHMARKS
    assert result["provenance"]["world_size"] == 2 and result["provenance"]["backend"] == "gloo"
    files = result["files"]
    with open(files["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(matrix.CSV_FIELDS) == set(table[0])
    by = {r["wrapper"]: r["estimate_gb"] for r in rows if r["backend"] == "sdpa"}
    assert by["zero1"] < by["torch"] == by["naive"] == by["bucketed"]  # ZeRO-1 shards the optimizer state
    assert by["fsdp"] != by["torch"]  # (tiny: what FSDP gathers, the embedding, outweighs what it shards)
    assert open(files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| sdpa | fsdp |" in open(files["report"]).read()


@pytest.mark.parametrize("argv,message", [
    (["--quick", "--backends", "flash_triton"], "backend 'flash_triton': expected one of sdpa"),
    (["--quick", "--wrappers", "zero3"], "wrapper 'zero3': expected one of"),
    (["--quick", "--world-size", "1"], "--world-size 1: expected 2 <="),
    (["--quick", "--seq", "40"], "--seq 40: expected a multiple of the block size 16"),
    (["--quick", "--model", "gpt5"], "model 'gpt5': expected one of tiny"),
    (["--quick", "--name", "../x"], "--name '../x'"),
])
def test_bad_settings_are_refused_before_any_process_starts(argv, message):
    with pytest.raises(SystemExit, match=message):
        matrix.make_config(matrix.parse_args(argv))
