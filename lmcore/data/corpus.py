"""``load_corpus``: the built-in stories, Python's own docstrings, a local file, or a hub data set."""

from __future__ import annotations

import ast
import os
import sysconfig
from dataclasses import dataclass

from lmcore.data.stories import END_OF_TEXT, builtin_corpus


@dataclass(frozen=True)
class HubCorpus:
    """Where a real corpus lives on the Hugging Face hub and how its records become one text."""

    path: str  # the data set repository
    name: str | None  # its configuration
    text_field: str  # the column holding the text
    separator: str  # placed after every record


HUB_CORPORA = {
    "tinystories": HubCorpus("roneneldan/TinyStories", None, "text", END_OF_TEXT),
    "wikitext-2": HubCorpus("Salesforce/wikitext", "wikitext-2-raw-v1", "text", ""),
}
BUILTIN_NAMES = ("builtin", "stdlib-docs", "stdlib-source", "python-source")
_LOCAL_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".txt": "text",
                   ".csv": "csv", ".arrow": "arrow"}


def load_corpus(name_or_path: str | os.PathLike = "builtin", size: int | None = None, seed: int = 0,
                split: str = "train", data_files=None, cache_dir: str | None = None) -> str:
    """Return a corpus as one string.

    - ``"builtin"``: the generated stories (:mod:`lmcore.data.stories`), ``size`` bytes (default 1 MB).
    - ``"stdlib-docs"``: the docstrings of the Python standard library installed here.
    - ``"stdlib-source"``: the source files of that standard library (code, comments and
      docstrings; 10-30 MB depending on whether the standard library's tests are installed): a
      larger real text every machine with Python has offline.
    - ``"python-source"``: those files followed by the ``.py`` files of every package installed
      in this environment (``site-packages``, sorted by path): hundreds of MB where torch is
      installed, for runs that need more tokens than the standard library holds. It depends on
      the environment, so record its size with the results.
    - ``"tinystories"`` / ``"wikitext-2"``: the data set through ``datasets`` (downloaded once into
      its cache; with ``size``, streamed, so only about ``size`` bytes are fetched). ``data_files`` replaces the hub repository with local files of the same layout
      (parquet, json/jsonl, csv or text), read by the same code.
    - anything else: a local UTF-8 text file.

    ``size`` (bytes) truncates the text at a character boundary; ``None`` keeps all of it.
    """
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"size={size!r}: expected a positive number of bytes or None")
    name = os.fspath(name_or_path)
    if name == "builtin":
        return builtin_corpus(size or (1 << 20), seed)
    if name == "stdlib-docs":
        text = stdlib_docstrings(size)
    elif name == "stdlib-source":
        text = stdlib_sources(size)
    elif name == "python-source":
        text = python_sources(size)
    elif name in HUB_CORPORA:
        text = _load_hub(HUB_CORPORA[name], split, data_files, cache_dir, size)
    elif os.path.isfile(name):
        text = _read_file(name, size)
    else:
        raise ValueError(f"corpus {name!r}: not a file, and not one of "
                         f"{', '.join(BUILTIN_NAMES + tuple(HUB_CORPORA))}")
    return _truncate(text, size)


def _truncate(text: str, size: int | None) -> str:
    if size is None:
        return text
    data = text.encode("utf-8")
    if len(data) <= size:
        return text
    return data[:size].decode("utf-8", errors="ignore")  # drop a character cut in half


def _read_file(path: str, size: int | None) -> str:
    with open(path, "rb") as f:
        data = f.read() if size is None else f.read(size + 4)
    if size is not None and len(data) > size:
        data = data[:size]
        # a cut in the middle of a character is not an error: step back to a character start
        while data and (data[-1] & 0xC0) == 0x80:
            data = data[:-1]
        if data and data[-1] >= 0xC0:
            data = data[:-1]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 at byte offset {err.start} ({err.reason}); "
                         "expected a UTF-8 text file") from None


def _load_hub(spec: HubCorpus, split: str, data_files, cache_dir, size: int | None) -> str:
    """Read a data set with ``datasets.load_dataset`` and join its text column."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"loading {spec.path!r} needs the 'datasets' package (pip install 'lmcore[data]')") from None
    if data_files is not None:
        first = data_files if isinstance(data_files, (str, os.PathLike)) else next(iter(
            data_files.values() if isinstance(data_files, dict) else data_files))
        first = os.fspath(first if isinstance(first, (str, os.PathLike)) else first[0])
        suffix = os.path.splitext(first)[1].lower()
        if suffix not in _LOCAL_BUILDERS:
            raise ValueError(f"data_files {first!r}: expected one of {', '.join(_LOCAL_BUILDERS)}")
        args = dict(path=_LOCAL_BUILDERS[suffix], data_files=data_files)
    else:
        args = dict(path=spec.path, name=spec.name)
    # With a size, stream the records: only as much as needed is downloaded (or read).
    dataset = datasets.load_dataset(**args, split=split, cache_dir=cache_dir, streaming=size is not None)
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # some streamed data sets only know their columns after the first record
        first = next(iter(dataset), {})
        columns = list(first)
    if spec.text_field not in columns:
        raise ValueError(f"{spec.path}: no column {spec.text_field!r}; columns are {columns}")
    parts, total = [], 0
    for record in dataset:
        text = record[spec.text_field] + spec.separator
        parts.append(text)
        total += len(text)
        if size is not None and total >= size:  # each character is at least one byte: enough
            break
    return "".join(parts)


def stdlib_docstrings(size: int | None = None) -> str:
    """Docstrings of the installed Python standard library, separated by ``<|endoftext|>``.

    A second, real-text corpus read at run time: sorted by module path, so it is deterministic
    for a given Python version.
    """
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("test", "tests", "site-packages", "idlelib"))
        for filename in sorted(n for n in names if n.endswith(".py")):
            try:
                with open(os.path.join(folder, filename), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        parts.append(doc + END_OF_TEXT)
                        total += len(doc) + len(END_OF_TEXT)
            if size is not None and total >= size:
                return "".join(parts)
    return "".join(parts)


def stdlib_sources(size: int | None = None) -> str:
    """The ``.py`` files of the installed standard library (its tests included, ``site-packages``
    not), sorted by path, each followed by ``<|endoftext|>``."""
    return _python_files([sysconfig.get_paths()["stdlib"]], size)


def python_sources(size: int | None = None) -> str:
    """The standard library's ``.py`` files, then those of every installed package, sorted by path,
    each followed by ``<|endoftext|>``."""
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"]] + sorted({paths["purelib"], paths["platlib"]})
    return _python_files(roots, size)


def _python_files(roots: list[str], size: int | None) -> str:
    parts, total = [], 0
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "__pycache__"))
            for filename in sorted(n for n in names if n.endswith(".py")):
                try:
                    with open(os.path.join(folder, filename), encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                parts.append(text + END_OF_TEXT)
                total += len(text) + len(END_OF_TEXT)
                if size is not None and total >= size:
                    return "".join(parts)
    return "".join(parts)
