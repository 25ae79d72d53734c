"""``python -m lmcore.train --config FILE [--set key=value ...] [--resume | --overwrite | --next]``.

The end-to-end run. An ``out_dir`` that holds an earlier training run is never written over
silently: ``--resume`` continues it (``train.max_iters`` may be raised), ``--overwrite`` replaces it,
``--next`` trains into a numbered sibling folder; without one of them the run is refused.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from lmcore.distributed.wrap import DDP_KINDS
    from lmcore.runfolders import FolderInUse, add_folder_flags
    from lmcore.train.checkpoint import CheckpointError
    from lmcore.train.config_checks import ConfigError
    from lmcore.train.pipeline import check_config, load_config, run

    parser = argparse.ArgumentParser(prog="python -m lmcore.train",
                                     description="corpus -> tokenizer -> tokens -> training -> samples")
    parser.add_argument("--config", help="YAML file, or the name of a bundled config (e.g. stories-tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an entry, e.g. --set train.max_iters=100 --set model.d_model=128")
    add_folder_flags(parser, "continue from out_dir/ckpt.pt (train.max_iters may be raised to train longer)")
    parser.add_argument("--ddp", choices=DDP_KINDS, default=None,
                        help="data parallelism over the processes torchrun started (train.ddp)")
    parser.add_argument("--sharded-optimizer", action="store_true",
                        help="ZeRO-1: shard AdamW's state over the ranks (train.sharded_optimizer)")
    parser.add_argument("--consolidate", action="store_true",
                        help="--ddp fsdp: also gather the sharded checkpoint into ckpt.pt "
                             "(train.consolidate_checkpoint)")
    parser.add_argument("--bucket-size-mb", type=float, default=None, help="bucket size for --ddp bucketed/torch")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.ddp is not None:
        overrides.append(f"train.ddp={args.ddp}")
    if args.sharded_optimizer:
        overrides.append("train.sharded_optimizer=true")
    if args.consolidate:
        overrides.append("train.consolidate_checkpoint=true")
    if args.bucket_size_mb is not None:
        overrides.append(f"train.bucket_size_mb={args.bucket_size_mb}")
    try:
        config = load_config(args.config, overrides)
        check_config(config)
        summary = run(config, progress=not args.no_progress, policy=args.folder_policy)
    except (ConfigError, CheckpointError, FolderInUse, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
