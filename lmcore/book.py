"""Building the executed book: ``python -m lmcore.book build [--profile ci]``.

The pipeline, in four steps, each of which fails loudly:

1. **stage**: copy ``_config.yml``, ``_toc.yml`` and ``book/`` into a git-ignored folder
   (``_stage/``), so the committed chapters stay output-free;
2. **execute**: run every chapter of ``_toc.yml`` there with papermill, at its default parameters
   or at those of a profile (``book/params/<profile>/<chapter>.yaml``), printing each chapter's
   time; a failure names the chapter and the failing cell (numbered as in the source notebook).
   ``--only NAME ...`` executes those chapters; every other chapter reuses its outputs from an
   earlier build of the same source (kept in ``_build/executed/``) or becomes a placeholder page;
3. **render**: ``jupyter-book build`` on the staged tree with execution off and warnings as
   errors (``-W -n --keep-going``), into a fresh temporary folder;
4. **publish**: move the finished HTML into ``_build/html`` in one step, so a half-built book is
   never published and a failed build leaves the previous one in place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcore.results import RESULTS_ENV
from lmcore.utils import SOURCE_ENV, STATIC_ENV, atomic_write

DEFAULT_TIMEOUT = 900  # seconds any one cell of a chapter may run before the chapter fails
KERNEL = "python3"


class ChapterError(RuntimeError):
    """A chapter failed to execute; the message names the chapter and the failing cell."""


def find_root(start: str | os.PathLike | None = None) -> Path:
    """The book's root: the nearest folder at or above ``start`` holding ``_toc.yml`` and ``book/``."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() and (folder / "book").is_dir():
            return folder
    raise FileNotFoundError(f"no book root (a folder with _toc.yml and book/) at or above {here}")


def toc_files(root: Path) -> list[str]:
    """Every document of ``_toc.yml`` in reading order, as paths relative to the root, without suffix."""
    import yaml

    with open(root / "_toc.yml", encoding="utf-8") as f:
        toc = yaml.safe_load(f)
    if not isinstance(toc, dict) or "root" not in toc:
        raise ValueError(f"{root / '_toc.yml'}: expected a mapping with a 'root' entry")
    files = [toc["root"]]

    def walk(entries: Any) -> None:
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            for part in entry.get("parts", []) or []:
                walk(part.get("chapters"))

    walk(toc.get("chapters"))
    for part in toc.get("parts", []) or []:
        walk(part.get("chapters"))
    return files


def resolve_document(root: Path, entry: str) -> Path:
    """The file behind a ``_toc.yml`` entry (``.ipynb`` or ``.md``); raises if it does not exist."""
    for suffix in ("", ".ipynb", ".md"):
        candidate = root / f"{entry}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"_toc.yml lists {entry!r}, but neither {entry}.ipynb nor {entry}.md exists")


def chapters(root: Path) -> list[Path]:
    """The notebooks of the book, in reading order."""
    return [p for p in (resolve_document(root, e) for e in toc_files(root)) if p.suffix == ".ipynb"]


def profile_parameters(root: Path, profile: str | None, notebook: Path) -> dict[str, Any]:
    """The parameters of ``profile`` for one chapter (``book/params/<profile>/<stem>.yaml``), or ``{}``."""
    if not profile:
        return {}
    import yaml

    folder = root / "book" / "params" / profile
    if not folder.is_dir():
        raise FileNotFoundError(f"unknown parameter profile {profile!r}: {folder} does not exist")
    path = folder / f"{notebook.stem}.yaml"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of parameter names to values")
    return values


def chapter_timeout(notebook: Path, default: int = DEFAULT_TIMEOUT) -> int:
    """A chapter may raise its own limit with notebook metadata ``{"lmcore": {"timeout": seconds}}``."""
    with open(notebook, encoding="utf-8") as f:
        meta = json.load(f).get("metadata", {})
    return int(meta.get("lmcore", {}).get("timeout", default))


def kernel_environment(source: Path, results_path: Path | None) -> dict[str, str]:
    """Environment for a chapter's kernel: static figures, its source, a results file, this interpreter's kernels."""
    env = {STATIC_ENV: "1", SOURCE_ENV: str(Path(source).resolve()),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    if results_path is not None:
        env[RESULTS_ENV] = str(results_path)
    # Make "python3" mean this environment's kernel even if the user has another one registered.
    share = Path(sys.prefix) / "share" / "jupyter"
    if share.is_dir():
        env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(share), os.environ.get("JUPYTER_PATH")]))
    return env


