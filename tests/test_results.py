"""Recorded GPU results: the device slug, finding a run's files, and their provenance."""

import json

import pytest

from lmcore.results import gpu_slug, load_recorded, recorded_runs


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA L4", "l4"), ("Some Card", "some-card"), ("h200", "h200"), (None, "cpu"), ("", "cpu"),
])
def test_gpu_slug(name, slug):
    assert gpu_slug(name) == slug


def write_run(folder, name, slug, date, gpu="NVIDIA H200", csv="a,b\n1,2\n3,4\n"):
    (folder / f"{name}-{slug}.json").write_text(json.dumps(
        {"provenance": {"gpu": gpu, "torch": "2.9", "date": date, "command": f"python -m lmcore.bench {name}"}}))
    if csv is not None:
        (folder / f"{name}-{slug}.csv").write_text(csv)


def test_load_finds_rows_provenance_and_parts(tmp_path):
    write_run(tmp_path, "ddp", "h200", "2026-01-01")
    (tmp_path / "ddp-h200-allreduce.csv").write_text("size_mb,busbw\n1,100\n")
    (tmp_path / "ddp-h200-timeline.json").write_text(json.dumps({"timelines": [1]}))
    assert recorded_runs(directory=tmp_path) == [("ddp", "h200")]  # parts are not runs
    run = load_recorded("ddp", directory=tmp_path)
    assert run.slug == "h200" and run.rows["b"].tolist() == [2, 4]
    assert run.provenance["gpu"] == "NVIDIA H200" and run.provenance["date"] == "2026-01-01"
    assert run.part("allreduce")["busbw"].tolist() == [100] and run.part("timeline") == {"timelines": [1]}
    assert run.part("missing") is None
    assert "NVIDIA H200" in run.describe() and "`python -m lmcore.bench ddp`" in run.describe()
    assert load_recorded("ddp", gpu="NVIDIA H200", directory=tmp_path).paths == run.paths


def test_newest_run_without_a_gpu_and_a_json_only_run(tmp_path):
    write_run(tmp_path, "sparse", "h100", "2026-01-01", gpu="NVIDIA H100 80GB HBM3")
    write_run(tmp_path, "sparse", "h200", "2026-02-01")
    write_run(tmp_path, "bpe", "cpu", "2026-03-01", gpu=None, csv=None)
    assert load_recorded("sparse", directory=tmp_path).slug == "h200"
    assert load_recorded("sparse", gpu="NVIDIA H100 80GB HBM3", directory=tmp_path).slug == "h100"
    bpe = load_recorded("bpe", directory=tmp_path)
    assert bpe.rows is None and bpe.provenance["date"] == "2026-03-01"


def test_missing_run_says_what_is_recorded(tmp_path):
    write_run(tmp_path, "sparse", "h200", "2026-02-01")
    with pytest.raises(FileNotFoundError, match=r"no recorded results for 'sparse' on 'A100'.*sparse-h200"):
        load_recorded("sparse", gpu="A100", directory=tmp_path)
    with pytest.raises(FileNotFoundError, match="no recorded results for 'train'.*lmcore.bench train"):
        load_recorded("train", directory=tmp_path)
    (tmp_path / "train-h100.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="train-h100.json is not a results file"):
        load_recorded("train", directory=tmp_path)


@pytest.mark.parametrize("name", ["attention", "sparse", "ddp", "train", "bpe"])
def test_the_books_recorded_files_load_with_provenance(name):
    run = load_recorded(name)
    assert run.provenance.get("date") and run.provenance.get("command", "").startswith("python -m lmcore.bench")
    assert name == "bpe" or len(run.rows) > 0
