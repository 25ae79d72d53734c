"""Training: worked examples, tie-breaking, agreement with a naive trainer, parallel == serial."""

import random
from collections import Counter

import pytest
import regex

from lmcore.tokenizer import GPT2_PATTERN, train_bpe
from lmcore.tokenizer.train import _order_key

SENNRICH = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"


def test_worked_example_merges_by_hand():
    # Whitespace pre-tokenization; counts: low 5, lower 2, widest 3, newest 6.
    # 'st' (9) and 'es'/'t'... : s-t 9, e-s 9 -> tie goes to the greater pair ('s','t').
    tok = train_bpe([SENNRICH], 256 + 6, pattern=r"\S+|\s+")
    assert tok.merges == [(b"s", b"t"), (b"e", b"st"), (b"o", b"w"), (b"l", b"ow"), (b"w", b"est"), (b"n", b"e")]
    assert tok.vocab[256] == b"st" and tok.vocab[261] == b"ne"


def test_ties_go_to_the_greater_byte_pair():
    # 'ab' and ' cd' each occur once: pairs (a,b), (' ',c), (c,d) tie at count 1.
    tok = train_bpe(["ab cd"], 256 + 3)
    assert tok.merges == [(b"c", b"d"), (b"a", b"b"), (b" ", b"cd")]


def test_order_key_sorts_byte_strings_in_reverse():
    rng = random.Random(0)
    items = [bytes(rng.choice(b"ab\xff\x00") for _ in range(rng.randint(1, 4))) for _ in range(300)]
    assert sorted(items, key=_order_key) == sorted(items, reverse=True)
    assert _order_key(b"ab") < _order_key(b"a")  # a string comes before its prefix


def test_special_tokens_take_ids_after_bytes_and_never_merge():
    text = "<|endoftext|>hello<|endoftext|>hello<|endoftext|>"
    tok = train_bpe([text], 256 + 2 + 10, special_tokens=["<|endoftext|>", "<pad>"])
    assert tok.special_tokens == {"<|endoftext|>": 256, "<pad>": 257}
    assert all(b"<|" not in a + b and b"|>" not in a + b for a, b in tok.merges)
    # all pairs of 'hello' tie at 2: ('l','o') is the greatest, then ('l','lo'), ('h','e'); then none left
    assert tok.merges == [(b"l", b"o"), (b"l", b"lo"), (b"h", b"e"), (b"he", b"llo")]


def _naive_train(text, vocab_size, specials=()):
    """Recount every pair after every merge: slow, obviously correct."""
    parts = regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text) if specials else [text]
    words = Counter()
    for i, part in enumerate(parts):
        if i % 2 == 0:
            words.update(tuple(bytes([b]) for b in w.encode()) for w in regex.findall(GPT2_PATTERN, part))
    merges = []
    while 256 + len(specials) + len(merges) < vocab_size:
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return merges


def test_incremental_trainer_matches_naive_trainer(story_text):
    text = story_text[:6000]
    expected = _naive_train(text, 256 + 1 + 120, ["<|endoftext|>"])
    tok = train_bpe([text], 256 + 1 + 120, special_tokens=["<|endoftext|>"])
    assert tok.merges == expected


def test_repeated_letters_merge_left_to_right():
    expected = _naive_train("aaaaa aaa aa baaab", 256 + 6)
    assert train_bpe(["aaaaa aaa aa baaab"], 256 + 6).merges == expected


def test_parallel_training_gives_the_same_merges(tmp_path, story_text):
    path = tmp_path / "corpus.txt"
    path.write_text(story_text, encoding="utf-8")
    serial = train_bpe(path, 600, ["<|endoftext|>"], num_processes=1)
    parallel = train_bpe(path, 600, ["<|endoftext|>"], num_processes=2)
    from_texts = train_bpe(iter(story_text.splitlines(keepends=True)), 600, ["<|endoftext|>"], num_processes=2)
    assert parallel.merges == serial.merges
    assert parallel.vocab == serial.vocab
    # split at newlines and re-joined: the same stream of text, the same merges
    assert from_texts.merges == serial.merges


def test_chunks_are_cut_at_special_tokens(tmp_path, story_text):
    from lmcore.tokenizer.pretokenize import chunk_boundaries, count_file, count_text

    path = tmp_path / "corpus.txt"
    path.write_bytes(story_text.encode())
    cuts = chunk_boundaries(str(path), 7, ["<|endoftext|>"])
    data = path.read_bytes()
    assert cuts[0] == 0 and cuts[-1] == len(data) and len(cuts) > 3
    assert all(data[c:].startswith(b"<|endoftext|>") for c in cuts[1:-1])
    whole = count_text(story_text, GPT2_PATTERN, ("<|endoftext|>",))
    assert count_file(path, GPT2_PATTERN, ["<|endoftext|>"], num_processes=2, chunk_bytes=2000) == whole


def test_cl100k_pattern_is_selectable():
    tok = train_bpe(["123456 123456 hello"], 256 + 5, pattern="cl100k")
    assert all(len(a + b) <= 3 for a, b in tok.merges if (a + b).strip().isdigit())
    assert tok.pattern.startswith("'(?i:")


def test_merging_stops_when_no_pair_is_left():
    tok = train_bpe(["ab ab ab"], 1000)
    assert tok.merges == [(b"a", b"b"), (b" ", b"ab")]
    assert tok.vocab_size == 258


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_without_special_tokens_chunks_are_cut_before_a_space(tmp_path, story_text, pattern):
    from lmcore.tokenizer.patterns import resolve_pattern
    from lmcore.tokenizer.pretokenize import chunk_boundaries, count_file, count_text

    text = story_text.replace("<|endoftext|>", "\r\n  \n")  # no special tokens, awkward whitespace
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode())
    regex_ = resolve_pattern(pattern)
    cuts = chunk_boundaries(str(path), 9, (), regex_)
    data = text.encode()
    assert len(cuts) > 3 and all(data[c:c + 1] == b" " and 0x21 <= data[c - 1] <= 0x7E for c in cuts[1:-1])
    assert count_file(path, regex_, (), num_processes=2, chunk_bytes=3000) == count_text(text, regex_)


def test_safe_cut_points_do_not_change_pre_tokens():
    # random strings of awkward characters: cutting at every safe point keeps the pre-tokens
    from lmcore.tokenizer.patterns import CL100K_PATTERN
    from lmcore.tokenizer.pretokenize import _SAFE_CUT

    alphabet = list("ab Z9.'!\n\r\t ") + ["\u00a0", "é", "½", "🙂", "'s", "'ll", " x", "  ", "\n\n"]
    rng = random.Random(1)
    for pattern in (GPT2_PATTERN, CL100K_PATTERN):
        compiled = regex.compile(pattern)
        for _ in range(1500):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
            data = text.encode()
            for match in _SAFE_CUT.finditer(data):
                cut = len(data[:match.start() + 1].decode())
                assert compiled.findall(text[:cut]) + compiled.findall(text[cut:]) == compiled.findall(text)
