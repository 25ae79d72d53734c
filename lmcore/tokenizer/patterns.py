"""Pre-tokenization: the regular expressions that cut text into words before BPE, and special tokens.

BPE never merges across a pre-token boundary, so the pattern decides which byte strings can
ever become one token (for example, a word and the space in front of it, but never a word and
the punctuation after it).
"""

from __future__ import annotations

import regex

#: The GPT-2 pattern: contractions, letters with an optional leading space, digits, other symbols,
#: and whitespace runs (a run before a word leaves its last space to that word).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: The GPT-4 ``cl100k_base`` pattern: case-insensitive contractions, digits in groups of at most
#: three, newlines kept apart from other whitespace, possessive quantifiers (no backtracking).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN}


def resolve_pattern(pattern: str | None) -> str:
    """Accept a pattern name (``"gpt2"``, ``"cl100k"``) or a regular expression; return the expression."""
    if pattern is None:
        return GPT2_PATTERN
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern={pattern!r}: expected 'gpt2', 'cl100k' or a non-empty regular expression")
    pattern = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pattern)
    except regex.error as err:
        raise ValueError(f"pattern={pattern!r} is not a valid regular expression: {err}") from None
    return pattern


def check_special_tokens(special_tokens) -> list[str]:
    """Validate special tokens: distinct non-empty strings, returned in the given order."""
    if isinstance(special_tokens, str):
        special_tokens = [special_tokens]
    out: list[str] = []
    for token in special_tokens or ():
        if not isinstance(token, str) or not token:
            raise ValueError(f"special token {token!r}: expected a non-empty string")
        if token in out:
            raise ValueError(f"special token {token!r} is given twice")
        out.append(token)
    return out


def special_splitter(special_tokens) -> regex.Pattern | None:
    """A regex that finds special tokens, the longest first (``<|a|><|a|>`` before ``<|a|>``)."""
    if not special_tokens:
        return None
    ordered = sorted(special_tokens, key=len, reverse=True)
    return regex.compile("(" + "|".join(regex.escape(t) for t in ordered) + ")")


def split_on_specials(text: str, splitter: regex.Pattern | None) -> list[str]:
    """Split ``text`` into pieces; odd positions hold the special tokens (as with ``re.split``)."""
    if splitter is None:
        return [text]
    return splitter.split(text)
