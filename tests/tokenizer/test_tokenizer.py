"""Tokenizer: round trips, streaming, special tokens, files and errors."""

import json
import random

import pytest

from lmcore.tokenizer import Tokenizer, train_bpe

SAMPLES = [
    "",
    "hello world",
    "naïve café, Zoë & José — “quotes” ½ ∑ 日本語のテキスト",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
    "   leading, trailing   \n\n\n\t\ttabs \r\n windows\n   ",
    "def f(x):\n    return {'a': [x ** 2, 3.14e-10]}  # code\n",
    "<|endoftext|>between<|endoftext|><|endoftext|> specials <|endoftext|",
    "I'M here, they'll've DON'T 1234567890 3.14",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(story_tokenizer, text):
    ids = story_tokenizer.encode(text)
    assert story_tokenizer.decode(ids) == text
    assert all(isinstance(i, int) and i in story_tokenizer.vocab for i in ids)


def test_special_tokens_are_matched_longest_first():
    tok = train_bpe(["a b c"], 300, special_tokens=["<|endoftext|>", "<|endoftext|><|endoftext|>"])
    one, two = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|endoftext|><|endoftext|>"]
    assert tok.encode("<|endoftext|><|endoftext|>") == [two]
    assert tok.encode("<|endoftext|><|endoftext|><|endoftext|>") == [two, one]
    assert tok.encode("x<|endoftext|>") == [ord("x"), one]


def test_invalid_utf8_decodes_to_replacement_character(story_tokenizer):
    euro = story_tokenizer.encode("€")  # three bytes
    first_byte = [story_tokenizer._byte_ids[0xE2]]
    assert story_tokenizer.decode(first_byte) == "\ufffd"
    assert story_tokenizer.decode(first_byte + euro) == "\ufffd€"


def test_decode_rejects_out_of_range_ids(story_tokenizer):
    with pytest.raises(ValueError, match="token id 99999 is not in the vocabulary"):
        story_tokenizer.decode([1, 99999])
    with pytest.raises(ValueError, match="-1"):
        story_tokenizer.decode([-1])
    with pytest.raises(ValueError, match="token id 'x'"):
        story_tokenizer.decode(iter([1, "x"]))  # a generator is read once
    assert story_tokenizer.decode(iter(story_tokenizer.encode("abc"))) == "abc"


def test_encode_rejects_non_text(story_tokenizer):
    with pytest.raises(TypeError, match="expects str"):
        story_tokenizer.encode(b"bytes")


def test_encode_iterable_equals_encode(story_tokenizer, story_text):
    expected = story_tokenizer.encode(story_text)
    lines = story_text.splitlines(keepends=True)
    assert list(story_tokenizer.encode_iterable(lines)) == expected
    rng = random.Random(0)
    for block in (1, 7, 64):
        pieces, i = [], 0
        while i < len(story_text):  # random cuts, also inside special tokens and whitespace runs
            step = rng.randint(1, 40)
            pieces.append(story_text[i:i + step])
            i += step
        assert list(story_tokenizer.encode_iterable(iter(pieces), block_chars=block)) == expected


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
@pytest.mark.parametrize("text", SAMPLES + ["a  \n  b", "x <|endoftext|><|endoftext|>y  ", "<|endo <|endoftext",
                                            "we'll they've I'M she'd x'y !!'ll 12345 ?!abc \n\n \r\n  "])
def test_encode_iterable_char_by_char(text, pattern):
    tok = train_bpe(["hello world <|endoftext|> a b we'll"], 275, pattern=pattern,
                    special_tokens=["<|endoftext|>", "<|endoftext|><|endoftext|>"])
    assert list(tok.encode_iterable(iter(text), block_chars=1)) == tok.encode(text)


def test_cache_stays_bounded(story_tokenizer, story_text, monkeypatch):
    monkeypatch.setattr(Tokenizer, "cache_size", 50)
    tok = Tokenizer(story_tokenizer.vocab, story_tokenizer.merges, story_tokenizer.special_tokens)
    ids = tok.encode(story_text)
    assert len(tok._cache) <= 50
    assert ids == story_tokenizer.encode(story_text)


def test_save_load_round_trip(tmp_path, story_tokenizer):
    path = tmp_path / "tok.json"
    story_tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab == story_tokenizer.vocab
    assert loaded.merges == story_tokenizer.merges
    assert loaded.special_tokens == story_tokenizer.special_tokens
    assert loaded.pattern == story_tokenizer.pattern
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "lmcore-bpe" and data["vocab"]["32"] == "Ġ"  # readable: space is Ġ
    text = SAMPLES[2] + SAMPLES[6]
    assert loaded.encode(text) == story_tokenizer.encode(text)


def test_interrupted_save_leaves_the_old_file(tmp_path, story_tokenizer, monkeypatch):
    path = tmp_path / "tok.json"
    story_tokenizer.save(path)
    before = path.read_bytes()

    def broken_dump(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        story_tokenizer.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"format": "other"}', "lmcore-bpe"),
    ('{"format": "lmcore-bpe", "version": 2}', "version 2"),
    ('{"format": "lmcore-bpe", "version": 1, "pattern": "x", "merge_by": "pairs", "special_tokens": {}, '
     '"vocab": {}, "merges": []}', "lacks single bytes"),
])
def test_malformed_file_names_file_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        Tokenizer.load(path)
    assert str(path) in str(err.value)