class _patched_environ:
    def __init__(self, values: dict[str, str]):
        self.values = values

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quiet_kernel_manager():
    """A kernel manager whose kernels do not write to this process's stderr: cell outputs reach the
    notebook anyway, and a kernel stopped with its run (Ctrl-C) would print tracebacks of its own."""
    import subprocess as sp

    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        async def _async_start_kernel(self, **kw):
            kw.setdefault("stderr", sp.DEVNULL)
            return await super()._async_start_kernel(**kw)

        start_kernel = _async_start_kernel

    return QuietKernelManager


def _quiet_abandoned_cells():
    """The event loop papermill runs cells on, set to drop the error of a cell abandoned by Ctrl-C.

    Ctrl-C (or SIGTERM) stops papermill while nbclient waits for a cell; papermill then shuts the
    kernel down on the same loop, where the abandoned cell may wake, find its kernel gone and end
    in a ``DeadKernelError`` that nothing reads. asyncio would print it ("Task exception was never
    retrieved", with a traceback) after the line that says what was interrupted. Only that error
    is dropped; a kernel that dies during a run is still reported by papermill, and any other
    unread error still reaches asyncio's own handler.
    """
    from jupyter_core.utils import ensure_event_loop
    from nbclient.exceptions import DeadKernelError

    def handler(loop, context):
        unread = context.get("message", "").startswith("Task exception was never retrieved")
        if not (unread and isinstance(context.get("exception"), DeadKernelError)):
            loop.default_exception_handler(context)

    loop = ensure_event_loop()
    loop.set_exception_handler(handler)
    return loop


def source_cell(source: Path, executed_index: int, injected: bool) -> str:
    """``"cell N"`` as a reader counts the cells of the source notebook (from 1), for a cell index
    of the executed copy, in which papermill inserted its parameters cell when it was given any."""
    if injected:
        with open(source, encoding="utf-8") as f:
            tags = [c.get("metadata", {}).get("tags", []) for c in json.load(f)["cells"]]
        replaced = any("injected-parameters" in t for t in tags)  # papermill overwrites such a cell
        params = next((i for i, t in enumerate(tags) if "parameters" in t), -1)
        if not replaced:
            if executed_index == params + 1:
                if params < 0:
                    return "the parameters papermill injected before cell 1"
                return f"the parameters papermill injected after cell {params + 1}"
            if executed_index > params + 1:
                executed_index -= 1
    return f"cell {executed_index + 1} (counting from 1)"


def execute_notebook(
    source: Path,
    output: Path,
    parameters: dict[str, Any] | None = None,
    cwd: Path | None = None,
    timeout: int = DEFAULT_TIMEOUT,
    results_path: Path | None = None,
) -> None:
    """Execute one notebook with papermill; raise ``ChapterError`` naming the chapter and failing cell."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    if results_path is not None and results_path.exists():
        results_path.unlink()
    _quiet_abandoned_cells()
    try:
        with _patched_environ(kernel_environment(source, results_path)):
            papermill.execute_notebook(
                str(source),
                str(output),
                parameters=parameters or {},
                kernel_name=KERNEL,
                cwd=str(cwd or source.parent),
                progress_bar=False,
                log_output=False,
                request_save_on_cell_execute=False,
                execution_timeout=timeout,
                kernel_manager_class=_quiet_kernel_manager(),
            )
    except PapermillExecutionError as err:
        source_line = (err.source or "").strip().splitlines()
        first = source_line[0] if source_line else ""
        raise ChapterError(
            f"chapter {source.name} failed in {source_cell(source, err.cell_index, bool(parameters))} "
            f"(execution count {err.exec_count}, starting {first!r}): {err.ename}: {err.evalue}"
        ) from None
    except Exception as err:  # kernel died, timeout, bad notebook: still name the chapter
        raise ChapterError(f"chapter {source.name} could not be executed: {type(err).__name__}: {err}") from err


COLAB_CELL = """import sys
if "google.colab" in sys.modules:  # running on Colab: install lmcore, its book extras and pinned versions first
    %pip install -q {command}"""


def repository(root: Path) -> tuple[str, str]:
    """The book's repository URL and branch, from ``_config.yml`` (the one place that names them)."""
    import yaml

    with open(root / "_config.yml", encoding="utf-8") as f:
        repo = (yaml.safe_load(f) or {}).get("repository") or {}
    if not str(repo.get("url", "")).startswith("https://"):
        raise ValueError(f"{root / '_config.yml'}: repository.url={repo.get('url')!r}; expected an https URL")
    return repo["url"].rstrip("/"), str(repo.get("branch") or "main")


def colab_cell(root: Path) -> str:
    """The install cell every chapter starts with: lmcore from the repository, at its constraints.txt."""
    from lmcore.utils import install_command

    url, branch = repository(root)
    raw = url.replace("https://github.com/", "https://raw.githubusercontent.com/") + f"/{branch}/constraints.txt"
    return COLAB_CELL.format(command=install_command(f"{url}@{branch}", constraints=raw))


