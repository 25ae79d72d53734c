"""``python -m lmcore.train --config FILE [--set key=value ...] [--resume]``: the end-to-end run."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from lmcore.distributed.wrap import DDP_KINDS
    from lmcore.train.pipeline import load_config, model_and_train_configs, run

    parser = argparse.ArgumentParser(prog="python -m lmcore.train",
                                     description="corpus -> tokenizer -> tokens -> training -> samples")
    parser.add_argument("--config", help="YAML file, or the name of a bundled config (e.g. stories-tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an entry, e.g. --set train.max_iters=100 --set model.d_model=128")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    parser.add_argument("--ddp", choices=DDP_KINDS, default=None,
                        help="data parallelism over the processes torchrun started (train.ddp)")
    parser.add_argument("--sharded-optimizer", action="store_true",
                        help="ZeRO-1: shard AdamW's state over the ranks (train.sharded_optimizer)")
    parser.add_argument("--bucket-size-mb", type=float, default=None, help="bucket size for --ddp bucketed/torch")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.ddp is not None:
        overrides.append(f"train.ddp={args.ddp}")
    if args.sharded_optimizer:
        overrides.append("train.sharded_optimizer=true")
    if args.bucket_size_mb is not None:
        overrides.append(f"train.bucket_size_mb={args.bucket_size_mb}")
    try:
        config = load_config(args.config, overrides)
        model_and_train_configs(config)  # every setting checked (the optimizer's too) before any work
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run(config, progress=not args.no_progress, resume=args.resume)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if "rank" in summary:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    print(json.dumps({k: summary[k] for k in ("val_loss", "unigram_val_loss", "iterations", "parameters",
                                               "samples")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
