"""Benchmarks: ``python -m lmcore.bench NAME [--quick] [--json OUT]``.

Each benchmark is a module ``lmcore.bench.NAME`` with a ``main(argv) -> dict`` function that
measures lmcore against the reference implementation in the same run and returns
``{"metrics": {...}, "provenance": {...}, ...}``. The dispatcher prints that as JSON and writes
it to ``--json OUT`` when given. Speed is reported as ratios against the reference, because
machines are shared and noisy; tests never assert on wall time.
"""

from __future__ import annotations

from lmcore.results import gpu_slug  # noqa: F401 - the one device slug of every benchmark's file names

BENCHMARKS = {
    "bpe": "byte-level BPE training and encoding against HF tokenizers and tiktoken",
    "train": "training throughput and MFU against a torch.nn baseline",
    "attention": "FlashAttention-2 in Triton against torch SDPA backends",
    "sparse": "block-sparse attention against FlexAttention and dense kernels",
    "nsa": "Native Sparse Attention against dense FlashAttention, cuDNN and fla-core's NSA",
    "ddp": "data-parallel wrappers against torch DDP",
    "longctx": "long-context training (Qwen3 shape), Pythia against transformers, grouped-query FlashAttention",
    "profile": "what limits the FlashAttention kernels: tile candidates with their resources, Nsight Compute",
    "matrix": "every attention backend x every data-parallel wrapper (DDP, ZeRO-1, FSDP2)",
    "optim": "optimizer step, training step and state memory of lmcore.optim against torch fused AdamW",
}


def provenance(command: str | None = None) -> dict:
    """Where a measurement came from: device, library versions, date and the command line."""
    import datetime
    import platform
    import sys

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "command": command if command is not None else " ".join(["python -m lmcore.bench", *sys.argv[1:]]),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def write_results(out_dir, stem: str, fields: list[str], rows: list[dict], result: dict) -> list[str]:
    """Write ``<stem>.csv`` (``rows`` in the columns ``fields``) and ``<stem>.json`` (``result``) in
    ``out_dir``, each atomically; returns both paths."""
    import csv
    import json
    from pathlib import Path

    from lmcore.utils import atomic_write

    out_dir = Path(out_dir)
    with atomic_write(out_dir / f"{stem}.csv") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with atomic_write(out_dir / f"{stem}.json") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=str)
    return [str(out_dir / f"{stem}.csv"), str(out_dir / f"{stem}.json")]
