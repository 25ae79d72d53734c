"""Command line: ``python -m lmcore.bench NAME [--quick] [--json OUT] [options of NAME]``."""

from __future__ import annotations

import importlib
import json
import sys

from lmcore.bench import BENCHMARKS
from lmcore.utils import atomic_write


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m lmcore.bench NAME [--quick] [--json OUT] [options]\n\nbenchmarks:")
        for name, what in BENCHMARKS.items():
            print(f"  {name:10s} {what}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; expected one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    out = None
    if "--json" in rest:
        i = rest.index("--json")
        if i + 1 >= len(rest):
            print("--json needs a file name", file=sys.stderr)
            return 2
        out = rest[i + 1]
        del rest[i : i + 2]
    module = importlib.import_module(f"lmcore.bench.{name}")
    result = module.main(rest)
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    print(text)
    if out:
        with atomic_write(out) as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
