"""``python -m lmcore.train --config FILE [--set key=value ...] [--resume]``: the end-to-end run."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from lmcore.train.pipeline import load_config, run

    parser = argparse.ArgumentParser(prog="python -m lmcore.train",
                                     description="corpus -> tokenizer -> tokens -> training -> samples")
    parser.add_argument("--config", help="YAML file, or the name of a bundled config (e.g. stories-tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an entry, e.g. --set train.max_iters=100 --set model.d_model=128")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = run(config, progress=not args.no_progress, resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("val_loss", "unigram_val_loss", "iterations", "parameters",
                                               "samples")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