def test_malformed_merge_is_reported(tmp_path, story_tokenizer):
    path = tmp_path / "tok.json"
    story_tokenizer.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["merges"][3] = "only-one-part"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="merge 3"):
        Tokenizer.load(path)


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match="minimum is 258"):
        train_bpe(["abc"], 257, special_tokens=["<a>", "<b>"])
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe(["<|endoftext|>"], 300, special_tokens=["<|endoftext|>"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe(empty, 300)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe(tmp_path / "missing.txt", 300)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ok text, then caf".encode() + "é".encode("latin-1") + b" more")
    with pytest.raises(ValueError, match="byte offset 17"):
        train_bpe(bad, 300)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        train_bpe(["abc"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="given twice"):
        train_bpe(["abc"], 300, special_tokens=["<a>", "<a>"])


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_encode_iterable_on_random_awkward_text(pattern):
    alphabet = list("ab Z9.'!\n\r\t ") + ["\u00a0", "é", "½", "🙂", "'s", "'ll", "'LL", "  ", "\n\n",
                                             "<|e", "<|eot|>", "|>"]
    tok = train_bpe(["ab ab Z9 'll 'LL aa bb é 🙂 <|eot|> x x"], 290, special_tokens=["<|eot|>", "<|eot|><|eot|>"],
                    pattern=pattern)
    rng = random.Random(2)
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        pieces, i = [], 0
        while i < len(text):
            step = rng.randint(1, 5)
            pieces.append(text[i:i + step])
            i += step
        assert list(tok.encode_iterable(iter(pieces), block_chars=rng.randint(1, 8))) == tok.encode(text), text


def test_lone_surrogate_is_refused_with_its_position(story_tokenizer):
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at character 3,"):
        story_tokenizer.encode("abc\ud800def")
    stream = ["hello world "] * 10000 + ["x\udc80"]  # far past the first block of the stream
    with pytest.raises(ValueError, match=rf"lone surrogate U\+DC80 at character {12 * 10000 + 1},"):
        list(story_tokenizer.encode_iterable(stream, block_chars=1000))


def test_decode_takes_a_tensor_and_names_bad_ids_by_value(story_tokenizer):
    import numpy as np
    import torch

    ids = story_tokenizer.encode("hello world")
    assert story_tokenizer.decode(torch.tensor(ids)) == "hello world"
    assert story_tokenizer.decode(np.array(ids)) == "hello world"
    assert story_tokenizer.decode([torch.tensor(i) for i in ids]) == "hello world"
    with pytest.raises(ValueError, match=r"token id 99999 is not in the vocabulary"):
        story_tokenizer.decode(torch.tensor([ids[0], 99999]))
    with pytest.raises(ValueError, match=r"1-D sequence of ids, got shape \(1, 2\)"):
        story_tokenizer.decode(torch.tensor([ids[:2]]))
