"""Sparse attention patterns as block layouts.

A pattern says which keys each query may attend to. We store it at the granularity a kernel
works at: the sequence is cut into blocks of ``block_size`` tokens and a boolean layout of
shape ``(query blocks, key blocks)`` marks the blocks that hold at least one allowed pair.
Inside a block the pattern may be finer than the block, so each layout also carries

- ``causal``: keys after the query are never allowed (``k <= q``), also inside diagonal blocks;
- ``partial`` and ``window``: in the blocks marked ``partial``, only pairs with
  ``|q - k| < window`` are allowed (the edge of a sliding window that is not block-aligned).

Every other allowed block is allowed in full. ``BlockLayout.element_mask()`` spells the
token-level mask out, which is what the kernel must agree with.

Patterns (each with a causal variant, ``causal=True``):

=========== ==============================================================================
``dense``   every block (the baseline)
``local``   sliding window: ``|q - k| < window``
``strided`` fixed/strided (Child et al., 2019): the query's own chunk of ``stride`` tokens,
            plus the last block of every chunk, which thereby acts as a global summary
``global``  the first ``num_global`` tokens see and are seen by everything; plus the diagonal
``mixed``   ``local`` + ``global``
``bigbird`` ``local`` + ``global`` + ``num_random`` random key blocks per query block (seeded)
``dilated`` key blocks at block distances 0, d, 2d, ... up to ``span`` tokens away
=========== ==============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class BlockLayout:
    """A block-sparse attention pattern.

    ``blocks`` is a bool tensor ``(nq, nk)``, or ``(H, nq, nk)`` / ``(B, H, nq, nk)`` for a layout
    per head (and per batch element), with ``nq = nk = ceil(seq_len / block_size)``.
    """

    blocks: torch.Tensor
    block_size: int
    seq_len: int
    causal: bool = False
    window: int = 0
    partial: torch.Tensor | None = None
    name: str = "custom"
    params: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        _check_int("block_size", self.block_size, 1)
        _check_int("seq_len", self.seq_len, 1)
        n = num_blocks(self.seq_len, self.block_size)
        if not isinstance(self.blocks, torch.Tensor) or self.blocks.dtype != torch.bool:
            raise TypeError(f"layout blocks must be a bool tensor, got {type(self.blocks).__name__} "
                            f"{getattr(self.blocks, 'dtype', '')}")
        if self.blocks.dim() not in (2, 3, 4) or tuple(self.blocks.shape[-2:]) != (n, n):
            raise ValueError(f"layout blocks have shape {tuple(self.blocks.shape)}; expected (..., {n}, {n}) "
                             f"for seq_len={self.seq_len} and block_size={self.block_size}")
        if self.partial is None:  # no partial blocks (and no read-back of a GPU tensor to check them)
            self.partial = torch.zeros_like(self.blocks)
        elif self.partial.shape != self.blocks.shape or self.partial.dtype != torch.bool:
            raise ValueError(f"partial has shape {tuple(self.partial.shape)} {self.partial.dtype}; "
                             f"expected bool {tuple(self.blocks.shape)}")
        elif self.window < 1 and bool(self.partial.any()):
            raise ValueError(f"window={self.window}: partial blocks need a window >= 1")
        if self.causal:  # drop blocks entirely above the diagonal
            tri = torch.ones(n, n, dtype=torch.bool, device=self.blocks.device).tril()
            self.blocks = self.blocks & tri
            self.partial = self.partial & self.blocks
        else:
            self.partial = self.partial & self.blocks

    @property
    def num_blocks(self) -> int:
        """Blocks per side of the layout."""
        return self.blocks.shape[-1]

    @property
    def density(self) -> float:
        """Fraction of the ``nq x nk`` blocks that a kernel must visit."""
        return self.blocks.float().mean().item()

    @property
    def sparsity(self) -> float:
        """Fraction of blocks skipped: ``1 - density``."""
        return 1.0 - self.density

    def element_mask(self) -> torch.Tensor:
        """The token-level mask ``(..., seq_len, seq_len)``: True where query row may see key column."""
        t, bs = self.seq_len, self.block_size
        allowed = self.blocks.repeat_interleave(bs, -1).repeat_interleave(bs, -2)[..., :t, :t]
        if self.window > 0 and bool(self.partial.any()):
            part = self.partial.repeat_interleave(bs, -1).repeat_interleave(bs, -2)[..., :t, :t]
            band = torch.ones(t, t, dtype=torch.bool, device=self.blocks.device)
            band = band.tril(self.window - 1).triu(1 - self.window)  # |q - k| < window
            allowed = allowed & (~part | band)
        if self.causal:
            allowed = allowed.tril()  # k <= q
        return allowed

    @property
    def element_density(self) -> float:
        """Fraction of the ``seq_len x seq_len`` (query, key) pairs that are allowed."""
        return self.element_mask().float().mean().item()

    def to(self, device) -> "BlockLayout":
        """The same layout with its tensors on ``device``."""
        return BlockLayout(self.blocks.to(device), self.block_size, self.seq_len, self.causal,
                           self.window, self.partial.to(device), self.name, dict(self.params))

    def image(self, elements: bool = False):
        """A picture of the layout as a NumPy uint8 array: 0 skipped, 128 partial, 255 full.

        ``elements=True`` draws one pixel per (query, key) pair instead of one per block.
        Per-head layouts draw their first head.
        """
        if self.blocks.dim() > 2:
            first = lambda x: x.reshape(-1, *x.shape[-2:])[0]  # noqa: E731
            return BlockLayout(first(self.blocks), self.block_size, self.seq_len, self.causal, self.window,
                               first(self.partial)).image(elements)
        blocks = self.element_mask() if elements else self.blocks
        if elements:
            return (blocks.to(torch.uint8) * 255).cpu().numpy()
        img = blocks.to(torch.uint8) * 255
        diag = torch.eye(self.num_blocks, dtype=torch.bool, device=blocks.device)
        part = self.partial | (diag & self.blocks & self.causal)
        img[part] = 128
        return img.cpu().numpy()


def render(layout: BlockLayout, ax=None, elements: bool = False, title: str | None = None):
    """Draw ``layout`` with matplotlib (queries down, keys across) and return the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 3.2))
    extent = (0, layout.seq_len, layout.seq_len, 0)
    ax.imshow(layout.image(elements), cmap="Blues", vmin=0, vmax=255, extent=extent, interpolation="nearest")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    if title is None:
        title = f"{layout.name}: {layout.density:.0%} of blocks"
    ax.set_title(title, fontsize=9)
    return ax


