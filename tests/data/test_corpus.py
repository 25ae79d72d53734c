"""The built-in corpus and load_corpus (local files and the datasets code path, offline)."""

import pytest

from lmcore.data import END_OF_TEXT, builtin_corpus, iter_stories, load_corpus, write_corpus


def test_builtin_corpus_is_deterministic_and_sized():
    a = builtin_corpus(20_000, seed=1)
    assert a == builtin_corpus(20_000, seed=1)
    assert a != builtin_corpus(20_000, seed=2)
    size = len(a.encode("utf-8"))
    assert 15_000 < size <= 20_000
    assert a.endswith(END_OF_TEXT) and a.count(END_OF_TEXT) > 10
    assert any(ord(c) > 127 for c in a)  # some non-ASCII text
    assert '"' in a and any(c.isdigit() for c in a)  # dialogue and numbers
    assert builtin_corpus(100_000, seed=1).startswith(a)  # any size: a prefix of a longer one


def test_iter_stories_and_bad_arguments():
    stories = iter_stories(0)
    first = next(stories)
    assert first.endswith(END_OF_TEXT) and END_OF_TEXT not in first[:-len(END_OF_TEXT)]
    with pytest.raises(ValueError, match="num_bytes=0"):
        builtin_corpus(0)
    with pytest.raises(ValueError, match="seed=-1"):
        next(iter_stories(-1))


def test_load_corpus_builtin_and_files(tmp_path):
    assert load_corpus("builtin", size=5000, seed=4) == builtin_corpus(5000, seed=4)
    path = tmp_path / "t.txt"
    path.write_text("héllo wörld", encoding="utf-8")
    assert load_corpus(path) == "héllo wörld"
    assert load_corpus(str(path), size=2) == "h"  # the cut inside 'é' is dropped, not an error
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff")
    with pytest.raises(ValueError, match="byte offset 3"):
        load_corpus(bad)
    with pytest.raises(ValueError, match="not a file, and not one of"):
        load_corpus("no-such-corpus")
    with pytest.raises(ValueError, match="size=-5"):
        load_corpus("builtin", size=-5)


def test_stdlib_docstrings_are_real_text():
    text = load_corpus("stdlib-docs", size=20_000)
    assert 10_000 < len(text.encode()) <= 20_000 and END_OF_TEXT in text


def test_write_corpus(tmp_path):
    path = write_corpus(tmp_path / "c.txt", "builtin", size=3000)
    assert open(path, encoding="utf-8").read() == builtin_corpus(3000)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf-cache"


def test_tinystories_loader_on_local_parquet(tmp_path, offline):
    import pandas as pd

    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["Once there was a cat.", "Zoë liked 🙂 cake."]}).to_parquet(path)
    text = load_corpus("tinystories", data_files=str(path), cache_dir=str(offline))
    assert text == f"Once there was a cat.{END_OF_TEXT}Zoë liked 🙂 cake.{END_OF_TEXT}"


def test_wikitext_loader_on_local_json_and_text(tmp_path, offline):
    import json

    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [" = Title = \n", " Some text .\n", ""]))
    assert load_corpus("wikitext-2", data_files=str(path), cache_dir=str(offline)) == " = Title = \n Some text .\n"
    text_file = tmp_path / "wiki.txt"
    text_file.write_text("line one\nline two\n")
    # the 'text' builder yields one record per line, without its newline
    assert load_corpus("wikitext-2", data_files=str(text_file), cache_dir=str(offline), size=8) == "line one"
    with pytest.raises(ValueError, match="expected one of"):
        load_corpus("wikitext-2", data_files=str(tmp_path / "wiki.xml"))


def test_hub_loader_streams_with_a_size_and_checks_the_column(tmp_path, offline):
    import pandas as pd

    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": [f"story {i}" for i in range(100)]}).to_parquet(path)
    text = load_corpus("tinystories", data_files=str(path), cache_dir=str(offline), size=30)
    assert text == f"story 0{END_OF_TEXT}story 1{END_OF_TEXT}"[:30]
    other = tmp_path / "other.parquet"
    pd.DataFrame({"body": ["x"]}).to_parquet(other)
    with pytest.raises(ValueError, match="no column 'text'"):
        load_corpus("tinystories", data_files=str(other), cache_dir=str(offline), size=10)


def test_stdlib_source_is_real_python_read_offline():
    from lmcore.data import load_corpus

    text = load_corpus("stdlib-source", size=200_000)
    assert 190_000 <= len(text.encode("utf-8")) <= 200_000
    assert "def " in text and "import " in text and "<|endoftext|>" in text
    assert text == load_corpus("stdlib-source", size=200_000)  # deterministic


def test_python_source_goes_on_into_the_installed_packages():
    from lmcore.data import load_corpus, stdlib_sources

    stdlib = stdlib_sources()
    size = len(stdlib.encode("utf-8")) + 300_000
    text = load_corpus("python-source", size=size)
    assert text.startswith(stdlib)  # the standard library first, in the same order
    extra = text[len(stdlib):]
    assert len(extra.encode("utf-8")) > 250_000 and "import " in extra and "<|endoftext|>" in extra
    assert text == load_corpus("python-source", size=size)  # deterministic
