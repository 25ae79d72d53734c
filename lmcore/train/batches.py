"""Sampling training windows from a (memory-mapped) array of token ids."""

from __future__ import annotations

import os

import numpy as np
import torch


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a ``.npy`` file of token ids (nothing is read until a batch touches it)."""
    array = np.load(path, mmap_mode="r")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{os.fspath(path)} holds a {array.dtype} array of shape {array.shape}; "
                         "expected a 1-D array of integer token ids")
    return array


def get_batch(tokens: np.ndarray, batch_size: int, context_length: int, device="cpu",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``context_length`` tokens and the same windows shifted by one.

    Returns ``(x, y)``, int64 tensors of shape (batch_size, context_length) on ``device``;
    ``y[b, t]`` is the token after ``x[b, t]``.
    """
    n = len(tokens)
    if n <= context_length:
        raise ValueError(f"need more than context_length={context_length} tokens to draw a window, "
                         f"got {n}")
    starts = torch.randint(0, n - context_length, (batch_size,), generator=generator).numpy()
    window = np.stack([np.asarray(tokens[s:s + context_length + 1], dtype=np.int64) for s in starts])
    batch = torch.from_numpy(window)  # (B, T + 1)
    device = torch.device(device)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    return batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