# ---------------------------------------------------------------------------------------------
# The patterns. Each returns a BlockLayout; arguments in tokens are validated.


def num_blocks(seq_len: int, block_size: int) -> int:
    """Blocks needed to cover ``seq_len`` tokens (the last one may be partial)."""
    return -(-seq_len // block_size)


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be an integer {rng}")


def _check_multiple(name: str, value, block_size: int, low: int, seq_len: int) -> None:
    _check_int(name, value, low, seq_len)
    if value % block_size:
        raise ValueError(f"{name}={value} must be a multiple of block_size={block_size}")


def _grid(seq_len: int, block_size: int):
    _check_int("seq_len", seq_len, 1)
    _check_int("block_size", block_size, 1)
    n = num_blocks(seq_len, block_size)
    idx = torch.arange(n)
    return n, idx[:, None], idx[None, :]  # query block (n, 1), key block (1, n)


def _band(seq_len: int, block_size: int, window: int):
    """Blocks touching ``|q - k| < window`` and those of them not entirely inside it."""
    _check_int("window", window, 1)
    _, qb, kb = _grid(seq_len, block_size)
    dist = (qb - kb).abs()
    touches = (dist == 0) | ((dist - 1) * block_size + 1 < window)  # nearest pair inside
    inside = (dist + 1) * block_size - 1 < window  # farthest pair inside
    return touches, touches & ~inside


def _global_blocks(seq_len: int, block_size: int, num_global: int) -> torch.Tensor:
    _check_multiple("num_global", num_global, block_size, 0, seq_len)
    n, qb, kb = _grid(seq_len, block_size)
    g = num_global // block_size
    return (qb < g) | (kb < g)


def dense(seq_len: int, block_size: int, causal: bool = False) -> BlockLayout:
    """Every block: ordinary (causal) attention."""
    n, _, _ = _grid(seq_len, block_size)
    return BlockLayout(torch.ones(n, n, dtype=torch.bool), block_size, seq_len, causal, name="dense")


def local(seq_len: int, block_size: int, window: int, causal: bool = False) -> BlockLayout:
    """Sliding window: query ``q`` sees key ``k`` when ``|q - k| < window`` (and ``k <= q`` if causal)."""
    touches, partial = _band(seq_len, block_size, window)
    return BlockLayout(touches, block_size, seq_len, causal, window, partial, "local", {"window": window})


def strided(seq_len: int, block_size: int, stride: int, causal: bool = False) -> BlockLayout:
    """Strided/fixed: the query's chunk of ``stride`` tokens plus the last block of every chunk."""
    _check_multiple("stride", stride, block_size, block_size, seq_len)
    _, qb, kb = _grid(seq_len, block_size)
    s = stride // block_size
    blocks = (qb // s == kb // s) | (kb % s == s - 1)
    return BlockLayout(blocks, block_size, seq_len, causal, name="strided", params={"stride": stride})


def global_tokens(seq_len: int, block_size: int, num_global: int, causal: bool = False) -> BlockLayout:
    """The first ``num_global`` tokens see and are seen by every token; every block sees itself."""
    _check_multiple("num_global", num_global, block_size, block_size, seq_len)
    n = num_blocks(seq_len, block_size)
    blocks = _global_blocks(seq_len, block_size, num_global) | torch.eye(n, dtype=torch.bool)
    return BlockLayout(blocks, block_size, seq_len, causal, name="global", params={"num_global": num_global})


def mixed(seq_len: int, block_size: int, window: int, num_global: int, causal: bool = False) -> BlockLayout:
    """Sliding window plus global tokens (Longformer-style)."""
    touches, partial = _band(seq_len, block_size, window)
    glob = _global_blocks(seq_len, block_size, num_global)
    return BlockLayout(touches | glob, block_size, seq_len, causal, window, partial & ~glob, "mixed",
                       {"window": window, "num_global": num_global})


def bigbird(seq_len: int, block_size: int, window: int, num_global: int, num_random: int,
            seed: int = 0, causal: bool = False) -> BlockLayout:
    """BigBird-style: window + global + ``num_random`` random key blocks per query block."""
    touches, partial = _band(seq_len, block_size, window)
    glob = _global_blocks(seq_len, block_size, num_global)
    n = touches.shape[0]
    _check_int("num_random", num_random, 0, n)
    _check_int("seed", seed, 0)
    gen = torch.Generator().manual_seed(seed)
    rand = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        pool = n if not causal else i + 1  # a causal query block draws among blocks it may see
        pick = torch.randperm(pool, generator=gen)[: min(num_random, pool)]
        rand[i, pick] = True
    full = glob | rand
    return BlockLayout(touches | full, block_size, seq_len, causal, window, partial & ~full, "bigbird",
                       {"window": window, "num_global": num_global, "num_random": num_random, "seed": seed})


def dilated(seq_len: int, block_size: int, span: int, dilation: int, causal: bool = False) -> BlockLayout:
    """Key blocks at block distance 0, d, 2d, ... (d = ``dilation``) while within ``span`` tokens."""
    _check_int("span", span, 1)
    _check_int("dilation", dilation, 1)
    _, qb, kb = _grid(seq_len, block_size)
    dist = (qb - kb).abs()
    blocks = (dist % dilation == 0) & (dist * block_size < span)
    return BlockLayout(blocks, block_size, seq_len, causal, name="dilated",
                       params={"span": span, "dilation": dilation})


PATTERNS: dict[str, Callable[..., BlockLayout]] = {
    "dense": dense,
    "local": local,
    "strided": strided,
    "global": global_tokens,
    "mixed": mixed,
    "bigbird": bigbird,
    "dilated": dilated,
}


def make_layout(pattern: str, seq_len: int, block_size: int, causal: bool = False, **params) -> BlockLayout:
    """Build the layout called ``pattern`` (a key of ``PATTERNS``) with its parameters."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of: {', '.join(PATTERNS)}")
    try:
        return PATTERNS[pattern](seq_len, block_size, causal=causal, **params)
    except TypeError as err:  # a missing or unknown parameter
        raise ValueError(f"pattern {pattern!r}: {err}") from None
