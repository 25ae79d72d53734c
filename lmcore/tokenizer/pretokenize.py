"""Counting pre-tokens in parallel over chunks of a file cut at special-token boundaries.

The file is never read whole: each worker process opens it, reads its own byte range, splits the
text on special tokens (so nothing ever merges across them), runs the pre-tokenization regex
and returns a ``Counter`` of pre-token strings. The parent adds the counters up.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from typing import Iterable

import regex

from lmcore.tokenizer.patterns import CL100K_PATTERN, GPT2_PATTERN, special_splitter, split_on_specials

#: Without special tokens, the two built-in patterns can safely be cut just before a space that
#: follows a printable ASCII character and precedes an ASCII letter (``x| word``): the space always
#: starts the next pre-token, and nothing before it looks past it. (A cut after a whitespace run
#: would not be safe: at the end of a chunk, ``\s+(?!\S)`` would take the whole run.)
_SAFE_CUT = regex.compile(rb"[!-~](?= [A-Za-z])")
_SAFE_NEWLINE_PATTERNS = (GPT2_PATTERN, CL100K_PATTERN)

_compiled: dict = {}


def _compile(pattern: str, specials: tuple[str, ...]):
    key = (pattern, specials)
    if key not in _compiled:
        _compiled[key] = (regex.compile(pattern), special_splitter(specials))
    return _compiled[key]


def count_text(text: str, pattern: str, specials: tuple[str, ...] = ()) -> Counter:
    """Count the pre-tokens of ``text``, leaving special tokens out."""
    compiled, splitter = _compile(pattern, tuple(specials))
    counts: Counter = Counter()
    for i, piece in enumerate(split_on_specials(text, splitter)):
        if i % 2 == 0 and piece:  # odd pieces are the special tokens themselves
            counts.update(compiled.findall(piece))
    return counts


def read_utf8(path: str, start: int, end: int) -> str:
    """Read bytes ``[start, end)`` of ``path`` as UTF-8, naming the byte offset of bad input."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 at byte offset {start + err.start} "
                         f"({err.reason}); expected a UTF-8 text file") from None


def _count_chunk(args) -> Counter:
    path, start, end, pattern, specials = args
    return count_text(read_utf8(path, start, end), pattern, specials)


def chunk_boundaries(path: str, num_chunks: int, specials=(), pattern: str = GPT2_PATTERN,
                     block: int = 1 << 16) -> list[int]:
    """Byte offsets ``[0, ..., size]`` cutting ``path`` into about ``num_chunks`` pieces.

    Each cut is moved forward to the start of the next special token (or, without special tokens
    and with a built-in pattern, to a space between a printable ASCII character and a letter), so every
    chunk pre-tokenizes exactly as it would inside the whole file. Cuts that find no such point
    merge into the next chunk.
    """
    size = os.path.getsize(path)
    if num_chunks <= 1 or size == 0:
        return [0, size]
    if specials:
        finder = regex.compile(b"|".join(regex.escape(s.encode("utf-8")) for s in specials))
        shift = 0
    elif pattern in _SAFE_NEWLINE_PATTERNS:
        finder, shift = _SAFE_CUT, 1
    else:
        return [0, size]
    longest = max((len(s.encode("utf-8")) for s in specials), default=1)
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, num_chunks):
            pos = max(size * k // num_chunks, cuts[-1] + 1)
            while pos < size:
                f.seek(pos)
                data = f.read(block + longest)
                match = finder.search(data)
                if match is not None:
                    pos += match.start() + shift
                    break
                pos += block
            pos = min(pos, size)
            if pos > cuts[-1]:
                cuts.append(pos)
    if cuts[-1] != size:
        cuts.append(size)
    return cuts


def _pool(num_processes: int):
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ctx.Pool(num_processes)


def default_processes(num_bytes: int | None, num_processes: int | None) -> int:
    """Worker count: as given, else one per CPU, but a single process for inputs under 1 MB."""
    if num_processes is not None:
        if not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"num_processes={num_processes!r}: expected a positive integer or None")
        return num_processes
    if num_bytes is not None and num_bytes < (1 << 20):
        return 1
    return max(1, os.cpu_count() or 1)


def count_file(path: str, pattern: str, specials=(), num_processes: int | None = None,
               chunk_bytes: int = 32 << 20) -> Counter:
    """Count the pre-tokens of a UTF-8 file in ``num_processes`` workers (streamed, chunk by chunk)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input={path!r}: no such file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"input={path!r}: the file is not readable")
    size = os.path.getsize(path)
    procs = default_processes(size, num_processes)
    num_chunks = max(procs, -(-size // chunk_bytes)) if procs > 1 else max(1, -(-size // chunk_bytes))
    cuts = chunk_boundaries(path, num_chunks, specials, pattern)
    jobs = [(path, a, b, pattern, tuple(specials)) for a, b in zip(cuts[:-1], cuts[1:])]
    total: Counter = Counter()
    if procs == 1 or len(jobs) == 1:
        for job in jobs:
            total.update(_count_chunk(job))
        return total
    with _pool(min(procs, len(jobs))) as pool:
        for counts in pool.imap_unordered(_count_chunk, jobs):
            total.update(counts)
    return total


def _batches(texts: Iterable[str], batch_chars: int):
    batch: list[str] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"input yielded {type(text).__name__}: expected str")
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield "".join(batch)
            batch, size = [], 0
    if batch:
        yield "".join(batch)


def _count_batch(args) -> Counter:
    text, pattern, specials = args
    return count_text(text, pattern, specials)


def count_iterable(texts: Iterable[str], pattern: str, specials=(), num_processes: int | None = None,
                   batch_chars: int = 1 << 20) -> Counter:
    """Count pre-tokens of an iterable of strings; each string is a document (never merged with the next).

    Strings are concatenated into batches, so a pre-token may run from one string into the next
    exactly as it would in a file holding their concatenation.
    """
    if isinstance(texts, str):
        texts = [texts]
    procs = default_processes(None, num_processes)
    total: Counter = Counter()
    # Batches are cut only where pre-tokenization is stable (at special tokens), like a file.
    batches = _stable_batches(texts, batch_chars, pattern, specials)
    if procs == 1:
        for batch in batches:
            total.update(count_text(batch, pattern, tuple(specials)))
        return total
    jobs = ((batch, pattern, tuple(specials)) for batch in batches)
    with _pool(procs) as pool:
        for counts in pool.imap_unordered(_count_batch, jobs):
            total.update(counts)
    return total


def _stable_batches(texts, batch_chars, pattern, specials):
    """Join strings into batches cut only at points where pre-tokenization cannot change."""
    if specials:
        finder = special_splitter(specials)
    elif pattern in _SAFE_NEWLINE_PATTERNS:
        finder = regex.compile(r"(?<=[!-~])(?= [A-Za-z])")
    else:
        yield "".join(_batches(texts, batch_chars))
        return
    buffer = ""
    for text in _batches(texts, batch_chars):
        buffer += text
        # cut at the last safe point that leaves the tail for the next batch
        cut = None
        for match in finder.finditer(buffer, len(buffer) // 2):
            cut = match.start()
        if cut:
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer
