"""Chapters as parameterized experiments: ``python -m lmcore.experiments run|grid|params ...``.

::

    python -m lmcore.experiments params book/00-using-this-book.ipynb
    python -m lmcore.experiments run  book/00-using-this-book.ipynb -p learning_rate 0.3 --out runs/one
    python -m lmcore.experiments grid book/00-using-this-book.ipynb \\
        --grid learning_rate=0.03,0.3,3 --grid seed=0,1 --plot final_loss --out runs/grid

``run`` writes the executed notebook, its HTML export (nbconvert), ``params.json`` and the results
the chapter recorded (``results.json``, see ``lmcore.results.record``). ``grid`` runs the cartesian
product, one folder per run, then collects every run's parameters and results into
``results.csv`` and plots one result against one parameter (``plot.png``).

Parameters are checked against the chapter's ``parameters`` cell before anything runs: an
unknown name or a value of the wrong type is refused with the list of valid parameters.

Nothing that exists is lost. An ``--out`` folder that holds anything is refused unless the command
says what to do (``--resume``, ``--overwrite`` or ``--next``, see ``lmcore.runfolders``), and the
decision is printed in one line. Each run executes in a staging folder and is moved into place
when complete; a failed run leaves earlier results untouched and sits beside them as
``failed-<time>/``. ``results.csv`` is rewritten after every run of a grid, and Ctrl-C or SIGTERM
stops a grid with one line naming the runs that finished and the command that continues it.
"""

from __future__ import annotations

import argparse
import ast
import csv
import itertools
import json
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcore.runfolders import (FolderInUse, add_folder_flags, choose_folder, remove_stale_staging,
                               replace_folder, staging_folder)
from lmcore.utils import atomic_write


class ParameterError(ValueError):
    """A parameter name or value the chapter does not accept."""


# ----------------------------------------------------------------------------------------------
# the chapter's parameters


def find_notebook(chapter: str | Path) -> Path:
    """A chapter by path (``book/01-bpe.ipynb``) or by stem (``01-bpe``)."""
    path = Path(chapter)
    candidates = [path, path.with_suffix(".ipynb"), Path("book") / path, (Path("book") / path).with_suffix(".ipynb")]
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix == ".ipynb":
            return candidate.resolve()
    raise FileNotFoundError(f"no chapter notebook {chapter!r} (give a path to a .ipynb or a chapter stem)")


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """The defaults of the cell tagged ``parameters``: ``{name: value}`` in the order written."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(f"{notebook}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    defaults: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                raise ParameterError(
                    f"{notebook}: parameter {node.targets[0].id} must have a literal default") from None
    return defaults


def _describe(defaults: dict[str, Any]) -> str:
    return "valid parameters (default):\n" + "\n".join(
        f"  {name} = {value!r}  ({type(value).__name__})" for name, value in defaults.items())


def parse_value(text: str) -> Any:
    """A command-line value as a Python literal when it is one (``3``, ``0.1``, ``[1, 2]``, ``True``), else text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def coerce(name: str, value: Any, default: Any, defaults: dict[str, Any]) -> Any:
    """``value`` converted to the type of ``default``, or ``ParameterError`` with the valid parameters."""
    def refuse() -> ParameterError:
        return ParameterError(f"parameter {name}={value!r} ({type(value).__name__}) does not match the type "
                              f"of its default {default!r} ({type(default).__name__})\n{_describe(defaults)}")

    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise refuse()
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise refuse()
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise refuse()
    if isinstance(default, str):
        return value if isinstance(value, str) else str(value)
    if isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise refuse()
    if isinstance(default, dict):
        if isinstance(value, dict):
            return value
        raise refuse()
    return value


def validate(notebook: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Check names and types of ``params`` against the chapter; return them coerced."""
    defaults = notebook_parameters(notebook)
    unknown = [name for name in params if name not in defaults]
    if unknown:
        raise ParameterError(f"{notebook.name} has no parameter {', '.join(map(repr, unknown))}\n{_describe(defaults)}")
    return {name: coerce(name, value, defaults[name], defaults) for name, value in params.items()}


def load_params_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of parameter values (``--params FILE``)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ParameterError(f"{path}: expected a mapping of parameter names to values")
    return values


# ----------------------------------------------------------------------------------------------
# running


@dataclass
class RunResult:
    folder: Path
    params: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    skipped: bool = False  # finished earlier (``--resume``) and not run again

    @property
    def ok(self) -> bool:
        return self.error is None


class GridInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a grid; ``results`` holds the runs that finished (all in results.csv)."""

    def __init__(self, results: list[RunResult], total: int, out: Path):
        super().__init__(f"{len(results)} of {total} runs finished")
        self.results, self.total, self.out = results, total, out


def export_html(executed: Path, html: Path) -> None:
    """The executed notebook as a standalone HTML page (nbconvert)."""
    from nbconvert import HTMLExporter
    import nbformat

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(executed), as_version=4))
    with atomic_write(html) as f:
        f.write(body)


