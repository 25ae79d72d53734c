"""Figures and tables for the book, drawn one way everywhere.

The figure standard of every chapter:

- at most two panels per row at page width (:func:`panels`), 150 dpi or more, fonts of 9 pt or
  more at page size (:func:`style`, applied by :func:`panels`);
- units on the axes, bars that start at zero (:func:`bars`), a legend outside the data where it
  would cover it;
- a caption that states the takeaway (the chapter's prose, under the figure).

Tables are for people (:func:`table`): labelled columns with units, rounded values, no internal
keys and no empty columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

PAGE_WIDTH_IN = 7.0  # inches the book's text column shows at 100% (figures are drawn at this width)
MIN_FONT_PT = 9
DPI = 150

RC = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": MIN_FONT_PT,
    "ytick.labelsize": MIN_FONT_PT,
    "legend.fontsize": MIN_FONT_PT,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.constrained_layout.use": True,
}


def style() -> None:
    """Apply the book's figure settings to matplotlib (idempotent)."""
    import matplotlib

    matplotlib.rcParams.update(RC)


def panels(n: int = 1, height: float = 3.0, per_row: int = 2, sharey: bool = False):
    """A figure of ``n`` panels at page width, at most ``per_row`` (<= 2) in a row.

    Returns ``(fig, axes)`` with ``axes`` a flat list of ``n`` axes (spare cells removed).
    ``height`` is the height of one row in inches.
    """
    import matplotlib.pyplot as plt

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} panels: expected an integer >= 1")
    if per_row not in (1, 2):
        raise ValueError(f"per_row={per_row!r}: expected 1 or 2 (wider rows are unreadable at page width)")
    style()
    cols = min(n, per_row)
    rows = math.ceil(n / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(PAGE_WIDTH_IN, height * rows), sharey=sharey, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


def bars(ax, labels: Sequence[str], values: Sequence[float], ylabel: str, errors: Sequence[float] | None = None,
         fmt: str = "{:.3g}", color: str | Sequence[str] | None = None):
    """Vertical bars from zero, each labelled with its value; ``ylabel`` names the unit."""
    values = [float(v) for v in values]
    if any(v < 0 for v in values):
        raise ValueError("bars draws non-negative values (a bar's length must mean its value)")
    x = range(len(values))
    drawn = ax.bar(x, values, yerr=errors, color=color, capsize=3 if errors is not None else 0)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(values + [0.0]) * 1.15 or 1.0)
    for rect, v in zip(drawn, values):
        ax.annotate(fmt.format(v), (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                    ha="center", va="bottom", fontsize=MIN_FONT_PT, xytext=(0, 2), textcoords="offset points")
    return drawn


def legend_outside(ax, **kw) -> None:
    """A legend to the right of the axes, where it covers no data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, **kw)


def _round(value: Any, digits: int) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 10 ** digits:
        return f"{int(value):,}"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def table(rows: Sequence[Mapping[str, Any]] | Any, columns: Mapping[str, str], digits: int = 3):
    """A table for reading: only ``columns`` (internal key -> label with unit), in that order,
    numbers rounded to ``digits`` significant digits (integers in full, with thousands separators).

    ``rows`` is a list of dicts or a pandas DataFrame. Returns a DataFrame of strings, indexed
    from 1 without the index shown when displayed through :func:`show`.
    """
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [key for key in columns if key not in frame.columns]
    if missing:
        raise KeyError(f"table columns {missing} are not in the data (it has {list(frame.columns)})")
    out = frame[list(columns)].rename(columns=dict(columns))
    return out.map(lambda v: _round(v, digits)) if hasattr(out, "map") else out.applymap(lambda v: _round(v, digits))


def show(frame) -> None:
    """Display a :func:`table` without its index (in a notebook; printed elsewhere)."""
    try:
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with the book extra
        print(frame.to_string(index=False))
        return
    display(frame.style.hide(axis="index"))
