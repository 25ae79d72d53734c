"""lmcore: the tested package behind the lmcore book.

Each subpackage holds the implementation one chapter of the book builds up:

- ``lmcore.tokenizer`` and ``lmcore.data``: byte-level BPE and the corpora (chapter 1)
- ``lmcore.nn``, ``lmcore.train``, ``lmcore.generate``: the Transformer, training, sampling (chapters 2-3)
- ``lmcore.sparse``: block-sparse attention patterns and NSA (chapter 5)
- ``lmcore.kernels``: FlashAttention-2 in Triton (chapter 4)
- ``lmcore.distributed``: data-parallel training (chapter 6)

Shared helpers live in ``lmcore.utils`` and ``lmcore.results``; the book itself is
built by ``lmcore.book`` and experiments are run by ``lmcore.experiments``.
Importing ``lmcore`` is cheap: no subpackage (and no torch) is imported here.
"""

__version__ = "0.1.0"
