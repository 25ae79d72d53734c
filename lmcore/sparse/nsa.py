"""Native Sparse Attention (Yuan et al., 2025): a readable PyTorch version and the fast path.

Three branches look at the keys in three ways, and learned gates mix them per token and head:

1. **compressed**: overlapping blocks of ``cmp_block`` keys taken every ``cmp_stride`` positions
   are each compressed to one token (a mean here; a small MLP with an intra-block position
   embedding in :class:`NSA`); a query attends to the compressed tokens whose blocks have ended;
2. **selected**: the compressed attention probabilities, summed over the query heads of a KV
   group and given to the ``sel_block``-sized blocks each compressed token overlaps, rank the key
   blocks; each query token keeps its ``top_n`` best (the first block and the ``n_local`` most
   recent ones always among them) and attends to their keys in full;
3. **sliding window**: the last ``window`` keys.

``out = g_cmp * o_cmp + g_sel * o_sel + g_win * o_win``.

Grouped-query attention is native: ``q (B, Hq, T, D)`` and ``k, v (B, Hkv, T, D)`` with
``Hq % Hkv == 0``; all query heads of a group share one selection, so the fast kernels load each
selected block once for the whole group (:mod:`lmcore.sparse.nsa_triton`). With fewer queries
than keys, the queries are the last positions (decoding with a KV cache).

Importance of block ``j`` for the query at ``t`` (our reading of the paper's eq. 9):
``I_t[j] = sum_{h in group} sum_i p_cmp[t, h, i] * |span_i ∩ block_j| / cmp_block``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from lmcore.sparse.kernel import resolve_impl
from lmcore.sparse.patterns import _check_int


@dataclass(frozen=True)
class NSAConfig:
    """Sizes of NSA's branches (tokens); the defaults are the paper's."""

    cmp_block: int = 32  # l: keys compressed into one token
    cmp_stride: int = 16  # d: distance between compressed blocks
    sel_block: int = 64  # l': selection block
    top_n: int = 16  # blocks each query selects (first and local blocks included)
    window: int = 512  # sliding-window branch (0: no such branch)
    n_local: int = 2  # most recent blocks always selected

    def __post_init__(self):
        for f in fields(self):
            _check_int(f.name, getattr(self, f.name), 0 if f.name in ("n_local", "window") else 1)
        if self.cmp_block % self.cmp_stride:
            raise ValueError(f"cmp_block={self.cmp_block} must be a multiple of cmp_stride={self.cmp_stride}")
        if self.sel_block % self.cmp_stride:
            raise ValueError(f"sel_block={self.sel_block} must be a multiple of cmp_stride={self.cmp_stride}")
        if self.cmp_block > self.sel_block:
            raise ValueError(f"cmp_block={self.cmp_block} must be at most sel_block={self.sel_block} "
                             "(a compressed token overlaps at most two selection blocks)")
        if self.n_local + 1 > self.top_n:
            raise ValueError(f"top_n={self.top_n} must be at least n_local + 1 = {self.n_local + 1} "
                             "(the first block and the local blocks are always selected)")

    @classmethod
    def from_options(cls, **options) -> "NSAConfig":
        """A config from keyword options, naming the valid ones when a name is unknown."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown NSA option(s) {unknown}; expected some of {names}")
        return cls(**options)

    def check_length(self, seq_len: int) -> None:
        """Refuse training on sequences with fewer selection blocks than ``top_n`` (dense, not sparse)."""
        n_blocks = -(-seq_len // self.sel_block)
        if self.top_n > n_blocks:
            raise ValueError(f"top_n={self.top_n} is more than the {n_blocks} blocks of {self.sel_block} tokens "
                             f"in a sequence of {seq_len}; use top_n <= {n_blocks} or a longer sequence")


def compress_mean(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Mean of each block of ``block`` positions taken every ``stride``: (B, H, T, D) -> (B, H, nc, D)."""
    if x.shape[2] < block:
        return x.new_zeros(*x.shape[:2], 0, x.shape[3])
    return x.unfold(2, block, stride).mean(-1)  # (B, H, nc, D)


def overlap_weights(n_cmp: int, n_blocks: int, cfg: NSAConfig, device=None) -> torch.Tensor:
    """(nc, n_blocks): the share of compressed token i's span that lies in selection block j."""
    start = torch.arange(n_cmp, device=device)[:, None] * cfg.cmp_stride
    lo = torch.arange(n_blocks, device=device)[None, :] * cfg.sel_block
    inside = (torch.minimum(start + cfg.cmp_block, lo + cfg.sel_block) - torch.maximum(start, lo)).clamp(min=0)
    return inside.float() / cfg.cmp_block


def _masked_softmax(s: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed entries; rows with none are 0 (with finite gradients)."""
    any_ok = ok.any(-1, keepdim=True)
    s = s.masked_fill(~ok, float("-inf")).masked_fill(~any_ok, 0.0)
    return torch.softmax(s, -1) * ok


def _attend(q, k, v, ok, scale):
    """Softmax attention of (B, Hq, Tq, D) queries to keys allowed by ``ok`` (B or 1, Hkv or 1, Tq, Tk)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if ok.shape[1] > 1:
        ok = ok.repeat_interleave(g, 1)
    p = _masked_softmax((q.float() @ k.float().transpose(-1, -2)) * scale, ok)
    return (p @ v.float()).to(q.dtype), p


def select_blocks(p_cmp: torch.Tensor, n_keys: int, cfg: NSAConfig, group: int) -> torch.Tensor:
    """Indices (B, Hkv, Tq, top_n) of each query's selected blocks, best first (-1: none left).

    Scores are the group-summed compressed probabilities given to the blocks by overlap; the
    first block and the ``n_local`` most recent blocks score +inf, blocks after the query's own
    are excluded; ties go to the lower block.
    """
    bsz, hq, tq, n_cmp = p_cmp.shape
    n_blocks = -(-n_keys // cfg.sel_block)
    mass = p_cmp.float().reshape(bsz, hq // group, group, tq, n_cmp).sum(2)  # (B, Hkv, Tq, nc)
    score = mass @ overlap_weights(n_cmp, n_blocks, cfg, p_cmp.device)  # (B, Hkv, Tq, n_blocks)
    cur = ((n_keys - tq + torch.arange(tq, device=p_cmp.device)) // cfg.sel_block)[:, None]  # (Tq, 1)
    j = torch.arange(n_blocks, device=p_cmp.device)[None, :]
    forced = (j == 0) | ((j <= cur) & (j > cur - cfg.n_local))
    score = score.masked_fill(forced, float("inf")).masked_fill(j > cur, float("-inf"))
    score = torch.nn.functional.pad(score, (0, max(0, cfg.top_n - n_blocks)), value=float("-inf"))
    order = torch.sort(-score, dim=-1, stable=True)  # best first, lower block first on ties
    top = order.indices[..., : cfg.top_n]
    return torch.where(order.values[..., : cfg.top_n] < float("inf"), top, -1)  # -(-inf) = inf: excluded


def nsa_torch(q, k, v, k_cmp, v_cmp, cfg: NSAConfig, scale: float, gates=None, return_parts: bool = False):
    """NSA written directly from its definition (every score formed; the reference of the kernels)."""
    bsz, hq, tq, _ = q.shape
    tk, group = k.shape[2], q.shape[1] // k.shape[1]
    t = (tk - tq + torch.arange(tq, device=q.device))[:, None]  # query positions (Tq, 1)
    ends = torch.arange(k_cmp.shape[2], device=q.device)[None, :] * cfg.cmp_stride + cfg.cmp_block - 1
    o_cmp, p_cmp = _attend(q, k_cmp, v_cmp, (ends <= t)[None, None], scale)  # a block is usable once ended
    idx = select_blocks(p_cmp, tk, cfg, group)  # (B, Hkv, Tq, n)
    n_blocks = -(-tk // cfg.sel_block)
    chosen = torch.zeros(*idx.shape[:3], n_blocks + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(idx >= 0, idx, n_blocks), True)  # (B, Hkv, Tq, n_blocks + 1)
    s = torch.arange(tk, device=q.device)[None, :]
    sel_ok = chosen[..., :n_blocks].repeat_interleave(cfg.sel_block, -1)[..., :tk] & (s <= t)
    o_sel, _ = _attend(q, k, v, sel_ok, scale)
    o_win = _attend(q, k, v, ((s <= t) & (s > t - cfg.window))[None, None], scale)[0] if cfg.window else 0 * o_sel
    out = _mix(o_cmp, o_sel, o_win, gates)
    return (out, dict(o_cmp=o_cmp, o_sel=o_sel, o_win=o_win, idx=idx, p_cmp=p_cmp)) if return_parts else out


def _mix(o_cmp, o_sel, o_win, gates):
    if gates is None:
        return (o_cmp + o_sel + o_win) / 3
    g = gates.to(o_cmp.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_sel + g[..., 2:3] * o_win


def _check(q, k, v, gates, k_cmp, v_cmp, cfg: NSAConfig):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"nsa_attention expects q (B, Hq, T, D) and k, v (B, Hkv, T, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (bsz, hq, tq, d), hkv, tk = q.shape, k.shape[1], k.shape[2]
    if k.shape[0] != bsz or k.shape[3] != d or hq % hkv:
        raise ValueError(f"keys {tuple(k.shape)} do not fit queries {tuple(q.shape)}: batch and head dim must "
                         f"match and the {hq} query heads must be a multiple of the {hkv} KV heads")
    if tq > tk:
        raise ValueError(f"{tq} queries but only {tk} keys: queries must be the last positions of the keys")
    if torch.is_grad_enabled() and q.requires_grad and tq == tk:
        cfg.check_length(tk)  # training; decoding a short prompt may see fewer blocks than top_n
    if gates is not None and tuple(gates.shape) != (bsz, hq, tq, 3):
        raise ValueError(f"gates have shape {tuple(gates.shape)}; expected {(bsz, hq, tq, 3)}")
    n_cmp = max(0, (tk - cfg.cmp_block) // cfg.cmp_stride + 1)
    for name, x in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if x is not None and tuple(x.shape) != (bsz, hkv, n_cmp, d):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {(bsz, hkv, n_cmp, d)}")


def nsa_attention(q, k, v, config: NSAConfig | None = None, gates: torch.Tensor | None = None,
                  k_cmp: torch.Tensor | None = None, v_cmp: torch.Tensor | None = None, impl: str = "auto",
                  scale: float | None = None, **sizes):
    """NSA of ``q (B, Hq, Tq, D)`` over ``k, v (B, Hkv, Tk, D)`` (causal; queries at the last positions).

    ``config`` (or its fields as keywords, e.g. ``top_n=8``) sets the sizes; ``gates``
    (B, Hq, Tq, 3) weigh the compressed, selected and window branches (default 1/3 each);
    ``k_cmp, v_cmp`` (B, Hkv, nc, D) are the compressed keys and values (default: block means).
    ``impl``: ``"triton"`` (the kernels of :mod:`lmcore.sparse.nsa_triton`; on a CPU under
    ``TRITON_INTERPRET=1``), ``"torch"`` (:func:`nsa_torch`, every score formed), ``"auto"``
    (Triton on a GPU or under the interpreter, else torch).
    """
    cfg = config if config is not None else NSAConfig.from_options(**sizes)
    if config is not None and sizes:
        raise ValueError(f"give either config or sizes {sorted(sizes)}, not both")
    impl = resolve_impl(impl, q.is_cuda)
    _check(q, k, v, gates, k_cmp, v_cmp, cfg)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k_cmp = compress_mean(k, cfg.cmp_block, cfg.cmp_stride) if k_cmp is None else k_cmp
    v_cmp = compress_mean(v, cfg.cmp_block, cfg.cmp_stride) if v_cmp is None else v_cmp
    if impl in ("torch", "reference"):
        return nsa_torch(q, k, v, k_cmp, v_cmp, cfg, scale, gates)
    from lmcore.sparse.nsa_triton import nsa_triton

    return nsa_triton(q, k, v, k_cmp, v_cmp, cfg, scale, gates)


class NSA(nn.Module):
    """A self-attention layer with NSA: ``x`` (B, T, dim) -> (B, T, dim).

    Grouped queries (``n_kv_heads`` KV heads), a learned compression of each block (its keys plus
    an intra-block position embedding, through a two-layer MLP) and per-head sigmoid gates.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, config: NSAConfig | None = None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        _check_int("n_heads", n_heads, 1)
        _check_int("n_kv_heads", n_kv_heads, 1)
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}, and n_heads by "
                             f"n_kv_heads={n_kv_heads}")
        self.config = config or NSAConfig()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        hd, lb = self.head_dim, self.config.cmp_block
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * n_kv_heads * hd, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.block_pos = nn.Parameter(torch.zeros(lb, hd))
        self.compress_k = nn.Sequential(nn.Linear(lb * hd, hd), nn.GELU(), nn.Linear(hd, hd))
        self.compress_v = nn.Sequential(nn.Linear(lb * hd, hd), nn.GELU(), nn.Linear(hd, hd))
        self.gate = nn.Linear(dim, 3 * n_heads)

    def compress(self, x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        """(B, Hkv, T, D) -> (B, Hkv, nc, D): each block of ``cmp_block`` keys, every ``cmp_stride``."""
        cfg = self.config
        if x.shape[2] < cfg.cmp_block:
            return x.new_zeros(*x.shape[:2], 0, x.shape[3])
        blocks = x.unfold(2, cfg.cmp_block, cfg.cmp_stride).transpose(-1, -2) + self.block_pos  # (B, H, nc, l, D)
        return mlp(blocks.flatten(-2))  # (B, H, nc, D)

    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        B, T, C = x.shape
        hd = self.head_dim
        q = self.q(x).view(B, T, self.n_heads, hd).transpose(1, 2)  # (B, Hq, T, hd)
        k, v = self.kv(x).view(B, T, 2, self.n_kv_heads, hd).permute(2, 0, 3, 1, 4)  # (B, Hkv, T, hd)
        gates = torch.sigmoid(self.gate(x)).view(B, T, self.n_heads, 3).transpose(1, 2)  # (B, Hq, T, 3)
        y = nsa_attention(q, k, v, self.config, gates, self.compress(k, self.compress_k),
                          self.compress(v, self.compress_v), impl)
        return self.out(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
