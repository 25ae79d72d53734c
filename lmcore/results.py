"""Recording a chapter's key results.

``record(name, value)`` does two things:

1. glues the value with ``myst_nb.glue`` so the prose can cite it (``{glue:text}`name```);
2. when the environment variable ``LMCORE_RESULTS`` names a JSON file (the book build and
   ``python -m lmcore.experiments`` set it), merges ``{name: value}`` into that file, so a
   run's numbers can be collected into tables without parsing the notebook.

Values must be JSON scalars, lists or dicts; NumPy and torch scalars are converted.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from lmcore.utils import atomic_write

RESULTS_ENV = "LMCORE_RESULTS"

_recorded: dict[str, Any] = {}


def _plain(value: Any) -> Any:
    """Convert NumPy / torch scalars and arrays to plain Python so they serialise to JSON."""
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays/scalars, torch tensors
        value = value.tolist()
    elif hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a value of type {type(value).__name__}: {value!r}; "
                    "expected a number, string, bool, None, list or dict")


def record(name: str, value: Any, glue: bool = True, display: bool = False) -> Any:
    """Record ``value`` under ``name`` for the prose (glue) and the run's results file.

    Returns the value, so ``loss = record("final_loss", loss)`` reads naturally.
    """
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"result name {name!r} must be letters, digits, '_' or '-'")
    plain = _plain(value)
    _recorded[name] = plain
    if glue:
        try:
            from myst_nb import glue as _glue
        except ImportError:  # myst-nb is part of the book extra; a bare install just skips glue
            _glue = None
        if _glue is not None:
            _glue(name, value, display=display)
    path = os.environ.get(RESULTS_ENV)
    if path:
        data = load(path) if os.path.exists(path) else {}
        data[name] = plain
        with atomic_write(path) as f:
            json.dump(data, f, indent=1, sort_keys=True)
    return value


def recorded() -> dict[str, Any]:
    """Everything recorded in this process so far."""
    return dict(_recorded)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file written by ``record``."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{os.fspath(path)} is not a results file: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)} is not a results file: expected a JSON object")
    return data
