"""Run folders that are never clobbered: what to do when an output folder already holds a run.

Every command that writes a run (``lmcore.experiments run|grid``, ``lmcore.train``) takes the same
choice, and prints the decision in one line before any work starts::

    refuse     (the default) stop with a message when the folder holds an earlier run
    resume     continue the run that is there (``--resume``)
    overwrite  replace it (``--overwrite``)
    next       write to the first free numbered sibling instead: runs/a-2, runs/a-3, ... (``--next``)

``replace_folder`` moves a finished staging folder into place in one rename, so a folder is
either the earlier run or the complete new one, never half of each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

POLICIES = ("refuse", "resume", "overwrite", "next")


class FolderInUse(FileExistsError):
    """An output folder holds an earlier run and the command was not told what to do with it."""


def add_folder_flags(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """``--resume`` / ``--overwrite`` / ``--next`` (mutually exclusive) on ``parser``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="folder_policy", action="store_const", const="resume",
                       help=resume_help)
    group.add_argument("--overwrite", dest="folder_policy", action="store_const", const="overwrite",
                       help="replace the earlier run in the output folder")
    group.add_argument("--next", dest="folder_policy", action="store_const", const="next",
                       help="if the output folder holds a run, write to the next free numbered sibling "
                            "(OUT-2, ...)")
    parser.set_defaults(folder_policy="refuse")


def numbered_sibling(path: str | os.PathLike, taken: Callable[[Path], object]) -> Path:
    """The first of ``path-2``, ``path-3``, ... for which ``taken(candidate)`` is false."""
    path = Path(path)
    n = 2
    while taken(path.with_name(f"{path.name}-{n}")):
        n += 1
    return path.with_name(f"{path.name}-{n}")


def choose_folder(path: str | os.PathLike, holds_run: Callable[[Path], str | None], policy: str,
                  what: str = "run") -> tuple[Path, str]:
    """Where a run may write, and the decision as one line; ``FolderInUse`` when refused.

    ``holds_run(folder)`` describes the earlier run a folder holds (e.g. ``"ckpt.pt, metrics.jsonl"``)
    or returns None when there is none.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {POLICIES}")
    path = Path(path)
    found = holds_run(path) if path.exists() else None
    if found is None:
        if policy == "resume":
            raise FolderInUse(f"--resume: {path} holds no earlier {what} to continue; run without --resume")
        return path, f"writing the {what} to {path}"
    if policy == "resume":
        return path, f"resuming the {what} in {path} ({found})"
    if policy == "overwrite":
        return path, f"overwriting the earlier {what} in {path} ({found})"
    sibling = numbered_sibling(path, lambda p: p.exists() and os.listdir(p))
    if policy == "next":
        return sibling, f"{path} holds an earlier {what} ({found}); writing to {sibling} instead"
    raise FolderInUse(f"{path} holds an earlier {what} ({found}) and nothing was changed: pass --resume to "
                      f"continue it, --overwrite to replace it, or --next to write to {sibling}")


def staging_folder(target: str | os.PathLike) -> Path:
    """A fresh hidden folder beside ``target`` (same file system, so the final move is one rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))


def replace_folder(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished ``staged`` folder to ``target``, replacing what was there."""
    staged, target = Path(staged), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        target.rename(old)
    staged.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(folder: str | os.PathLike) -> list[Path]:
    """Delete leftover ``.NAME.staging-*`` / ``.NAME.old-*`` folders of runs that were killed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(".")
             and (".staging-" in p.name or ".old-" in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale
