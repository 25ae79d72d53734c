"""Command line: ``python -m lmcore.tokenizer train|encode|decode``.

    python -m lmcore.tokenizer train --input corpus.txt --vocab-size 10000 \\
        --special-token '<|endoftext|>' --out tok.json
    python -m lmcore.tokenizer encode --tokenizer tok.json --input text.txt      # ids, one line
    python -m lmcore.tokenizer decode --tokenizer tok.json --input ids.txt       # text
"""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmcore.tokenizer", description="byte-level BPE")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a tokenizer on a UTF-8 text file")
    train.add_argument("--input", required=True, help="UTF-8 text file")
    train.add_argument("--vocab-size", type=int, required=True, help="bytes + special tokens + merges")
    train.add_argument("--special-token", action="append", default=[], help="repeat for several")
    train.add_argument("--pattern", default="gpt2", help="'gpt2', 'cl100k' or a regular expression")
    train.add_argument("--num-processes", type=int, default=None, help="pre-tokenization workers")
    train.add_argument("--out", required=True, help="tokenizer file to write (JSON)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    for name, what in (("encode", "text file (default: stdin) -> ids"), ("decode", "ids file (default: stdin) -> text")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--tokenizer", required=True, help="file written by train (or Tokenizer.save)")
        p.add_argument("--input", default="-", help="input file, '-' for stdin")
        p.add_argument("--out", default="-", help="output file, '-' for stdout")
    return parser


def utf8_error(path: str, err: UnicodeDecodeError) -> ValueError:
    """The error of a file that is not UTF-8, naming the file and the offset of the first bad byte in it."""
    if path == "-":
        return ValueError(f"standard input is not valid UTF-8 ({err.reason}); expected UTF-8 text")
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # bytes of a character the last block began
            try:
                decoder.decode(block)
            except UnicodeDecodeError as bad:  # bad.start counts from the first pending byte
                start = offset - pending + bad.start
                return ValueError(f"{path}: not valid UTF-8 at byte offset {start} ({bad.reason}: "
                                  f"{bad.object[bad.start:bad.start + 4]!r}); expected a UTF-8 text file")
            offset += len(block)
    return ValueError(f"{path}: not valid UTF-8 at its end ({err.reason}); expected a UTF-8 text file")


def _read(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise utf8_error(path, err) from None


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    from lmcore.utils import atomic_write

    with atomic_write(path) as f:
        f.write(text)


def _encode_stream(tok, source: str, target: str) -> None:
    """Encode a file of any size with ``encode_iterable``, writing ids as they come."""
    from contextlib import nullcontext
    from itertools import islice

    from lmcore.utils import atomic_write

    infile = sys.stdin if source == "-" else open(source, encoding="utf-8")
    try:
        with infile, (nullcontext(sys.stdout) if target == "-" else atomic_write(target)) as out:
            ids = tok.encode_iterable(infile)
            first = True
            while batch := list(islice(ids, 1 << 16)):
                out.write(("" if first else " ") + " ".join(map(str, batch)))
                first = False
            out.write("\n")
    except UnicodeDecodeError as err:
        raise utf8_error(source, err) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from lmcore.tokenizer import Tokenizer, train_bpe

    try:
        if args.command == "train":
            start = time.perf_counter()
            tok = train_bpe(args.input, args.vocab_size, args.special_token, args.pattern,
                            args.num_processes, progress=not args.no_progress)
            tok.save(args.out)
            print(f"trained {len(tok.merges)} merges in {time.perf_counter() - start:.2f} s -> {args.out}",
                  file=sys.stderr)
        elif args.command == "encode":
            tok = Tokenizer.load(args.tokenizer)
            _encode_stream(tok, args.input, args.out)
        else:
            tok = Tokenizer.load(args.tokenizer)
            text = _read(args.input).split()
            try:
                ids = [int(t) for t in text]
            except ValueError as err:
                raise ValueError(f"{args.input}: expected whitespace-separated integer ids ({err})") from None
            _write(args.out, tok.decode(ids))
    except (ValueError, OSError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
