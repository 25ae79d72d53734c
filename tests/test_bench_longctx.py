"""The long-context benchmark's quick mode: every part runs on CPU and reports what it measured."""

import json

from lmcore.bench.__main__ import main as cli


def test_longctx_quick_runs_every_part(tmp_path, capsys):
    out = tmp_path / "longctx.json"
    assert cli(["longctx", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    train = [r for r in rows if r["part"] == "train"]
    assert [(r["context"], r["checkpointing"]) for r in train] == [(64, False), (64, True), (128, False), (128, True)]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["estimate_gb"] > 0 for r in train)
    assert result["metrics"]["pythia_tokens_per_s_ratio_vs_transformers"] > 0
    gqa = [r for r in rows if r["part"] == "gqa"]
    assert len(gqa) == 2 and all(r["status"] == "ok" or r["status"].startswith("grouped K/V not supported")
                                 for r in gqa)
    assert result["provenance"]["command"].startswith("python -m lmcore.bench longctx --quick")
    assert not list(tmp_path.glob("longctx-*.csv"))  # a quick run records nothing in book/results


def _quick(out_dir, *extra):
    from lmcore.bench.longctx import main

    return main(["--quick", "--out-dir", str(out_dir), *extra])


def test_longctx_parts_write_after_every_case_and_resume(tmp_path, monkeypatch):
    import pytest

    import lmcore.bench.longctx as longctx

    result = _quick(tmp_path, "--parts", "train")
    saved = json.loads((tmp_path / "longctx-cpu-quick.json").read_text())
    assert [r["part"] for r in saved["rows"]] == ["train"] * 4
    assert {m["part"] for m in saved["missing"]} == {"pythia", "gqa"} and saved["missing"] == result["missing"]
    assert len((tmp_path / "longctx-cpu-quick.csv").read_text().splitlines()) == 5  # header + 4 rows
    with pytest.raises(SystemExit, match="already holds results; pass --resume"):
        _quick(tmp_path, "--parts", "gqa")
    assert json.loads((tmp_path / "longctx-cpu-quick.json").read_text()) == saved  # refused before any work

    calls = []
    real = longctx.gqa_kernel

    def stopped_after_one(*args):  # a run stopped by a time limit during its second GQA case
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(longctx, "gqa_kernel", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        _quick(tmp_path, "--parts", "gqa", "--resume")
    partial = json.loads((tmp_path / "longctx-cpu-quick.json").read_text())
    assert [r["part"] for r in partial["rows"]] == ["train"] * 4 + ["gqa"]  # the finished case was kept
    assert [(m["part"], m["context"]) for m in partial["missing"] if m["part"] != "pythia"] == [("gqa", 128)]

    monkeypatch.setattr(longctx, "gqa_kernel", real)
    final = _quick(tmp_path, "--parts", "pythia,gqa", "--resume")
    assert final["missing"] == [] and [r["part"] for r in final["rows"]] == ["train"] * 4 + ["pythia"] * 2 + ["gqa"] * 2
    assert [run["parts"] for run in final["runs"]] == [["train"], ["gqa"], ["pythia", "gqa"]]
    assert final["metrics"]["pythia_tokens_per_s_ratio_vs_transformers"] > 0
    assert json.loads((tmp_path / "longctx-cpu-quick.json").read_text())["rows"] == final["rows"]


def test_longctx_refuses_unknown_parts_and_changed_settings(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--parts 'train,decode'"):
        _quick(tmp_path, "--parts", "train,decode")
    (tmp_path / "longctx-cpu-quick.json").write_text(json.dumps({"settings": {"loss_chunk": 7}, "rows": []}))
    with pytest.raises(SystemExit, match="was measured with settings"):
        _quick(tmp_path, "--parts", "gqa", "--resume")
