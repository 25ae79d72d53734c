"""Native Sparse Attention (Yuan et al., 2025), in readable PyTorch and through the block-sparse kernel.

Three branches look at the keys in three ways, and a gate mixes them per token and head:

1. **compressed**: each block of ``block_size`` keys (values) is compressed to one token (here a
   mean, or a learned map in :class:`NSA`); queries attend to the compressed tokens of blocks
   that have ended;
2. **selected**: the compressed attention probabilities say which key blocks matter; each query
   block keeps its ``top_n`` most important blocks (the first block and its own block always
   included) and attends to their tokens in full;
3. **sliding window**: the last ``window`` tokens.

``out = g_cmp * o_cmp + g_sel * o_sel + g_win * o_win``.

Simplifications, said plainly: compression and selection blocks have one size and no overlap
(the paper uses l = 32, stride 16, selection blocks of 64), and a query *block* shares its
selection (the paper shares it across the heads of a GQA group for each query token), so the
selected branch is exactly a block-sparse layout per (batch, head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from lmcore.sparse.kernel import block_sparse_attention, resolve_impl
from lmcore.sparse.patterns import BlockLayout, _check_int, local, num_blocks


def _masked_softmax(s: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed entries; rows with none are 0 (with finite gradients)."""
    any_ok = ok.any(-1, keepdim=True)
    s = s.masked_fill(~ok, float("-inf")).masked_fill(~any_ok, 0.0)
    return torch.softmax(s, -1) * ok


@dataclass
class NSAConfig:
    """Sizes of NSA's branches (tokens)."""

    block_size: int = 32  # compression and selection block
    top_n: int = 4  # key blocks each query block selects (first and own block included)
    window: int = 64  # sliding-window branch


