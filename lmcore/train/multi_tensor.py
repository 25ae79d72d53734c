"""One kernel launch over many tensors: a table of their addresses and a map from program to tensor.

A multi-tensor kernel runs one program per chunk of ``chunk`` values of every tensor in a list (a
parameter group has ~150 tensors in GPT-2 small: one launch instead of 150 saves ~150 launch costs,
which on a GPU add up to more than the memory traffic of the update itself). Program ``pid`` finds
its tensor ``i = chunks[pid]`` and that tensor's operands (parameter, gradient, moments...) in
``table``, an int64 vector of ``n`` tensors with ``k`` operands each::

    table[r * n + i]        address of operand r of tensor i            (r < k)
    table[k * n + i]        numel of tensor i (of operand 0)
    table[(k + 1) * n + i]  the first program of tensor i               (pid - first = chunk index)

The kernel turns an address into a typed pointer with ``tl.load(table + r * n + i).to(like.dtype)``
(``like``: any tensor argument of the operand's dtype). Table and map are built on the host and
copied to the device only when an address or a length changes; each step compares the operands'
``data_ptr`` with the last build (new gradient tensors, a moved parameter, a loaded state dict).
"""

from __future__ import annotations

import itertools

import torch

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel


class AddressTable:
    """The cached ``(table, chunks, n, aligned)`` of one list of operand lists (see the module doc).

    ``aligned``: every address is a multiple of 16 bytes (lets the kernel promise the compiler
    vector loads; a view at an odd offset makes it False, and the kernel then loads without the hint).
    """

    def __init__(self, chunk: int):
        self.chunk = int(chunk)
        self._key = None
        self._built = None

    def get(self, operands: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """``operands[i]``: the tensors of tensor ``i`` (same device for all), operand 0 giving the numel."""
        rows = list(zip(*operands))  # (k lists of n tensors)
        key = (tuple(map(_numel, rows[0])),) + tuple(tuple(map(_data_ptr, r)) for r in rows)
        if key != self._key:
            self._built = self._build(key, rows[0][0].device)
            self._key = key
        return self._built

    def _build(self, key, device) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        numels, addresses = key[0], [a for row in key[1:] for a in row]
        counts = [-(-n // self.chunk) for n in numels]  # programs per tensor
        first = list(itertools.accumulate(counts, initial=0))[:-1]
        table = torch.tensor(addresses + list(numels) + first, dtype=torch.int64)
        chunks = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(counts))
        if device.type != "cpu":  # pinned, so the copy is queued behind the running work, no host wait
            table = table.pin_memory().to(device, non_blocking=True)
            chunks = chunks.pin_memory().to(device, non_blocking=True)
        return table, chunks, len(numels), all(a % 16 == 0 for a in addresses)


def cached_table(tables: dict, key, chunk: int, limit: int = 16) -> AddressTable:
    """``tables[key]``, an :class:`AddressTable` of ``chunk``-value chunks made when missing. The cache is
    emptied once it holds ``limit`` tables: the parameter lists it serves come and go."""
    if key not in tables:
        if len(tables) >= limit:
            tables.clear()
        tables[key] = AddressTable(chunk)
    return tables[key]
