"""``python -m lmcore.tokenizer train|encode|decode``, run in-process."""

from lmcore.tokenizer import Tokenizer
from lmcore.tokenizer.__main__ import main


def test_train_encode_decode(tmp_path, story_text, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(story_text, encoding="utf-8")
    out = tmp_path / "tok.json"
    assert main(["train", "--input", str(corpus), "--vocab-size", "400", "--special-token", "<|endoftext|>",
                 "--out", str(out), "--no-progress"]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 400 and tok.special_tokens == {"<|endoftext|>": 256}
    text = tmp_path / "text.txt"
    text.write_text("Zoë found 3 keys.<|endoftext|>", encoding="utf-8")
    ids_path = tmp_path / "ids.txt"
    assert main(["encode", "--tokenizer", str(out), "--input", str(text), "--out", str(ids_path)]) == 0
    ids = [int(x) for x in ids_path.read_text().split()]
    assert ids == tok.encode("Zoë found 3 keys.<|endoftext|>") and ids[-1] == 256
    capsys.readouterr()
    assert main(["decode", "--tokenizer", str(out), "--input", str(ids_path)]) == 0
    assert capsys.readouterr().out == "Zoë found 3 keys.<|endoftext|>"


def test_errors_are_reported_not_raised(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc", encoding="utf-8")
    assert main(["train", "--input", str(corpus), "--vocab-size", "100", "--out", str(tmp_path / "t.json")]) == 1
    assert "minimum is 256" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_bad_utf8_names_the_file_and_the_byte_offset(tmp_path, story_text, capsys):
    tok_path = tmp_path / "tok.json"
    assert main(["train", "--input", _corpus(tmp_path, story_text), "--vocab-size", "300", "--out",
                 str(tok_path), "--no-progress"]) == 0
    bad = tmp_path / "bad.txt"
    offset = (1 << 20) - 1 + 70000  # past the first block the reader decodes, inside a later one
    bad.write_bytes(b"a" * offset + b"\xe2\x82x and more")
    capsys.readouterr()
    args = ["encode", "--tokenizer", str(tok_path), "--input", str(bad), "--out", str(tmp_path / "i")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{bad}: not valid UTF-8 at byte offset {offset} " in err, err
    assert not (tmp_path / "i").exists()


def _corpus(tmp_path, text):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)
