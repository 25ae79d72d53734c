"""The compact index of a block layout: per query block the list of its key blocks, per key block
the list of query blocks that see it.

A kernel that loops over these lists does work proportional to the allowed blocks. Blocks carry
a flag: 1 = on the causal diagonal, 2 = sliding-window edge (``|q - k| < window``), 4 = touches
the ragged end of the sequence. Each list holds its unflagged ("full") blocks first and its
flagged ("edge") blocks after them, with the number of full ones, so a kernel can visit the full
blocks without any mask and pay for the element mask on edge blocks only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcore.sparse.patterns import BlockLayout


@dataclass
class BlockIndex:
    """Row and column lists of a layout, padded to the longest list, as int32 tensors.

    In every list the full (unflagged) blocks come first, in ascending order, then the flagged
    edge blocks, in ascending order; ``*_full`` counts the former, ``*_cnt`` all entries.
    """

    row_idx: torch.Tensor  # (Lb, Lh, nq, max_row) key block of each entry
    row_flag: torch.Tensor  # (Lb, Lh, nq, max_row) mask flags of each entry
    row_cnt: torch.Tensor  # (Lb, Lh, nq) entries per row
    row_full: torch.Tensor  # (Lb, Lh, nq) unflagged entries per row (listed first)
    col_idx: torch.Tensor  # (Lb, Lh, nk, max_col)
    col_flag: torch.Tensor  # (Lb, Lh, nk, max_col)
    col_cnt: torch.Tensor  # (Lb, Lh, nk)
    col_full: torch.Tensor  # (Lb, Lh, nk)
    window: int
    causal: bool

    def strides(self, batch: int, heads: int) -> tuple[int, int]:
        """Offsets (in rows) between batch elements and between heads; 0 where the layout is shared."""
        lb, lh, n = self.row_cnt.shape
        if lb not in (1, batch) or lh not in (1, heads):
            raise ValueError(f"a layout for (batch, heads) = ({lb}, {lh}) cannot serve inputs with "
                             f"batch={batch}, heads={heads}")
        return (lh * n if lb > 1 else 0), (n if lh > 1 else 0)


def _lists(blocks: torch.Tensor, flags: torch.Tensor):
    """Per row: full allowed blocks, then flagged allowed blocks (each ascending), cut to the longest row."""
    cnt = blocks.sum(-1, dtype=torch.int32)
    full = (blocks & (flags == 0)).sum(-1, dtype=torch.int32)
    width = max(int(cnt.max().item()) if cnt.numel() else 0, 1)
    rank = torch.where(blocks, (flags != 0).to(torch.int16), torch.full_like(flags, 2, dtype=torch.int16))
    order = torch.sort(rank, dim=-1, stable=True).indices[..., :width]  # 0 full, 1 edge, 2 not allowed
    idx = order.to(torch.int32).contiguous()
    flag = flags.gather(-1, order).to(torch.int32).contiguous()
    return idx, flag, cnt.contiguous(), full.contiguous()


def block_index(layout: BlockLayout, causal: bool = False, device=None) -> BlockIndex:
    """The compact index of ``layout`` (cached on the layout per causality and device)."""
    causal = bool(causal or layout.causal)
    device = torch.device(device) if device is not None else layout.blocks.device
    key = (causal, str(device))
    if key in layout._cache:
        return layout._cache[key]
    blocks, partial = layout.blocks.to(device), layout.partial.to(device)
    while blocks.dim() < 4:
        blocks, partial = blocks[None], partial[None]
    n = blocks.shape[-1]
    qb = torch.arange(n, device=device)[:, None]
    kb = torch.arange(n, device=device)[None, :]
    flags = partial.to(torch.int32) * 2
    if causal:
        blocks = blocks & (kb <= qb)
        flags = flags + (kb == qb).to(torch.int32)
    if layout.seq_len % layout.block_size:  # the last block, as keys or as queries, is ragged
        flags = flags + ((kb == n - 1) | (qb == n - 1)).to(torch.int32) * 4
    flags = flags.expand(blocks.shape)
    row = _lists(blocks, flags)
    col = _lists(blocks.transpose(-1, -2), flags.transpose(-1, -2))
    index = BlockIndex(*row, *col, window=int(layout.window), causal=causal)
    layout._cache[key] = index
    return index