def compress_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each complete block of ``block_size`` positions: (B, H, T, D) -> (B, H, T // block_size, D)."""
    B, H, T, D = x.shape
    nc = T // block_size
    return x[:, :, : nc * block_size].reshape(B, H, nc, block_size, D).mean(3)


def compressed_branch(q, k_cmp, v_cmp, block_size: int, causal: bool, scale: float):
    """Attention to compressed tokens; returns the output (B, H, T, D) and probabilities (B, H, T, nc)."""
    T, nc = q.shape[-2], k_cmp.shape[-2]
    s = (q.float() @ k_cmp.float().transpose(-1, -2)) * scale  # (B, H, T, nc)
    ok = torch.ones(T, nc, dtype=torch.bool, device=q.device)
    if causal:  # compressed token i summarises keys [i*bs, (i+1)*bs): usable once they all precede t
        t = torch.arange(T, device=q.device)[:, None]
        ends = (torch.arange(nc, device=q.device)[None, :] + 1) * block_size - 1
        ok = ends <= t
    p = _masked_softmax(s, ok)  # (B, H, T, nc), rows with nothing ended yet are 0
    return (p @ v_cmp.float()).to(q.dtype), p


@torch.no_grad()
def select_blocks(p_cmp: torch.Tensor, seq_len: int, block_size: int, top_n: int, causal: bool) -> torch.Tensor:
    """The selected-block layout (B, H, nq, nk): the ``top_n`` key blocks with the most compressed
    attention mass summed over each query block's queries; first and own block always kept."""
    B, H, T, nc = p_cmp.shape
    n = num_blocks(seq_len, block_size)
    pad = n * block_size - T
    mass = torch.nn.functional.pad(p_cmp.float(), (0, n - nc, 0, pad))  # (B, H, n*bs, n)
    score = mass.reshape(B, H, n, block_size, n).sum(3)  # (B, H, nq, nk)
    qb = torch.arange(n, device=p_cmp.device)[:, None]
    kb = torch.arange(n, device=p_cmp.device)[None, :]
    score = score.masked_fill((kb == 0) | (kb == qb), float("inf"))  # always kept
    if causal:
        score = score.masked_fill(kb > qb, float("-inf"))  # never selectable
    top = score.topk(min(top_n, n), dim=-1)
    layout = torch.zeros(B, H, n, n, dtype=torch.bool, device=p_cmp.device)
    layout.scatter_(-1, top.indices, top.values > float("-inf"))
    return layout


@lru_cache(maxsize=32)
def _sliding(seq_len: int, block_size: int, window: int, causal: bool) -> BlockLayout:
    """The sliding-window layout, built (and indexed) once per shape."""
    return local(seq_len, block_size, window, causal=causal)


def nsa_attention(q, k, v, causal: bool = True, block_size: int = 32, top_n: int = 4, window: int = 64,
                  gates: torch.Tensor | None = None, k_cmp: torch.Tensor | None = None,
                  v_cmp: torch.Tensor | None = None, impl: str = "auto", scale: float | None = None):
    """NSA on ``q, k, v`` (B, H, T, D).

    ``gates`` (B, H, T, 3) weigh the compressed, selected and window branches (default 1/3 each);
    ``k_cmp, v_cmp`` (B, H, T // block_size, D) are the compressed keys and values (default: block
    means). ``impl`` (one of :data:`~lmcore.sparse.kernel.IMPLS`) says how the selected and window
    branches run, as in :func:`block_sparse_attention`: ``"triton"`` through the block-sparse
    kernels, ``"torch"`` through their PyTorch version (which also skips the unselected blocks),
    ``"reference"`` as dense attention with the element mask (readable, T x T work), ``"auto"``
    Triton on a GPU or under the interpreter, else torch. The compressed branch is PyTorch always.
    """
    B, H, T, D = q.shape
    _check_int("block_size", block_size, 1, T)
    _check_int("top_n", top_n, 1)
    _check_int("window", window, 1)
    impl = resolve_impl(impl, q.is_cuda)
    if gates is not None and tuple(gates.shape) != (B, H, T, 3):
        raise ValueError(f"gates have shape {tuple(gates.shape)}; expected {(B, H, T, 3)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k_cmp = compress_mean(k, block_size) if k_cmp is None else k_cmp  # (B, H, nc, D)
    v_cmp = compress_mean(v, block_size) if v_cmp is None else v_cmp
    o_cmp, p_cmp = compressed_branch(q, k_cmp, v_cmp, block_size, causal, scale)
    selected = BlockLayout(select_blocks(p_cmp, T, block_size, top_n, causal), block_size, T, causal, name="nsa-selected")
    sliding = _sliding(T, block_size, window, bool(causal))
    o_sel = block_sparse_attention(q, k, v, selected, causal=causal, scale=scale, impl=impl)
    o_win = block_sparse_attention(q, k, v, sliding, causal=causal, scale=scale, impl=impl)
    if gates is None:
        return (o_cmp + o_sel + o_win) / 3
    g = gates.to(q.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_sel + g[..., 2:3] * o_win


class NSA(nn.Module):
    """A self-attention layer with NSA: learned block compression and learned sigmoid gates.

    ``x`` (B, T, dim) -> (B, T, dim). The compression of a block is a linear map of its
    ``block_size`` keys (values) plus a position embedding inside the block.
    """

    def __init__(self, dim: int, n_heads: int, config: NSAConfig | None = None, causal: bool = True):
        super().__init__()
        _check_int("n_heads", n_heads, 1)
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.config = config or NSAConfig()
        self.n_heads, self.head_dim, self.causal = n_heads, dim // n_heads, causal
        bs, hd = self.config.block_size, self.head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.block_pos = nn.Parameter(torch.zeros(bs, hd))
        self.compress_k = nn.Linear(bs * hd, hd)
        self.compress_v = nn.Linear(bs * hd, hd)
        self.gate = nn.Linear(dim, 3 * n_heads)

    def _compress(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        B, H, T, D = x.shape
        bs = self.config.block_size
        nc = T // bs
        blocks = x[:, :, : nc * bs].reshape(B, H, nc, bs, D) + self.block_pos  # (B, H, nc, bs, D)
        return proj(blocks.reshape(B, H, nc, bs * D))  # (B, H, nc, D)

    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        gates = torch.sigmoid(self.gate(x)).view(B, T, self.n_heads, 3).transpose(1, 2)  # (B, H, T, 3)
        cfg = self.config
        y = nsa_attention(q, k, v, self.causal, cfg.block_size, cfg.top_n, cfg.window, gates,
                          self._compress(k, self.compress_k), self._compress(v, self.compress_v), impl)
        return self.out(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
