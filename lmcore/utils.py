"""Small helpers every chapter uses: device choice, seeding, showing source, interactivity.

Kept deliberately small; anything chapter-specific belongs in that chapter's subpackage.
"""

from __future__ import annotations

import inspect
import os
import random
import textwrap
from typing import Any, Callable

#: Set by ``lmcore.book`` and ``lmcore.experiments`` when they execute a chapter with papermill.
#: Chapters then draw static figures instead of widgets.
STATIC_ENV = "LMCORE_STATIC"
#: Set likewise to the path of the chapter's own output-free source notebook.
SOURCE_ENV = "LMCORE_SOURCE"

_DEVICES = ("auto", "cuda", "mps", "cpu")


def get_device(device: str | None = "auto"):
    """Return a ``torch.device``: CUDA if present, then Apple MPS, then CPU.

    ``device`` overrides the choice (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``);
    ``None`` and ``"auto"`` pick automatically. Asking for a device that is not
    available raises ``ValueError`` naming what is.
    """
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = str(device).split(":")[0]
    if kind not in _DEVICES:
        raise ValueError(f"device={device!r} is not one of {', '.join(_DEVICES)} (optionally 'cuda:N')")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} was requested but MPS is not available; use 'auto' or 'cpu'")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices) for a reproducible run."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def is_static() -> bool:
    """True when a chapter is being rendered (papermill, the book build), False for a person."""
    return os.environ.get(STATIC_ENV, "") not in ("", "0")


def chapter_notebook(name: str) -> "os.PathLike":
    """The source notebook of the running chapter: the one papermill was given, else ``name`` here."""
    from pathlib import Path

    return Path(os.environ.get(SOURCE_ENV) or name).resolve()


def interactive() -> bool:
    """True when widgets make sense: a person is running the notebook in Jupyter."""
    if is_static():
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def explore(function: Callable[..., Any], **controls: Any) -> Any:
    """Call ``function`` with sliders when interactive, or once at fixed values when rendered.

    Each control is a list/tuple of choices or a ``(low, high, step)`` triple of numbers, as
    ``ipywidgets.interact`` accepts them. When the book is rendered the function is called once,
    with each control at the function's own default for that argument, or else at its first
    choice (``low`` for a range), so the page shows a static figure; so is a kernel without
    ``ipywidgets``. Returns nothing when it shows controls, else what ``function`` returned.
    """
    if interactive():
        try:
            import ipywidgets
        except ImportError:  # a kernel without ipywidgets draws the static figure instead
            ipywidgets = None
        if ipywidgets is not None:
            ipywidgets.interact(function, **controls)  # displays the controls and the function's output
            return None
    signature = inspect.signature(function)
    values = {}
    for name, spec in controls.items():
        default = signature.parameters[name].default if name in signature.parameters else inspect.Parameter.empty
        if default is not inspect.Parameter.empty:
            values[name] = default
        elif isinstance(spec, (list, tuple)) and spec:
            values[name] = spec[0]
        else:
            values[name] = spec
    return function(**values)


def install_command(source: str | os.PathLike, constraints: str | os.PathLike | None = None,
                    extras: str = "book") -> str:
    """The arguments of ``pip install`` that install lmcore with ``extras`` from ``source``.

    ``source`` is a repository URL (``https://github.com/owner/name``, optionally ``@branch``), a
    ``git+`` URL, or a local wheel or source folder; ``constraints`` (a URL or a path to
    ``constraints.txt``) pins every version to the book's. The Colab cell of each chapter is built
    from this (``python -m lmcore.book colab``), so a test can run it against a local wheel.
    """
    import shlex
    from pathlib import Path

    text = os.fspath(source)
    if text.startswith(("https://", "http://", "git+")):
        url = text if text.startswith("git+") else f"git+{text}"
    elif Path(text).exists():
        url = Path(text).resolve().as_uri()
    else:
        raise ValueError(f"source={text!r} is neither a repository URL nor an existing wheel or folder of lmcore")
    requirement = f"lmcore[{extras}] @ {url}" if extras else f"lmcore @ {url}"
    pins = []
    if constraints is not None:
        pins = ["-c", os.fspath(constraints)]
    return " ".join(shlex.quote(part) for part in (*pins, requirement))


def source(obj: Any) -> str:
    """The source code of a function, class or module of lmcore, dedented."""
    return textwrap.dedent(inspect.getsource(obj))


def show_source(obj: Any, lines: tuple[int, int] | None = None):
    """Display lmcore's own source for ``obj`` in a notebook (rendered from the package, never pasted).

    ``lines`` optionally picks a 1-based inclusive range of the object's lines.
    """
    from IPython.display import Markdown

    text = source(obj)
    if lines is not None:
        first, last = lines
        text = "\n".join(text.splitlines()[first - 1 : last])
    where = f"{obj.__module__}.{obj.__qualname__}" if hasattr(obj, "__qualname__") else obj.__name__
    return Markdown(f"`{where}`\n\n```python\n{text}\n```")


def _file_mode(path: str) -> int:
    """The mode an existing ``path`` has, else what a new file gets under the umask (0666 & ~umask)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


class atomic_write:
    """Open a temporary file next to ``path`` and rename it over ``path`` only when the block succeeds.

    An exception (or an interrupt) inside the block leaves any previous ``path`` intact::

        with atomic_write("tok.json", "w") as f:
            json.dump(obj, f)
    """

    def __init__(self, path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
        if mode not in ("w", "wb"):
            raise ValueError(f"mode={mode!r}: atomic_write supports 'w' and 'wb'")
        self.path = os.fspath(path)
        self.mode = mode
        self.encoding = encoding if mode == "w" else None

    def __enter__(self):
        import tempfile

        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(self.path), dir=directory)
        os.chmod(self.tmp, _file_mode(self.path))  # mkstemp makes 0600; a result file gets the usual mode
        self.file = os.fdopen(fd, self.mode, encoding=self.encoding)
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        return False


def closure_loss(closure):
    """``torch.optim``'s closure contract: the loss ``closure()`` re-evaluates with gradients enabled, or None."""
    if closure is None:
        return None
    import torch

    with torch.enable_grad():
        return closure()
