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
