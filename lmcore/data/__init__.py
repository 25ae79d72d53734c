"""Corpora and token files (chapter 1; the training chapter adds batching).

- :func:`load_corpus`: the built-in generated stories, Python's docstrings or sources, a local file, or
  TinyStories / WikiText-2 through ``datasets``.
- :func:`tokenize_to_npy`: a text file -> a ``uint16``/``uint32`` ``.npy`` of token ids, in parallel.

Command line: ``python -m lmcore.data generate|tokenize`` (``--help`` for each).
"""

from lmcore.data.corpus import HUB_CORPORA, load_corpus, python_sources, stdlib_docstrings, stdlib_sources
from lmcore.data.stories import END_OF_TEXT, builtin_corpus, iter_stories
from lmcore.data.tokenize import dtype_for, tokenize_to_npy

__all__ = ["load_corpus", "python_sources", "stdlib_docstrings", "stdlib_sources", "builtin_corpus",
           "iter_stories", "END_OF_TEXT", "HUB_CORPORA", "tokenize_to_npy", "dtype_for", "write_corpus"]


def write_corpus(path, name_or_path: str = "builtin", size: int | None = None, seed: int = 0, **kwargs) -> str:
    """Write ``load_corpus(name_or_path, size, seed, ...)`` to ``path`` (atomically); return the path."""
    import os

    from lmcore.utils import atomic_write

    text = load_corpus(name_or_path, size=size, seed=seed, **kwargs)
    with atomic_write(path) as f:
        f.write(text)
    return os.fspath(path)
