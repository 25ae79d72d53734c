"""Benchmarks: ``python -m lmcore.bench NAME [--quick] [--json OUT]``.

Each benchmark is a module ``lmcore.bench.NAME`` with a ``main(argv) -> dict`` function that
measures lmcore against the reference implementation in the same run and returns
``{"metrics": {...}, "provenance": {...}, ...}``. The dispatcher prints that as JSON and writes
it to ``--json OUT`` when given. Speed is reported as ratios against the reference, because
machines are shared and noisy; tests never assert on wall time.
"""

from __future__ import annotations

BENCHMARKS = {
    "bpe": "byte-level BPE training and encoding against HF tokenizers and tiktoken",
    "train": "training throughput and MFU against a torch.nn baseline",
    "attention": "FlashAttention-2 in Triton against torch SDPA backends",
    "sparse": "block-sparse attention against FlexAttention and dense kernels",
    "ddp": "data-parallel wrappers against torch DDP",
    "longctx": "long-context training (Qwen3 shape), Pythia against transformers, grouped-query FlashAttention",
    "profile": "what limits the FlashAttention kernels: tile candidates with their resources, Nsight Compute",
}


def gpu_slug(name: str) -> str:
    """A GPU's name as recorded files name it: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``."""
    import re

    m = re.search(r"\b([A-Za-z]{1,3}\d{2,4}[A-Za-z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu").lower()


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
