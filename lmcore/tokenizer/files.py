"""Tokenizer files: lmcore's own JSON format, GPT-2 ``vocab.json`` + ``merges.txt``, tiktoken ranks.

lmcore's format (``Tokenizer.save`` / ``Tokenizer.load``) is one UTF-8 JSON object::

    {
      "format": "lmcore-bpe", "version": 1,
      "pattern": "<the pre-tokenization regex>",
      "merge_by": "pairs",                      # or "ranks" (tiktoken-style, see Tokenizer)
      "special_tokens": {"<|endoftext|>": 256},
      "vocab": {"0": "Ā", ..., "257": "Ġt", ...},   # id -> token bytes, printable (below)
      "merges": ["Ġ t", "h e", ...]              # in training order, the two parts split by a space
    }

Token bytes are written with the byte-to-character table GPT-2 introduced: every byte maps to one
printable, non-space character (printable ASCII and Latin-1 bytes map to themselves, the other
68 bytes to the characters from U+0100 on; a space becomes ``Ġ``, a newline ``Ċ``). So every token
is a readable string, a merge is two such strings joined by a space, and the mapping is exact.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import os


def _byte_table() -> list[str]:
    """The character each byte 0..255 is written as (GPT-2's printable mapping)."""
    kept = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = [], 0
    for b in range(256):
        if b in kept:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


BYTE_TO_CHAR: list[str] = _byte_table()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def bytes_to_text(token: bytes) -> str:
    """Write token bytes as a printable string (see the module docstring)."""
    return "".join(BYTE_TO_CHAR[b] for b in token)


def text_to_bytes(text: str, where: str = "token") -> bytes:
    """Inverse of :func:`bytes_to_text`; a character outside the table raises ``ValueError``."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError as err:
        raise ValueError(f"{where}: {text!r} holds the character {err.args[0]!r}, which is not in the "
                         "byte-to-character table; expected GPT-2 style printable bytes") from None


def _read_text(path) -> str:
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such tokenizer file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 at byte offset {err.start}; expected a text file") from None


def read_gpt2_files(vocab_path, merges_path):
    """Read a GPT-2 ``vocab.json`` (token -> id) and ``merges.txt``; return ``(vocab, merges)``.

    ``vocab`` maps id -> bytes and ``merges`` is a list of byte-string pairs in rank order.
    """
    try:
        raw = json.loads(_read_text(vocab_path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{os.fspath(vocab_path)}: not valid JSON ({err}); expected GPT-2 vocab.json") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{os.fspath(vocab_path)}: expected a JSON object mapping token -> id")
    vocab: dict[int, bytes] = {}
    for token, idx in raw.items():
        if not isinstance(idx, int) or idx < 0:
            raise ValueError(f"{os.fspath(vocab_path)}: token {token!r} has id {idx!r}; expected an integer >= 0")
        if idx in vocab:
            raise ValueError(f"{os.fspath(vocab_path)}: id {idx} is used twice")
        vocab[idx] = text_to_bytes(token, f"{os.fspath(vocab_path)}")
    merges = []
    for lineno, line in enumerate(_read_text(merges_path).splitlines(), 1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{os.fspath(merges_path)}, line {lineno}: {line!r} is not two tokens "
                             "separated by one space")
        where = f"{os.fspath(merges_path)}, line {lineno}"
        merges.append((text_to_bytes(parts[0], where), text_to_bytes(parts[1], where)))
    return vocab, merges


def read_tiktoken(path) -> dict[bytes, int]:
    """Read a tiktoken rank file (``.tiktoken``, optionally gzipped): lines of ``base64 rank``."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise ValueError(f"{os.fspath(path)}, line {lineno}: {line[:60]!r} is not "
                             "'<base64 token> <rank>'") from None
        if token in ranks:
            raise ValueError(f"{os.fspath(path)}, line {lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{os.fspath(path)}: no ranks found; expected lines of '<base64 token> <rank>'")
    return ranks


def to_json(tok) -> dict:
    """The JSON object ``Tokenizer.save`` writes."""
    return {
        "format": "lmcore-bpe",
        "version": 1,
        "pattern": tok.pattern,
        "merge_by": tok.merge_by,
        "special_tokens": dict(tok.special_tokens),
        "vocab": {str(i): bytes_to_text(b) for i, b in sorted(tok.vocab.items()) if i not in tok._special_ids},
        "merges": [bytes_to_text(a) + " " + bytes_to_text(b) for a, b in tok.merges],
    }


def from_json(path) -> dict:
    """Parse and check a file written by ``Tokenizer.save``; return the constructor's arguments."""
    path = os.fspath(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected an lmcore tokenizer file") from None

    def bad(what):
        return ValueError(f"{path}: malformed lmcore tokenizer file: {what}")

    if not isinstance(data, dict) or data.get("format") != "lmcore-bpe":
        raise bad("expected a JSON object with \"format\": \"lmcore-bpe\"")
    if data.get("version") != 1:
        raise bad(f"version {data.get('version')!r} is not supported (expected 1)")
    for key, kind in (("pattern", str), ("merge_by", str), ("special_tokens", dict), ("vocab", dict),
                      ("merges", list)):
        if not isinstance(data.get(key), kind):
            raise bad(f"field {key!r} is missing or not a {kind.__name__}")
    vocab = {}
    for key, text in data["vocab"].items():
        if not key.isdigit() or not isinstance(text, str):
            raise bad(f"vocab entry {key!r}: {text!r} is not '<id>': '<token>'")
        vocab[int(key)] = text_to_bytes(text, f"{path}: vocab id {key}")
    merges = []
    for i, line in enumerate(data["merges"]):
        parts = line.split(" ") if isinstance(line, str) else []
        if len(parts) != 2 or not all(parts):
            raise bad(f"merge {i} ({line!r}) is not two tokens separated by one space")
        merges.append((text_to_bytes(parts[0], f"{path}: merge {i}"), text_to_bytes(parts[1], f"{path}: merge {i}")))
    specials = data["special_tokens"]
    for token, idx in specials.items():
        if not isinstance(idx, int):
            raise bad(f"special token {token!r} has id {idx!r}; expected an integer")
    return dict(vocab=vocab, merges=merges, special_tokens=specials, pattern=data["pattern"],
                merge_by=data["merge_by"])
