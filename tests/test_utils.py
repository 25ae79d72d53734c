"""Shared helpers: device choice, seeding, the results recorder, atomic writes, the static switch."""

from __future__ import annotations

import json

import pytest
import torch

from lmcore import results, utils


def test_get_device_auto_and_explicit():
    assert utils.get_device("cpu") == torch.device("cpu")
    assert utils.get_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="'tpu' is not one of"):
        utils.get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            utils.get_device("cuda")


def test_seed_everything_repeats():
    utils.seed_everything(7)
    a = torch.rand(3)
    utils.seed_everything(7)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError):
        utils.seed_everything(-1)


def test_explore_uses_function_defaults_when_static(monkeypatch):
    monkeypatch.setenv(utils.STATIC_ENV, "1")
    assert not utils.interactive()
    seen = {}
    utils.explore(lambda a, b=5: seen.update(a=a, b=b), a=[3, 4], b=(1, 10, 1))
    assert seen == {"a": 3, "b": 5}


def test_explore_in_a_live_kernel_shows_controls_or_falls_back_to_the_static_figure(monkeypatch):
    import builtins
    import sys

    monkeypatch.delenv(utils.STATIC_ENV, raising=False)
    monkeypatch.setattr(utils, "interactive", lambda: True)
    shown = []
    monkeypatch.setitem(sys.modules, "ipywidgets", type(sys)("ipywidgets"))
    sys.modules["ipywidgets"].interact = lambda function, **controls: shown.append(sorted(controls))
    assert utils.explore(lambda a=1: a * 10, a=(1, 5, 1)) is None  # the controls, not a value to print
    assert shown == [["a"]]
    real_import = builtins.__import__

    def no_ipywidgets(name, *args, **kwargs):
        if name == "ipywidgets":
            raise ImportError("no ipywidgets here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ipywidgets)
    assert utils.explore(lambda a=2: a * 10, a=(1, 5, 1)) == 20  # the static figure, at the default



def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with utils.atomic_write(path) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path], "the temporary file must be removed"
    with utils.atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new"


def test_record_writes_results_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    monkeypatch.setenv(results.RESULTS_ENV, str(target))
    assert results.record("loss", torch.tensor(1.5), glue=False) is None  # a cell ending in record shows nothing
    results.record("sizes", [1, 2], glue=False)
    assert json.loads(target.read_text()) == {"loss": 1.5, "sizes": [1, 2]}
    with pytest.raises(ValueError, match="result name"):
        results.record("bad name!", 1, glue=False)
    with pytest.raises(TypeError, match="cannot record"):
        results.record("obj", object(), glue=False)


def test_show_source_renders_package_code():
    shown = utils.show_source(utils.seed_everything)
    assert "def seed_everything" in shown.data and "lmcore.utils.seed_everything" in shown.data


def test_atomic_write_gives_files_the_usual_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.json"
        with utils.atomic_write(fresh) as f:
            f.write("{}")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0600
        shared = tmp_path / "shared.txt"
        shared.write_text("old")
        shared.chmod(0o664)
        with utils.atomic_write(shared) as f:
            f.write("new")
        assert stat.S_IMODE(shared.stat().st_mode) == 0o664  # an existing file keeps its mode
    finally:
        os.umask(old)
