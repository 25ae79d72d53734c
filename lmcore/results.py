"""A chapter's key results, and the GPU results recorded for the book.

``record(name, value)`` does two things:

1. glues the value with ``myst_nb.glue`` so the prose can cite it (``{glue:text}`name```);
2. when the environment variable ``LMCORE_RESULTS`` names a JSON file (the book build and
   ``python -m lmcore.experiments`` set it), merges ``{name: value}`` into that file, so a
   run's numbers can be collected into tables without parsing the notebook.

Values must be JSON scalars, lists or dicts; NumPy and torch scalars are converted.

Benchmarks run on a GPU write ``book/results/<bench>-<gpu>.json`` (with ``provenance`` at the
top level: GPU, library versions, date, command) and usually ``<bench>-<gpu>.csv`` (one row per
measurement), plus optional parts ``<bench>-<gpu>-<part>.csv``/``.json``; ``<gpu>`` is
:func:`gpu_slug` of the device name. :func:`load_recorded` reads them back for a chapter and
:func:`recorded_runs` lists what is there.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcore.utils import atomic_write

RESULTS_ENV = "LMCORE_RESULTS"

_recorded: dict[str, Any] = {}


def _plain(value: Any) -> Any:
    """Convert NumPy / torch scalars and arrays to plain Python so they serialise to JSON."""
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays/scalars, torch tensors
        value = value.tolist()
    elif hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a value of type {type(value).__name__}: {value!r}; "
                    "expected a number, string, bool, None, list or dict")


def record(name: str, value: Any, glue: bool = True, display: bool = False) -> None:
    """Record ``value`` under ``name`` for the prose (glue) and the run's results file.

    Returns nothing, so a cell that ends with ``record(...)`` shows no stray output.
    """
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"result name {name!r} must be letters, digits, '_' or '-'")
    plain = _plain(value)
    _recorded[name] = plain
    if glue:
        try:
            from myst_nb import glue as _glue
        except ImportError:  # myst-nb is part of the book extra; a bare install just skips glue
            _glue = None
        if _glue is not None:
            _glue(name, value, display=display)
    path = os.environ.get(RESULTS_ENV)
    if path:
        data = load(path) if os.path.exists(path) else {}
        data[name] = plain
        with atomic_write(path) as f:
            json.dump(data, f, indent=1, sort_keys=True)


def recorded() -> dict[str, Any]:
    """Everything recorded in this process so far."""
    return dict(_recorded)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file written by ``record``."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{os.fspath(path)} is not a results file: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)} is not a results file: expected a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# Recorded GPU results.


def gpu_slug(name: str | None) -> str:
    """The file-name part for a device: 'NVIDIA H100 80GB HBM3' -> 'h100', no name -> 'cpu'.

    The model number when there is one (letters then digits, as in H200, A100, L4), else the
    whole name in lower case with dashes; a slug maps to itself.
    """
    if not name or not name.strip():
        return "cpu"
    name = re.sub(r"(?i)^(nvidia|amd)\s+", "", name.strip())
    m = re.search(r"\b([A-Za-z]{1,3}\d{1,4}[A-Za-z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu").lower()


def results_dir() -> Path:
    """Where the recorded GPU results are: beside the running chapter, else with lmcore, else an error.

    1. ``results/`` beside the chapter's notebook (:func:`lmcore.utils.chapter_notebook`; in a checkout
       that is ``book/results``), or ``book/results`` of the book root above the working directory;
    2. the ``book/results`` of lmcore's own checkout (an editable install), else the copy installed
       with the package (``<prefix>/share/lmcore/results``, e.g. on Colab);
    3. else ``FileNotFoundError`` naming where to download them from.
    """
    from lmcore.book import find_root
    from lmcore.utils import SOURCE_ENV

    source = os.environ.get(SOURCE_ENV)  # the chapter's notebook, when the book build runs it
    candidates = [Path(source).resolve().parent / "results" if source else None, Path.cwd() / "results"]
    for start in (None, Path(__file__).parent):
        try:
            candidates.append(find_root(start) / "book" / "results")
        except FileNotFoundError:
            pass
    candidates.append(installed_results_dir())
    for folder in filter(None, candidates):
        if folder.is_dir() and any(folder.glob("*-*.json")):
            return folder
    raise FileNotFoundError(
        "no recorded GPU results beside this notebook (./results), in a book checkout or installed with "
        f"lmcore ({installed_results_dir()}); download the folder book/results of {repository_url()} into "
        "./results, or run the chapter's `python -m lmcore.bench ...` command on a GPU to record your own")


def installed_results_dir() -> Path:
    """The copy of ``book/results`` a (non-editable) install of lmcore carries as data files."""
    import sysconfig

    return Path(sysconfig.get_paths()["data"]) / "share" / "lmcore" / "results"


def repository_url() -> str:
    """The book's repository, from lmcore's metadata (pyproject's ``Repository``, kept equal to _config.yml's)."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("lmcore").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    found = [u.split(",", 1)[1].strip() for u in urls if u.lower().startswith("repository,")]
    return found[0] if found else "the book's repository"


