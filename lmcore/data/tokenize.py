"""Tokenizing a text file into a ``.npy`` array of token ids, in parallel, memory-mapped.

The file is cut at special-token boundaries (see :func:`lmcore.tokenizer.pretokenize.chunk_boundaries`),
so each chunk encodes exactly as it would inside the whole file. Workers encode chunks and write
each one to a temporary ``.npy``; the parent copies the parts in order into the output, opened with
``numpy.lib.format.open_memmap``, and renames it into place only when complete.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile

import numpy as np

from lmcore.tokenizer import Tokenizer
from lmcore.tokenizer.pretokenize import chunk_boundaries, default_processes, read_utf8

_worker_tokenizer: Tokenizer | None = None


def dtype_for(tokenizer: Tokenizer) -> np.dtype:
    """``uint16`` when every id fits (vocab of at most 65,536), else ``uint32``."""
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)


def _init(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk(job) -> tuple[int, str, int]:
    index, path, start, end, folder, dtype = job
    ids = np.asarray(_worker_tokenizer.encode(read_utf8(path, start, end)), dtype=dtype)
    part = os.path.join(folder, f"part-{index:06d}.npy")
    np.save(part, ids)
    return index, part, end - start


def tokenize_to_npy(input_path, tokenizer: Tokenizer, out_path, num_processes: int | None = None,
                    chunk_bytes: int = 8 << 20, progress: bool = True) -> np.memmap:
    """Encode the UTF-8 file ``input_path`` with ``tokenizer`` into ``out_path`` (a 1-D ``.npy``).

    Returns the result opened read-only as a memory map. ``num_processes`` defaults to one per CPU
    (one for files under 1 MB); a progress bar counts bytes.
    """
    input_path, out_path = os.fspath(input_path), os.fspath(out_path)
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer: expected an lmcore Tokenizer, got {type(tokenizer).__name__}")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"input_path={input_path!r}: no such file")
    if not out_path.endswith(".npy"):
        raise ValueError(f"out_path={out_path!r}: expected a file name ending in .npy")
    size = os.path.getsize(input_path)
    procs = default_processes(size, num_processes)
    specials = list(tokenizer.special_tokens)
    cuts = chunk_boundaries(input_path, max(procs, -(-size // chunk_bytes)), specials, tokenizer.pattern)
    dtype = dtype_for(tokenizer)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=".tokenize-", dir=out_dir)
    try:
        jobs = [(i, input_path, a, b, folder, dtype.str) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        parts: dict[int, str] = {}
        from tqdm.auto import tqdm

        with tqdm(total=size, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            if procs == 1 or len(jobs) == 1:
                _init(tokenizer)
                results = map(_encode_chunk, jobs)
                pool = None
            else:
                ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
                pool = ctx.Pool(min(procs, len(jobs)), initializer=_init, initargs=(tokenizer,))
                results = pool.imap_unordered(_encode_chunk, jobs)
            try:
                for index, part, nbytes in results:
                    parts[index] = part
                    bar.update(nbytes)
            finally:
                if pool is not None:
                    pool.close()
                    pool.join()
        lengths = [np.load(parts[i], mmap_mode="r").shape[0] for i in range(len(jobs))]
        tmp = os.path.join(folder, "all.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(sum(lengths),))
        offset = 0
        for i, n in enumerate(lengths):
            out[offset:offset + n] = np.load(parts[i], mmap_mode="r")
            offset += n
        out.flush()
        del out
        os.replace(tmp, out_path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return np.load(out_path, mmap_mode="r")