def holds_run(folder: Path) -> str | None:
    """What an earlier run left in ``folder`` (None when it is empty): any content counts."""
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not names:
        return None
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def finished_run(folder: Path) -> RunResult | None:
    """The run recorded in ``folder`` (its ``run.json``, or an older run's files), or None."""
    try:
        params = json.loads((folder / "params.json").read_text())
        if (folder / "run.json").exists():
            meta = json.loads((folder / "run.json").read_text())
        elif (folder / "error.txt").exists():
            meta = {"error": (folder / "error.txt").read_text().strip()}
        else:
            meta = {} if (folder / "results.json").exists() else {"error": "did not finish"}
        results_path = folder / "results.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
    except (OSError, ValueError):
        return None
    return RunResult(folder, params, results, meta.get("error"), float(meta.get("seconds", 0.0)),
                     skipped=True)


def execute_run(notebook: Path, params: dict[str, Any], folder: Path,
                timeout: int | None = None) -> RunResult:
    """Execute into a staging folder, then move it to ``folder`` in one rename.

    A failed run never replaces earlier results: when ``folder`` holds a ``results.json``, the
    failed run is kept beside them as ``folder/failed-<time>/`` (with its ``error.txt``).
    """
    from lmcore.book import ChapterError, chapter_timeout, execute_notebook

    staged = staging_folder(folder)
    try:
        with atomic_write(staged / "params.json") as f:
            json.dump(params, f, indent=1)
        executed, results_path = staged / notebook.name, staged / "results.json"
        t0 = time.perf_counter()
        result = RunResult(folder, params)
        try:
            execute_notebook(notebook, executed, params, cwd=notebook.parent,
                             timeout=timeout or chapter_timeout(notebook), results_path=results_path)
        except ChapterError as err:
            result.error = str(err)
        result.seconds = time.perf_counter() - t0
        if executed.exists():
            try:
                export_html(executed, staged / (notebook.stem + ".html"))
            except Exception as err:  # a failed export must not hide the run's own outcome
                result.error = result.error or f"HTML export failed: {err}"
        if results_path.exists():
            result.results = json.loads(results_path.read_text())
        if result.error:
            (staged / "error.txt").write_text(result.error + "\n")
            if results_path.exists():  # results of a failed run are not results
                results_path.rename(staged / "partial-results.json")
                result.results = {}
        with atomic_write(staged / "run.json") as f:
            json.dump({"chapter": notebook.name, "status": "ok" if result.ok else "failed",
                       "seconds": round(result.seconds, 3), "error": result.error}, f, indent=1)
        if result.error and (folder / "results.json").exists():
            result.folder = folder / time.strftime("failed-%Y%m%d-%H%M%S")
            staged.rename(result.folder)
        else:
            replace_folder(staged, folder)
        return result
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def run(chapter: str | Path, params: dict[str, Any] | None, out: str | Path,
        timeout: int | None = None, validated: bool = False, policy: str = "refuse",
        log=print) -> RunResult:
    """Execute one chapter with ``params`` into ``out``; a failure is returned in ``RunResult.error``.

    ``policy`` says what to do when ``out`` holds an earlier run (see ``lmcore.runfolders``):
    ``"refuse"`` raises ``FolderInUse``; ``"resume"`` returns the earlier run if it finished with
    the same parameters; ``"overwrite"`` replaces it once the new run is complete; ``"next"`` writes
    to ``out-2`` (``out-3``, ...). The decision is passed to ``log`` in one line.
    """
    notebook = find_notebook(chapter)
    params = dict(params or {}) if validated else validate(notebook, dict(params or {}))
    folder, decision = choose_folder(out, holds_run, policy)
    if policy == "resume":
        earlier = finished_run(folder)
        if earlier is None:
            raise FolderInUse(f"--resume: {folder} holds no run of a chapter to continue "
                              f"({holds_run(folder)}); use --overwrite or another --out")
        if earlier.params != params:
            raise FolderInUse(f"--resume: {folder} holds a run with other parameters ({earlier.params}); "
                              "use --overwrite or another --out")
        if earlier.ok:
            log(f"{folder} already holds this run, finished; nothing to do")
            return earlier
    log(decision)
    return execute_run(notebook, params, folder, timeout)


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the grid, in the order the parameters were given."""
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def holds_grid(folder: Path) -> str | None:
    """What an earlier grid (or anything else) left in ``folder``, or None when it is empty."""
    return holds_run(folder)


def grid(chapter: str | Path, grid_values: dict[str, list[Any]], out: str | Path,
         base: dict[str, Any] | None = None, plot: str | None = None, x: str | None = None,
         progress: bool = True, policy: str = "refuse", log=print) -> list[RunResult]:
    """Run every combination of ``grid_values`` (over ``base``), collect ``results.csv`` and a plot.

    ``results.csv`` is rewritten (atomically) after every run, so it always describes the run
    folders on disk. ``policy`` as for ``run``: ``"resume"`` skips runs that finished with the same
    parameters; ``"overwrite"`` empties ``out`` first. Ctrl-C (or SIGTERM, see ``main``) raises
    ``GridInterrupted`` after writing the table of the runs that finished.
    """
    notebook = find_notebook(chapter)
    if not grid_values:
        raise ParameterError("a grid needs at least one --grid NAME=V1,V2,...")
    combos = [validate(notebook, {**(base or {}), **combo}) for combo in expand_grid(grid_values)]
    if x is not None and x not in grid_values:
        raise ParameterError(f"--x {x!r} is not one of the grid's parameters: {', '.join(grid_values)}")
    out, decision = choose_folder(out, holds_grid, policy, what="grid")
    earlier = [finished_run(out / f"run-{i:03d}") if policy == "resume" else None for i in range(len(combos))]
    if policy == "resume":
        names = {f"run-{i:03d}" for i in range(len(combos))} | {"results.csv", "plot.png"}
        others = sorted(p.name for p in out.iterdir() if p.name not in names and p.name[0] != ".")
        if others:
            raise FolderInUse(f"--resume: {out} holds {', '.join(others[:4])}, which this grid of "
                              f"{len(combos)} runs would not list; use --overwrite or another --out")
    for i, (params, before) in enumerate(zip(combos, earlier)):
        if before is not None and before.params != params:
            raise FolderInUse(f"--resume: {before.folder} holds a run with {before.params}, but this grid "
                              f"puts {params} there; use --overwrite or another --out")
    if policy == "overwrite" and out.exists():
        shutil.rmtree(out)
    log(decision + (f"; {sum(r is not None and r.ok for r in earlier)} of {len(combos)} runs finished earlier"
                    if policy == "resume" else ""))
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    write_table([r for r in earlier if r is not None and r.ok], out / "results.csv")  # what is on disk now
    from tqdm.auto import tqdm

    results: list[RunResult] = []
    bar = tqdm(combos, desc=f"grid {notebook.stem}", unit="run", disable=not progress)
    try:
        for i, params in enumerate(bar):
            label = ",".join(f"{k}={params[k]}" for k in grid_values)
            bar.set_postfix_str(label)
            if earlier[i] is not None and earlier[i].ok:
                r = earlier[i]
            else:
                r = execute_run(notebook, params, out / f"run-{i:03d}")
                if not r.ok:
                    tqdm.write(f"run {i} ({label}) failed in {r.folder}: {r.error}")
            results.append(r)
            write_table(results, out / "results.csv")
    except KeyboardInterrupt:
        bar.close()
        raise GridInterrupted(results, len(combos), out) from None
    bar.close()
    plot = plot or _first_numeric_result(results)
    if plot is not None:
        plot_results(results, plot, x or next(iter(grid_values)), out / "plot.png")
    return results


def _first_numeric_result(results: list[RunResult]) -> str | None:
    for r in results:
        for name, value in r.results.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return name
    return None


def write_table(results: list[RunResult], path: Path) -> None:
    """One row per run: its folder, status, seconds, parameters and scalar results."""
    param_names = list(dict.fromkeys(k for r in results for k in r.params))
    result_names = list(dict.fromkeys(
        k for r in results for k, v in r.results.items() if not isinstance(v, (list, dict))))
    with atomic_write(path) as f:
        writer = csv.writer(f)
        writer.writerow(["run", "status", "seconds", *param_names, *result_names, "error"])
        for r in results:
            writer.writerow([r.folder.name, "ok" if r.ok else "failed", f"{r.seconds:.2f}",
                             *(json.dumps(r.params.get(k)) if isinstance(r.params.get(k), (list, dict))
                               else r.params.get(k) for k in param_names),
                             *(r.results.get(k, "") for k in result_names), r.error or ""])


def plot_results(results: list[RunResult], y: str, x: str, path: Path) -> None:
    """``y`` against ``x`` for every successful run (one line per value of the other parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[Any, Any]]] = {}
    for r in results:
        if r.ok and y in r.results:
            others = ", ".join(f"{k}={v}" for k, v in r.params.items() if k != x)
            lines.setdefault(others, []).append((r.params.get(x), r.results[y]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in lines.items():
        points.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label or None)
    xs = [p[0] for pts in lines.values() for p in pts if isinstance(p[0], (int, float))]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 100:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if any(lines):
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# command line


def _grid_arg(text: str) -> tuple[str, list[Any]]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: expected NAME=V1,V2,...")
    name, values = text.split("=", 1)
    items = [parse_value(v) for v in values.split(",") if v != ""]
    if not items:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: no values")
    return name.strip(), items


def _grid_values(pairs: list[tuple[str, list[Any]]]) -> dict[str, list[Any]]:
    """``--grid`` options as a mapping; a name given twice is refused (its values would be lost)."""
    values: dict[str, list[Any]] = {}
    for name, items in pairs:
        if name in values:
            together = ",".join(map(str, values[name] + items))
            raise ParameterError(f"--grid {name} is given twice ({values[name]} and {items}); give all its "
                                 f"values in one option, e.g. --grid {name}={together}")
        values[name] = items
    return values


def _continue_command(argv: list[str], out: Path) -> str:
    """The command that continues an interrupted grid: the same one with ``--resume`` into ``out``."""
    kept, skip = [], False
    for a in argv:
        if not skip and a not in ("--resume", "--overwrite", "--next") and not a.startswith("--out="):
            if a == "--out":
                skip = True
                continue
            kept.append(a)
        else:
            skip = False
    return shlex.join(["python", "-m", "lmcore.experiments", *kept, "--out", str(out), "--resume"])


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m lmcore.experiments",
                                     description="Run chapters of the lmcore book as parameterized experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("chapter", help="a chapter notebook (path or stem, e.g. 01-bpe)")
    common.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    common.add_argument("--params", help="a YAML/JSON file of parameter values (e.g. book/params/ci/01-bpe.yaml)")
    sub.add_parser("params", parents=[common], help="list a chapter's parameters and defaults")
    r = sub.add_parser("run", parents=[common], help="execute one chapter with these parameters")
    r.add_argument("--out", required=True, help="output folder")
    add_folder_flags(r, "if OUT holds this run with the same parameters, finished, do nothing")
    g = sub.add_parser("grid", parents=[common], help="execute the cartesian product of parameter values")
    g.add_argument("--grid", type=_grid_arg, action="append", required=True, metavar="NAME=V1,V2")
    g.add_argument("--out", required=True, help="output folder (one sub-folder per run)")
    g.add_argument("--plot", default=None, help="the recorded result to plot (default: the first numeric one)")
    g.add_argument("--x", default=None, help="the grid parameter on the x axis (default: the first)")
    add_folder_flags(g, "continue the grid in OUT: skip the runs that finished with the same parameters")
    args = parser.parse_args(argv)

    err_log = lambda line: print(line, file=sys.stderr)  # noqa: E731  decisions to stderr, results to stdout
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if args.command != "params" else None
    try:
        notebook = find_notebook(args.chapter)
        if args.command == "params":
            print(_describe(notebook_parameters(notebook)))
            return 0
        base = load_params_file(args.params) if args.params else {}
        base.update({name: parse_value(value) for name, value in args.param})
        if args.command == "run":
            result = run(notebook, base, args.out, policy=args.folder_policy, log=err_log)
            print(json.dumps({"folder": str(result.folder), "ok": result.ok, "seconds": round(result.seconds, 2),
                              "results": result.results, "error": result.error}, indent=1))
            return 0 if result.ok else 1
        results = grid(notebook, _grid_values(args.grid), args.out, base=base, plot=args.plot, x=args.x,
                       policy=args.folder_policy, log=err_log)
        failed = [r for r in results if not r.ok]
        print(f"{len(results) - len(failed)} of {len(results)} runs succeeded; "
              f"collected {results[0].folder.parent / 'results.csv'}")
        return 1 if failed else 0
    except GridInterrupted as stop:
        names = ", ".join(r.folder.name for r in stop.results) or "none"
        print(f"interrupted: {len(stop.results)} of {stop.total} runs finished ({names}), listed in "
              f"{stop.out / 'results.csv'}; continue with: {_continue_command(argv, stop.out)}",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: the run did not finish and nothing was written", file=sys.stderr)
        return 130
    except (ParameterError, FileNotFoundError, FolderInUse) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
