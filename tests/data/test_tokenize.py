"""tokenize_to_npy: parallel, memory-mapped, equal to Tokenizer.encode."""

import numpy as np
import pytest

from lmcore.data import builtin_corpus, tokenize_to_npy
from lmcore.data.__main__ import main
from lmcore.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    text = builtin_corpus(60_000, seed=5)
    path = folder / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path, text, train_bpe([text], 500, special_tokens=["<|endoftext|>"])


@pytest.mark.parametrize("processes", [1, 2])
def test_tokenize_to_npy_equals_encode(tmp_path, corpus_and_tokenizer, processes):
    path, text, tok = corpus_and_tokenizer
    ids = tokenize_to_npy(path, tok, tmp_path / "ids.npy", num_processes=processes, chunk_bytes=7000,
                          progress=False)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert ids.tolist() == tok.encode(text)
    assert np.load(tmp_path / "ids.npy").tolist() == ids.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["ids.npy"]  # no temporary files left


def test_large_vocab_uses_uint32(tmp_path, corpus_and_tokenizer):
    path, text, tok = corpus_and_tokenizer
    big = Tokenizer(tok.vocab, tok.merges, {"<|endoftext|>": 256, "<|big|>": 70_000})
    ids = tokenize_to_npy(path, big, tmp_path / "ids.npy", num_processes=1, progress=False)
    assert ids.dtype == np.uint32 and ids.tolist() == tok.encode(text)


def test_bad_arguments(tmp_path, corpus_and_tokenizer):
    path, _, tok = corpus_and_tokenizer
    with pytest.raises(ValueError, match="ending in .npy"):
        tokenize_to_npy(path, tok, tmp_path / "ids.bin")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tokenize_to_npy(tmp_path / "missing.txt", tok, tmp_path / "ids.npy")


def test_command_line(tmp_path, corpus_and_tokenizer):
    path, text, tok = corpus_and_tokenizer
    tok.save(tmp_path / "tok.json")
    assert main(["generate", "--size", "10KB", "--seed", "5", "--out", str(tmp_path / "c.txt")]) == 0
    assert (tmp_path / "c.txt").read_text(encoding="utf-8") == builtin_corpus(10 * 1024, seed=5)
    assert main(["tokenize", "--input", str(tmp_path / "c.txt"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(tmp_path / "c.npy"), "--num-processes", "1"]) == 0
    assert np.load(tmp_path / "c.npy").tolist() == tok.encode(builtin_corpus(10 * 1024, seed=5))
