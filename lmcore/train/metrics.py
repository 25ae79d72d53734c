"""Training metrics as JSON lines, and a plot of the curves."""

from __future__ import annotations

import json
import os

from lmcore.utils import atomic_write


class MetricsLog:
    """Append one JSON object per line to ``path`` (or only keep them in memory when ``path`` is None).

    ``append`` continues an existing file; ``after`` (the iteration a resumed run starts from) first
    drops the records of later iterations, which the run is about to log again.
    """

    def __init__(self, path: str | os.PathLike | None = None, append: bool = False, after: int | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.records: list[dict] = []
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if append and os.path.exists(self.path):
                self.records = read_metrics(self.path)
                if after is not None:
                    self.records = [r for r in self.records if r.get("iter", 0) <= after]
            with atomic_write(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)

    def log(self, **record) -> dict:
        self.records.append(record)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics file (a partly written last line is skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_metrics(records: list[dict], path: str | os.PathLike | None = None, ax=None):
    """Training loss and validation loss against the iteration; saves to ``path`` if given."""
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    val = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    if train or val:
        ax.legend()
    if own:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
    return ax
