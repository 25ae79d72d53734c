"""The byte-level BPE ``Tokenizer``: encode, decode, stream, save and load.

Two ways to apply merges, both exact for the files they come from:

- ``merge_by="pairs"`` (trained here, GPT-2 ``merges.txt``): repeatedly merge the adjacent pair
  with the lowest merge rank, every occurrence at once, as training did.
- ``merge_by="ranks"`` (tiktoken ``.tiktoken`` files, which have no merge list): repeatedly merge
  the leftmost adjacent pair whose concatenation has the lowest rank, one position at a time.
"""

from __future__ import annotations

import os
from itertools import repeat
from typing import Iterable, Iterator

import regex

from lmcore.tokenizer import files
from lmcore.tokenizer.patterns import CL100K_PATTERN, GPT2_PATTERN, resolve_pattern, special_splitter


_NO_MERGE = (float("inf"), -1)  # the rank of a pair that is not a merge


def merge(ids: list[int], a: int, b: int, new: int) -> list[int]:
    """``ids`` with every non-overlapping occurrence of the pair ``(a, b)``, left to right, replaced by ``new``."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _surrogate_error(text: str, offset: int = 0) -> ValueError:
    """The refusal of text holding a lone surrogate, at its position in the whole input."""
    where = next(i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff")
    return ValueError(f"the text holds a lone surrogate U+{ord(text[where]):04X} at character "
                      f"{offset + where}, which UTF-8 cannot encode; expected text decoded without "
                      "errors='surrogateescape'")


class Tokenizer:
    """A byte-level BPE tokenizer.

    ``vocab`` maps id -> bytes (special tokens included, as their UTF-8 bytes), ``merges`` lists the
    merged pairs of byte strings in order, ``special_tokens`` maps each special string to its id.
    """

    #: Pre-tokens remembered with their ids; the cache is emptied when it reaches this size, so
    #: streaming a file of any size keeps memory bounded.
    cache_size = 1 << 17

    #: ``encode_iterable`` carries this many trailing pre-tokens into the next block: a pre-token
    #: can depend on up to two characters after it (a contraction like ``'ll``), which lie within
    #: the next two pre-tokens for the GPT-2 and cl100k patterns.
    held_pieces = 2

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                 special_tokens: dict[str, int] | None = None, pattern: str = GPT2_PATTERN,
                 merge_by: str = "pairs"):
        if merge_by not in ("pairs", "ranks"):
            raise ValueError(f"merge_by={merge_by!r}: expected 'pairs' or 'ranks'")
        self.pattern = resolve_pattern(pattern)
        self.merge_by = merge_by
        self.vocab: dict[int, bytes] = {}
        for idx, token in vocab.items():
            if not isinstance(idx, int) or idx < 0 or not isinstance(token, bytes) or not token:
                raise ValueError(f"vocab entry {idx!r}: {token!r}; expected a non-negative int id -> non-empty bytes")
            self.vocab[idx] = token
        self.special_tokens: dict[str, int] = {}
        for text, idx in (special_tokens or {}).items():
            if not isinstance(text, str) or not text or not isinstance(idx, int) or idx < 0:
                raise ValueError(f"special token {text!r} -> {idx!r}: expected a non-empty str -> non-negative int id")
            if idx in self.vocab and self.vocab[idx] != text.encode("utf-8"):
                raise ValueError(f"special token {text!r} has id {idx}, which the vocab gives to {self.vocab[idx]!r}")
            self.special_tokens[text] = idx
            self.vocab[idx] = text.encode("utf-8")
        self._special_ids = set(self.special_tokens.values())
        if len(self._special_ids) != len(self.special_tokens):
            raise ValueError(f"special tokens {self.special_tokens}: two of them share an id")
        self._ids: dict[bytes, int] = {}
        for idx in sorted(self.vocab):
            if idx not in self._special_ids:
                self._ids.setdefault(self.vocab[idx], idx)
        missing = [b for b in range(256) if bytes([b]) not in self._ids]
        if missing:
            raise ValueError(f"the vocab lacks single bytes {missing[:8]}{'...' if len(missing) > 8 else ''}; "
                             "a byte-level vocab must hold all 256")
        self._byte_ids = [self._ids[bytes([b])] for b in range(256)]
        self._identity_bytes = self._byte_ids == list(range(256))  # byte b has id b (lmcore's layout)
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        self._pair_ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            try:
                key = (self._ids[a], self._ids[b])
                merged = self._ids[a + b]
            except KeyError as err:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}): {err.args[0]!r} is not in the vocab") from None
            self._pair_ranks.setdefault(key, (rank, merged))
        self._re = regex.compile(self.pattern)
        self._splitter = special_splitter(self.special_tokens)
        prefixes = {s[:k] for s in self.special_tokens for k in range(1, len(s))}
        self._special_prefixes = prefixes
        self._longest_prefix = max((len(p) for p in prefixes), default=0)
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ids may have gaps, as in ``cl100k_base``)."""
        return max(self.vocab) + 1

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={list(self.special_tokens)}, merge_by={self.merge_by!r})")

    # ------------------------------------------------------------------ BPE on one pre-token
    def _bpe_pairs(self, piece: bytes) -> list[int]:
        ids = list(piece) if self._identity_bytes else [self._byte_ids[b] for b in piece]
        rank_of = self._pair_ranks.get
        none = _NO_MERGE
        while len(ids) > 1:
            ranks = list(map(rank_of, zip(ids, ids[1:]), repeat(none)))  # (rank, merged id) per pair
            best = min(ranks)  # the earliest merge among the pairs
            if best is none:
                break
            i = ranks.index(best)
            if ranks.count(best) == 1:  # the usual case: one occurrence
                ids[i:i + 2] = [best[1]]
                continue
            ids = ids[:i] + merge(ids[i:], ids[i], ids[i + 1], best[1])
        return ids

    def _bpe_ranks(self, piece: bytes) -> list[int]:
        ranks = self._ids
        if piece in ranks:
            return [ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best, where = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best is None or rank < best):
                    best, where = rank, i
            if best is None:
                break
            parts[where:where + 2] = [parts[where] + parts[where + 1]]
        return [ranks[p] for p in parts]

    def _encode_pieces(self, pieces: list[str], out: list[int]) -> None:
        cache = self._cache
        bpe = self._bpe_pairs if self.merge_by == "pairs" else self._bpe_ranks
        for piece in pieces:
            try:
                out += cache[piece]
            except KeyError:
                ids = bpe(piece.encode("utf-8"))
                if len(cache) >= self.cache_size:
                    cache.clear()
                cache[piece] = ids
                out += ids

    # ------------------------------------------------------------------ public API
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens in the text become their ids (longest match first).

        Text that cannot be UTF-8 (a lone surrogate such as ``"\\ud800"``) is refused with its position.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        try:
            return self._encode_text(text)
        except UnicodeEncodeError:
            raise _surrogate_error(text) from None

    def _encode_text(self, text: str) -> list[int]:
        out: list[int] = []
        if self._splitter is None:
            self._encode_pieces(self._re.findall(text), out)
            return out
        for i, part in enumerate(self._splitter.split(text)):
            if i % 2:
                out.append(self.special_tokens[part])
            elif part:
                self._encode_pieces(self._re.findall(part), out)
        return out

    def encode_iterable(self, texts: Iterable[str], block_chars: int = 1 << 16) -> Iterator[int]:
        """Stream the ids of the concatenation of ``texts`` (e.g. an open file's lines).

        Equal to ``encode("".join(texts))`` while holding only about ``block_chars`` characters:
        text is encoded block by block, and the end of each block that could still change when
        more text arrives (the last two pre-tokens, a possible start of a special token) is
        carried into the next block. Memory stays within a few blocks plus the longest pre-token.
        """
        if isinstance(texts, str):
            texts = [texts]
        buffer, done = "", 0  # ``done``: characters of the stream before ``buffer``
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode_iterable expects an iterable of str, got {type(text).__name__}")
            buffer += text
            if len(buffer) < block_chars:
                continue
            try:
                ids, rest = self._encode_stable(buffer)
            except UnicodeEncodeError:
                raise _surrogate_error(buffer, done) from None
            done += len(buffer) - len(rest)
            buffer = rest
            yield from ids
        if buffer:
            try:
                ids = self._encode_text(buffer)
            except UnicodeEncodeError:
                raise _surrogate_error(buffer, done) from None
            yield from ids

    def _encode_stable(self, buffer: str) -> tuple[list[int], str]:
        """Encode the part of ``buffer`` that more text cannot change; return (ids, the rest)."""
        cut = len(buffer)
        for k in range(min(self._longest_prefix, len(buffer)), 0, -1):
            if buffer[-k:] in self._special_prefixes:
                cut -= k
                for match in self._splitter.finditer(buffer, max(0, cut - 2 * self._longest_prefix)):
                    if match.start() < cut < match.end():  # a special token straddles the cut
                        cut = match.start()
                        break
                break
        head, rest = buffer[:cut], buffer[cut:]
        parts = [head] if self._splitter is None else self._splitter.split(head)
        out: list[int] = []
        for i, part in enumerate(parts[:-1]):
            if i % 2:
                out.append(self.special_tokens[part])
            elif part:
                self._encode_pieces(self._re.findall(part), out)
        last = parts[-1]
        pieces = self._re.findall(last)
        if len(pieces) <= self.held_pieces:
            return out, last + rest
        # The last pre-tokens may still change with more text: '...we'l' is "'", "l" now but "'ll"
        # once the next 'l' arrives. Carry them into the next block.
        held = len("".join(pieces[-self.held_pieces:]))
        start = len(last) - held
        if not last.endswith("".join(pieces[-self.held_pieces:])):  # a pattern that skips characters
            starts = [m.start() for m in self._re.finditer(last)]
            start = starts[-self.held_pieces]
        self._encode_pieces(pieces[:-self.held_pieces], out)
        return out, last[start:] + rest

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        vocab = self.vocab
        if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):  # a tensor or an array
            shape = tuple(getattr(ids, "shape", ()))
            if len(shape) != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got shape {shape}; decode each row")
            ids = ids.tolist()
        ids = ids if isinstance(ids, (list, tuple)) else list(ids)
        try:
            data = b"".join([vocab[i] for i in ids])
        except (KeyError, TypeError):
            checked = []
            for i in ids:
                value = i.item() if hasattr(i, "item") and getattr(i, "ndim", 1) == 0 else i
                if isinstance(value, bool) or not isinstance(value, int) or value not in vocab:
                    raise ValueError(f"token id {value!r} is not in the vocabulary "
                                     f"(expected an int id in 0..{self.vocab_size - 1})") from None
                checked.append(value)
            data = b"".join([vocab[i] for i in checked])
        return data.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON (format in :mod:`lmcore.tokenizer.files`), atomically."""
        import json

        from lmcore.utils import atomic_write

        with atomic_write(path) as f:
            json.dump(files.to_json(self), f, ensure_ascii=False, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a file written by :meth:`save`."""
        args = files.from_json(path)
        try:
            return cls(**args)
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)}: malformed lmcore tokenizer file: {err}") from None

    @classmethod
    def from_gpt2_files(cls, vocab_path, merges_path, special_tokens=("<|endoftext|>",),
                        pattern: str = GPT2_PATTERN) -> "Tokenizer":
        """Read a GPT-2 style ``vocab.json`` + ``merges.txt`` pair.

        Each special token present in ``vocab.json`` keeps its id there; others get the next free ids.
        """
        vocab, merges = files.read_gpt2_files(vocab_path, merges_path)
        return cls._with_specials(vocab, merges, special_tokens, pattern, "pairs")

    @classmethod
    def from_tiktoken(cls, path, special_tokens: dict[str, int] | None = None,
                      pattern: str = CL100K_PATTERN) -> "Tokenizer":
        """Read a tiktoken rank file; ``special_tokens`` maps strings to their ids (not in the file)."""
        ranks = files.read_tiktoken(path)
        vocab = {rank: token for token, rank in ranks.items()}
        if len(vocab) != len(ranks):
            raise ValueError(f"{os.fspath(path)}: two tokens share a rank")
        return cls(vocab, [], special_tokens or {}, pattern, merge_by="ranks")

    @classmethod
    def _with_specials(cls, vocab, merges, special_tokens, pattern, merge_by):
        by_bytes = {b: i for i, b in vocab.items()}
        specials: dict[str, int] = {}
        next_id = max(vocab) + 1
        for text in special_tokens or ():
            idx = by_bytes.get(text.encode("utf-8"))
            if idx is None:
                idx, next_id = next_id, next_id + 1
            specials[text] = idx
        return cls(vocab, merges, specials, pattern, merge_by)