@dataclass
class Recorded:
    """One recorded benchmark run: its rows, its JSON (``meta``) and where it came from."""

    name: str  # the benchmark, e.g. "sparse"
    slug: str  # the device, e.g. "h200"
    rows: Any  # pandas DataFrame of <name>-<slug>.csv, or None where the run wrote no CSV
    meta: dict = field(default_factory=dict)  # <name>-<slug>.json
    paths: list = field(default_factory=list)  # the files read

    @property
    def provenance(self) -> dict:
        """GPU, library versions, date and command of the run."""
        return self.meta.get("provenance", {})

    def describe(self) -> str:
        """One line for a chapter: files, device, versions, date and command."""
        p = self.provenance
        files = ", ".join(f"`{path.name}`" for path in self.paths)
        return (f"Data: {files}: {p.get('gpu') or p.get('processor', '?')}, torch {p.get('torch', '?')}, "
                f"triton {p.get('triton', '?')}, CUDA {p.get('cuda', '?')}, {p.get('date', '?')}; "
                f"command `{p.get('command', '?')}`.")

    def part(self, suffix: str):
        """The companion file ``<name>-<slug>-<suffix>.csv`` (a DataFrame) or ``.json`` (a dict), or None."""
        folder = self.paths[0].parent
        stem = folder / f"{self.name}-{self.slug}-{suffix}"
        if stem.with_suffix(".csv").is_file():
            import pandas as pd

            return pd.read_csv(stem.with_suffix(".csv"))
        if stem.with_suffix(".json").is_file():
            return _read_json(stem.with_suffix(".json"))
        return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a results file: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a results file: expected a JSON object")
    return data


def recorded_runs(name: str | None = None, directory: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The ``(benchmark, slug)`` pairs recorded in ``directory`` (default :func:`results_dir`).

    A file ``<name>-<slug>-<part>.*`` beside ``<name>-<slug>.*`` is a part of that run, not a run.
    """
    folder = Path(directory) if directory is not None else results_dir()
    stems = {p.stem for p in folder.glob("*-*") if p.suffix in (".csv", ".json")} if folder.is_dir() else set()
    runs = set()
    for stem in stems:
        bench, rest = stem.split("-", 1)
        parts = rest.split("-")
        if any(f"{bench}-{'-'.join(parts[:i])}" in stems for i in range(1, len(parts))):
            continue  # a part of a shorter run's files
        if name is None or bench == name:
            runs.add((bench, rest))
    return sorted(runs)


def load_recorded(name: str, gpu: str | None = None, directory: str | os.PathLike | None = None) -> Recorded:
    """The run of benchmark ``name`` recorded on ``gpu`` (a device name or slug) in ``directory``.

    Without ``gpu``: the only run of ``name``, or the newest by its provenance date when there are
    several. Raises ``FileNotFoundError`` naming what is recorded when there is no such run.
    """
    folder = Path(directory) if directory is not None else results_dir()
    runs = recorded_runs(name, folder)
    if gpu is not None:
        wanted = gpu_slug(gpu)
        runs = [r for r in runs if r[1] == wanted]
    if not runs:
        there = ", ".join(f"{b}-{s}" for b, s in recorded_runs(None, folder)) or "nothing"
        on = f" on {gpu!r}" if gpu is not None else ""
        raise FileNotFoundError(f"no recorded results for {name!r}{on} in {folder} (recorded there: {there}); "
                                f"run `python -m lmcore.bench {name}` on a GPU to record them")
    loaded = [_load_run(folder, bench, slug) for bench, slug in runs]
    return max(loaded, key=lambda r: str(r.provenance.get("date", "")))


def _load_run(folder: Path, name: str, slug: str) -> Recorded:
    stem = folder / f"{name}-{slug}"
    paths = [p for p in (stem.with_suffix(".csv"), stem.with_suffix(".json")) if p.is_file()]
    rows = None
    if stem.with_suffix(".csv").is_file():
        import pandas as pd

        rows = pd.read_csv(stem.with_suffix(".csv"))
    meta = _read_json(stem.with_suffix(".json")) if stem.with_suffix(".json").is_file() else {}
    return Recorded(name, slug, rows, meta, paths)
