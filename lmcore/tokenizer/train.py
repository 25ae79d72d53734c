"""Training byte-level BPE: count pre-tokens (in parallel), then merge with incremental pair counts.

The merge loop never rescans the corpus. It keeps

- ``pair_counts``: how often each adjacent pair of token ids occurs, weighted by word counts;
- ``where``: for each pair, the words that (may) contain it;
- a heap of ``(-count, reversed bytes of the pair, pair)``, so the most frequent pair, ties broken
  by the lexicographically greater pair of byte strings, is on top. Entries are never updated in
  place: a changed count pushes a new entry and stale ones are skipped when popped.

A merge rewrites only the words in ``where[pair]`` and adjusts the counts of the pairs they lose
and gain.
"""

from __future__ import annotations

import heapq
import os
from collections import defaultdict
from typing import Iterable

from lmcore.tokenizer import pretokenize
from lmcore.tokenizer.patterns import GPT2_PATTERN, check_special_tokens, resolve_pattern
from lmcore.tokenizer.tokenizer import Tokenizer, merge


def _order_key(token: bytes) -> tuple[int, ...]:
    """A key that sorts byte strings in *reverse* lexicographic order (greater first in a min-heap).

    Each byte b becomes 255 - b and a 256 ends the key, so a string sorts before its own prefixes.
    """
    return tuple(255 - b for b in token) + (256,)


def merge_words(word_counts: dict[tuple[int, ...], int], vocab: dict[int, bytes], num_merges: int,
                progress: bool = False) -> list[tuple[int, int]]:
    """Run ``num_merges`` BPE merges over ``word_counts`` (id tuples -> count), adding to ``vocab``.

    Returns the merged id pairs in order; stops early when no pair is left.
    """
    words = [list(w) for w in word_counts]
    counts = list(word_counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            where[pair].add(index)
    key = {i: _order_key(b) for i, b in vocab.items()}
    heap = [(-c, key[a], key[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_merges, desc="BPE merges", unit="merge")
    merged_pairs: list[tuple[int, int]] = []
    next_id = max(vocab) + 1
    while len(merged_pairs) < num_merges and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg:  # stale entry
            continue
        new = next_id
        next_id += 1
        vocab[new] = vocab[a] + vocab[b]
        key[new] = _order_key(vocab[new])
        merged_pairs.append((a, b))
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for index in where.pop((a, b)):
            word = words[index]
            out = merge(word, a, b, new)
            if len(out) == len(word):  # an old index entry: the pair left this word earlier
                continue
            count = counts[index]
            for pair in zip(word, word[1:]):
                delta[pair] -= count
            for pair in zip(out, out[1:]):
                delta[pair] += count
                if new in pair:
                    where[pair].add(index)
            words[index] = out
        for pair, change in delta.items():
            if change:
                total = pair_counts[pair] + change
                if total:
                    pair_counts[pair] = total
                    heapq.heappush(heap, (-total, key[pair[0]], key[pair[1]], pair[0], pair[1]))
                else:
                    del pair_counts[pair]
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return merged_pairs


def train_bpe(input: str | os.PathLike | Iterable[str], vocab_size: int, special_tokens=(),
              pattern: str = GPT2_PATTERN, num_processes: int | None = None,
              progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    ``input`` is a path to a UTF-8 text file or an iterable of strings. The vocabulary is the 256
    bytes (ids 0..255), then ``special_tokens`` (ids from 256, in the given order), then one token
    per merge, up to ``vocab_size`` tokens. Text is split on the special tokens first, then
    pre-tokenized with ``pattern`` (``"gpt2"``, ``"cl100k"`` or a regex); merges never cross
    either boundary. Ties between equally frequent pairs go to the lexicographically greater
    pair of byte strings. ``num_processes`` workers pre-tokenize (default: one per CPU, or one
    for inputs under 1 MB). ``progress`` shows a bar over the merges.
    """
    specials = check_special_tokens(special_tokens)
    pattern = resolve_pattern(pattern)
    minimum = 256 + len(specials)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size!r} is too small: the minimum is {minimum} "
                         f"(256 bytes + {len(specials)} special tokens)")
    if isinstance(input, (str, os.PathLike)):
        counts = pretokenize.count_file(input, pattern, specials, num_processes)
        source = f"file {os.fspath(input)!r}"
    else:
        counts = pretokenize.count_iterable(input, pattern, specials, num_processes)
        source = "the given texts"
    if not counts:
        raise ValueError(f"empty corpus: {source} holds no text to train on (besides special tokens)")
    vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
    for offset, token in enumerate(specials):
        vocab[256 + offset] = token.encode("utf-8")
    word_counts: dict[tuple[int, ...], int] = {}
    for piece, count in counts.items():
        word = tuple(piece.encode("utf-8"))
        word_counts[word] = word_counts.get(word, 0) + count
    pairs = merge_words(word_counts, vocab, vocab_size - minimum, progress)
    merges = [(vocab[a], vocab[b]) for a, b in pairs]
    return Tokenizer(vocab, merges, {t: 256 + i for i, t in enumerate(specials)}, pattern)