def write_colab_cells(root: Path) -> list[Path]:
    """Rewrite each chapter's Colab install cell (the code cell mentioning google.colab) from ``_config.yml``.

    Only that cell's source changes; the rest of the file keeps its bytes (key order, ids, layout).
    """
    changed = []
    want = colab_cell(root).splitlines(keepends=True)
    for notebook in chapters(root):
        text = notebook.read_text(encoding="utf-8")
        nb = json.loads(text)
        cell = next((c for c in nb["cells"] if c["cell_type"] == "code" and "google.colab" in "".join(c["source"])),
                    None)
        if cell is None:
            raise ValueError(f"{notebook.name} has no Colab install cell (a code cell mentioning google.colab)")
        if cell["source"] != want:
            cell["source"] = want
            with atomic_write(notebook) as f:
                f.write(json.dumps(nb, indent=1, ensure_ascii=False) + ("\n" if text.endswith("\n") else ""))
            changed.append(notebook)
    return changed


def stage(root: Path, stage_dir: Path) -> Path:
    """Copy the book's sources into a clean ``stage_dir`` and return it."""
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, stage_dir / name)
    shutil.copytree(
        root / "book",
        stage_dir / "book",
        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "_artifacts", "__pycache__"),
    )
    return stage_dir


def render_html(stage_dir: Path, output: Path) -> None:
    """``jupyter-book build`` the staged tree with warnings as errors and publish it at ``output`` atomically."""
    jb = Path(sys.executable).with_name("jupyter-book")
    command = [str(jb) if jb.exists() else "jupyter-book", "build", str(stage_dir),
               "--builder", "html", "-W", "-n", "--keep-going"]
    with tempfile.TemporaryDirectory(prefix="lmcore-html-", dir=output.parent) as tmp:
        proc = subprocess.run([*command, "--path-output", tmp], capture_output=True, text=True)
        built = Path(tmp) / "_build" / "html"
        if proc.returncode != 0 or not (built / "index.html").is_file():
            log = (proc.stdout + proc.stderr)[-6000:]
            raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}); the last lines:\n{log}")
        old = output.with_name(output.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if output.exists():
            output.rename(old)
        built.rename(output)
        if old.exists():
            shutil.rmtree(old)


def select_chapters(root: Path, only: list[str] | None) -> list[str]:
    """The stems of the chapters to execute: all, or those ``only`` names (refusing unknown names)."""
    stems = [nb.stem for nb in chapters(root)]
    if not only:
        return stems
    import difflib

    picked = []
    for name in only:
        stem = Path(name).stem
        if stem not in stems:
            close = difflib.get_close_matches(stem, stems, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"--only {name!r} is not a chapter of this book; {hint}"
                             f"chapters: {', '.join(stems)}")
        picked.append(stem)
    return picked


def _source_hash(notebook: Path) -> str:
    import hashlib

    return hashlib.sha256(notebook.read_bytes()).hexdigest()


def keep_executed(source: Path, executed: Path, executed_dir: Path) -> None:
    """Record an executed chapter (with the hash of its source) for later ``--only`` builds to reuse."""
    nb = json.loads(executed.read_text(encoding="utf-8"))
    executed_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(executed_dir / executed.name) as f:
        json.dump({"source_sha256": _source_hash(source), "notebook": nb}, f)


def stand_in(staged: Path, executed_dir: Path) -> str:
    """Fill a chapter that is not executed in this build: its recorded outputs from an earlier build
    of the same source, or a one-cell page that says it was left out. Returns what was done."""
    recorded = executed_dir / staged.name
    if recorded.is_file():
        kept = json.loads(recorded.read_text(encoding="utf-8"))
        if kept.get("source_sha256") == _source_hash(staged):
            staged.write_text(json.dumps(kept["notebook"]), encoding="utf-8")
            return f"outputs reused from {recorded}"
    nb = json.loads(staged.read_text(encoding="utf-8"))
    title = next((line for c in nb["cells"] if c["cell_type"] == "markdown"
                  for line in "".join(c["source"]).splitlines() if line.startswith("# ")), f"# {staged.stem}")
    nb["cells"] = [{"cell_type": "markdown", "metadata": {}, "id": "left-out",
                    "source": f"{title}\n\nThis chapter was not executed in this build of the book "
                              f"(`python -m lmcore.book build --only ...`).\n"}]
    staged.write_text(json.dumps(nb), encoding="utf-8")
    return "left out: a placeholder page (no earlier outputs of this source)"


@dataclass
class ChapterRun:
    chapter: str
    seconds: float
    results: dict[str, Any]


def build(
    root: Path | None = None,
    profile: str | None = None,
    output: Path | None = None,
    only: list[str] | None = None,
    log=print,
) -> list[ChapterRun]:
    """Stage, execute and render the whole book; return each chapter's time and recorded results."""
    root = Path(root) if root else find_root()
    build_dir = root / "_build"
    output = Path(output) if output else build_dir / "html"
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    selected = select_chapters(root, only)
    staged = stage(root, root / "_stage")
    notebooks = [nb for nb in chapters(staged) if nb.stem in selected]
    executed_dir = build_dir / "executed"
    for notebook in chapters(staged):
        if notebook.stem not in selected:
            log(f"      {notebook.stem}: {stand_in(notebook, executed_dir)} (not in --only)")
    results_dir = build_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, notebook in enumerate(notebooks, 1):
        params = profile_parameters(root, profile, notebook)
        log(f"[{i}/{len(notebooks)}] executing {notebook.stem}" + (f" ({profile} parameters)" if profile else ""))
        t0 = time.perf_counter()
        results_path = results_dir / f"{notebook.stem}.json"
        # execute the pristine source into the staged copy, in the staged folder
        execute_notebook(root / notebook.relative_to(staged), notebook, params, cwd=notebook.parent,
                         timeout=chapter_timeout(notebook), results_path=results_path)
        seconds = time.perf_counter() - t0
        keep_executed(root / notebook.relative_to(staged), notebook, executed_dir)
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        runs.append(ChapterRun(notebook.stem, seconds, results))
        log(f"      {notebook.stem}: {seconds:.1f} s")
    log("rendering HTML with jupyter-book (warnings are errors)")
    t0 = time.perf_counter()
    render_html(staged, output)
    render_seconds = time.perf_counter() - t0
    total = time.perf_counter() - started
    timings = {"profile": profile, "chapters": {r.chapter: round(r.seconds, 2) for r in runs},
               "render_seconds": round(render_seconds, 2), "total_seconds": round(total, 2)}
    with atomic_write(build_dir / "timings.json") as f:
        json.dump(timings, f, indent=1)
    log(f"rendered in {render_seconds:.1f} s; whole build {total:.1f} s")
    log(f"open {output / 'index.html'}")
    return runs


def setup(app) -> dict:
    """Sphinx extension (``extra_extensions`` in ``_config.yml``): the bibliography style ``lmcore``,
    pybtex's plain style with titles as ``references.bib`` writes them (plain would print
    "Flashattention-2", lower-casing every title but its first letter)."""
    from pybtex.plugin import register_plugin
    from pybtex.style.formatting.plain import Style
    from pybtex.style.template import field, sentence

    class TitlesAsWritten(Style):
        def format_title(self, e, which_field, as_sentence=True):
            title = field(which_field)
            return sentence[title] if as_sentence else title

    register_plugin("pybtex.style.formatting", "lmcore", TitlesAsWritten, force=True)
    app.add_css_file(BOOK_CSS_NAME)
    app.connect("build-finished", _write_book_css)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


BOOK_CSS_NAME = "lmcore.css"
#: Code at 0.8rem: the 88 columns the chapters' code is wrapped at fit the text column without
#: scrolling sideways (tests/book/test_browser.py checks every code block of every page).
BOOK_CSS = ".bd-article pre, .bd-article pre code { font-size: 0.8rem; }\n"


def _write_book_css(app, exception) -> None:
    """Write the stylesheet ``setup`` linked into every page (when the HTML build succeeded)."""
    if exception is None and app.builder.format == "html":
        static = Path(app.outdir) / "_static"
        static.mkdir(parents=True, exist_ok=True)
        (static / BOOK_CSS_NAME).write_text(BOOK_CSS, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcore.book", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="execute every chapter and build the HTML book")
    b.add_argument("--profile", default=None, help="parameter profile (book/params/<profile>/), e.g. ci")
    b.add_argument("--only", nargs="+", default=None,
                   help="execute only these chapters (by stem); the others reuse the outputs of an earlier "
                        "build of the same source, or become placeholder pages")
    b.add_argument("--output", default=None, help="where to publish the HTML (default _build/html)")
    sub.add_parser("chapters", help="list the chapters in reading order")
    sub.add_parser("colab", help="rewrite each chapter's Colab install cell from the repository in _config.yml")
    args = parser.parse_args(argv)
    root = find_root()
    if args.command == "chapters":
        for nb in chapters(root):
            print(nb.relative_to(root))
        return 0
    if args.command == "colab":
        for nb in write_colab_cells(root):
            print("rewrote the Colab cell of", nb.relative_to(root))
        return 0
    try:
        build(root, profile=args.profile, output=Path(args.output) if args.output else None, only=args.only)
    except (ChapterError, RuntimeError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
