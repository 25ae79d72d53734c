"""Command line: ``python -m lmcore.data generate|tokenize``.

    python -m lmcore.data generate --corpus builtin --size 5MB --out stories.txt
    python -m lmcore.data tokenize --input stories.txt --tokenizer tok.json --out stories.npy
"""

from __future__ import annotations

import argparse
import sys

_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "K": 1 << 10, "MB": 1 << 20, "M": 1 << 20, "GB": 1 << 30, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"5MB"`` -> 5242880; plain integers are bytes."""
    value = str(text).strip().upper()
    number = value.rstrip("KMGB")
    unit = value[len(number):]
    try:
        size = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"size {text!r}: expected bytes like 130KB, 5MB or 1000000") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a positive size")
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcore.data", description="corpora and token files")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a corpus (default: the built-in stories) to a file")
    gen.add_argument("--corpus", default="builtin",
                     help="builtin, stdlib-docs, stdlib-source, python-source, tinystories, wikitext-2 or a path")
    gen.add_argument("--size", type=parse_size, default=None, help="bytes, e.g. 5MB")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True)
    tok = sub.add_parser("tokenize", help="text file -> .npy of token ids (uint16/uint32, memory-mapped)")
    tok.add_argument("--input", required=True, help="UTF-8 text file")
    tok.add_argument("--tokenizer", required=True, help="tokenizer file (python -m lmcore.tokenizer train)")
    tok.add_argument("--out", required=True, help="output .npy")
    tok.add_argument("--num-processes", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            from lmcore.data import write_corpus

            write_corpus(args.out, args.corpus, size=args.size, seed=args.seed)
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            from lmcore.data import tokenize_to_npy
            from lmcore.tokenizer import Tokenizer

            ids = tokenize_to_npy(args.input, Tokenizer.load(args.tokenizer), args.out, args.num_processes)
            print(f"wrote {ids.shape[0]} tokens ({ids.dtype}) to {args.out}", file=sys.stderr)
    except (ValueError, OSError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
