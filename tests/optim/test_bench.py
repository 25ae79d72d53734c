"""``python -m lmcore.bench optim``: the speed test and the comparison at toy size on CPU."""

from __future__ import annotations

import json

import pytest

from lmcore.bench import BENCHMARKS
from lmcore.bench.__main__ import main as bench_main
from lmcore.bench.optim import NAMES, main, summarize


def test_quick_speed_test_measures_every_optimizer(tmp_path):
    out = tmp_path / "optim.json"
    assert "optim" in BENCHMARKS
    assert bench_main(["optim", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["provenance"]["torch"] and result["device"] == "cpu"
    for name in (*NAMES, "torch-fused-adamw"):
        assert result["step_ms"][name]["median"] > 0 and result["train_step_ms"][name]["median"] > 0
    assert result["state_bytes_per_parameter"]["adamw"] == 8.0
    assert result["metrics"]["adamw8bit_state_vs_torch"] < 0.3
    assert set(result["targets"]) and all("met" in t for t in result["targets"].values())
    adamw = result["targets"]["lmcore AdamW step / torch fused AdamW"]
    assert adamw["value"] == result["step_vs_torch_fused"]["adamw"]["median"] > 0
    assert adamw["bound"] == 1.0 and adamw["kind"] == "max" and adamw["met"] == (adamw["value"] <= 1.0)


def test_comparison_runs_grid_then_final_and_resumes(tmp_path):
    results = tmp_path / "compare.json"
    common = ["--compare", "--quick", "--results", str(results), "--optimizers", "adamw,muon",
              "--corpus-bytes", "60000", "--vocab-size", "300", "--batch", "4", "--evals", "2",
              "--data-dir", str(tmp_path / "data")]
    grid = main(common + ["--phase", "grid", "--lrs", "3e-3,1e-2", "--grid-tokens", "2048"])
    assert len(grid["runs"]) == 4 and grid["settings"]["corpus"] == "python-source"
    assert grid["settings"]["train_tokens"] > 10_000
    assert set(grid["summary"]["best_lr"]) == {"adamw", "muon"}
    again = main(common + ["--phase", "grid", "--lrs", "3e-3,1e-2", "--grid-tokens", "2048"])
    assert len(again["runs"]) == 4  # nothing run twice
    final = main(common + ["--phase", "final", "--final-tokens", "4096"])
    finals = [r for r in final["runs"] if r["phase"] == "final"]
    assert [r["lr"] for r in finals] == [final["summary"]["best_lr"][r["optimizer"]] for r in finals]
    summary = final["summary"]["final"]
    assert summary["adamw"]["minus_adamw"] == 0 and summary["adamw"]["steps_fraction_of_adamw"] == 1.0
    assert all(r["val_curve"] and r["state_bytes"] > 0 for r in finals)
    assert json.loads(results.read_text())["summary"] == final["summary"]
    before = results.read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(batch: 4\)"):
        main([*common[:-6], "--batch", "8", *common[-4:], "--phase", "final", "--final-tokens", "4096"])
    assert results.read_bytes() == before  # refused before any work
    recorded = json.loads(before)
    recorded["settings"]["train_tokens"] += 1  # as if another environment's files had been read
    results.write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match=r"the corpus differs in this environment"):
        main(common + ["--phase", "final", "--final-tokens", "4096"])


def test_a_run_cut_by_stop_after_continues_to_the_run_it_would_have_been(tmp_path, monkeypatch):
    """A run cut and resumed ends as the uncut run does. Each segment's model and optimizer are gone
    before the next segment's are built, so a run in segments peaks at one segment's memory; the
    run records how many segments it took."""
    import weakref

    import lmcore.train

    train, alive = lmcore.train.train, []

    def tracking_train(*args, **kwargs):
        assert not [r for r in alive if r() is not None], "the last segment's model is still alive"
        result = train(*args, **kwargs)
        alive.extend([weakref.ref(result.model), weakref.ref(result.optimizer)])
        return result

    monkeypatch.setattr(lmcore.train, "train", tracking_train)
    data = tmp_path / "data"
    common = ["--compare", "--quick", "--optimizers", "muon", "--corpus-bytes", "60000", "--vocab-size", "300",
              "--batch", "4", "--evals", "4", "--data-dir", str(data), "--phase", "grid", "--lrs", "3e-3",
              "--grid-tokens", "8192"]
    whole = main(common + ["--results", str(tmp_path / "whole.json")])["runs"][0]
    cut_file = str(tmp_path / "cut.json")
    cut = main(common + ["--results", cut_file, "--stop-after", "0"])
    assert cut["runs"] == [] and "unfinished after --stop-after 0 s" in cut["stopped"]
    assert list((data / "unfinished").iterdir())  # the checkpoint waits there
    again = main(common + ["--results", cut_file, "--stop-after", "0"])  # one more short segment
    assert again["runs"] == []
    done = main(common + ["--results", cut_file])["runs"][0]  # no limit: the rest of the run
    assert "stopped" not in json.loads((tmp_path / "cut.json").read_text())
    assert done["iterations"] == whole["iterations"] and done["final_val_loss"] == whole["final_val_loss"]
    assert [(p["iter"], p["val_loss"]) for p in done["val_curve"]] == \
        [(p["iter"], p["val_loss"]) for p in whole["val_curve"]]
    assert [p["loss"] for p in done["train_curve"]] == [p["loss"] for p in whole["train_curve"]]
    assert not list((data / "unfinished").iterdir())  # removed once the run is recorded
    assert whole["segments"] == 1 and done["segments"] == 2  # a short segment, then the rest


def test_summary_finds_steps_to_adamws_loss():
    curve = lambda losses: [{"iter": 10 * (i + 1), "val_loss": v, "seconds": float(i + 1)}  # noqa: E731
                            for i, v in enumerate(losses)]
    runs = [{"phase": "final", "optimizer": "adamw", "lr": 1e-3, "final_val_loss": 3.0, "state_bytes": 8,
             "val_curve": curve([5, 4, 3.5, 3.0])},
            {"phase": "final", "optimizer": "muon", "lr": 1e-3, "final_val_loss": 2.8, "state_bytes": 4,
             "val_curve": curve([4.5, 3.0, 2.9, 2.8])}]
    s = summarize(runs)["final"]
    assert s["muon"]["steps_to_adamw_loss"] == 20 and s["muon"]["steps_fraction_of_adamw"] == 0.5
    assert abs(s["muon"]["minus_adamw"] + 0.2) < 1e-12


def test_comparison_targets_say_met_missed_or_not_run():
    curve = lambda losses: [{"iter": 10 * (i + 1), "val_loss": v, "seconds": float(i + 1)}  # noqa: E731
                            for i, v in enumerate(losses)]
    final = lambda name, losses: {"phase": "final", "optimizer": name, "lr": 1e-3,  # noqa: E731
                                  "final_val_loss": losses[-1], "state_bytes": 8, "val_curve": curve(losses)}
    runs = [final("adamw", [5, 4, 3.5, 3.0]), final("muon", [4.5, 3.0, 2.9, 2.8]),
            final("soap", [5, 4, 3.6, 3.1]), final("adamw8bit", [5, 4, 3.5, 3.03])]
    t = summarize(runs)["targets"]
    muon, soap, a8 = (t[k] for k in ("Muon steps to AdamW's final loss / AdamW's steps",
                                     "SOAP steps to AdamW's final loss / AdamW's steps",
                                     "AdamW8bit final loss, distance from AdamW's (nats)"))
    assert muon == {"value": 0.5, "bound": 0.75, "kind": "max", "met": True}
    assert soap["value"] is None and soap["met"] is False  # never reached AdamW's loss
    assert abs(a8["value"] - 0.03) < 1e-12 and a8["met"] is False
    none_yet = summarize(runs[1:])["targets"]  # no AdamW final run: nothing to compare with
    assert all(v["met"] is None and v["value"] is None for v in none_yet.values())
