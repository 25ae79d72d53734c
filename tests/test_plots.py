import math

import pytest

from lmcore import plots


def test_panels_at_most_two_per_row_and_style_applied():
    import matplotlib

    matplotlib.use("Agg")
    fig, axes = plots.panels(3)
    assert len(axes) == 3
    assert fig.get_figwidth() == pytest.approx(plots.PAGE_WIDTH_IN)
    cols = {round(ax.get_position().x0, 2) for ax in axes}
    assert len(cols) == 2  # three panels on two columns
    assert matplotlib.rcParams["figure.dpi"] >= 150
    assert matplotlib.rcParams["xtick.labelsize"] >= plots.MIN_FONT_PT
    with pytest.raises(ValueError, match="per_row=3"):
        plots.panels(3, per_row=3)


def test_bars_start_at_zero_and_refuse_negative():
    fig, (ax,) = plots.panels(1)
    plots.bars(ax, ["a", "b"], [1.95, 2.1], "loss (nats)")
    assert ax.get_ylim()[0] == 0
    with pytest.raises(ValueError, match="non-negative"):
        plots.bars(ax, ["a"], [-1.0], "x")


def test_table_rounds_and_labels():
    rows = [{"seq_len": 16384, "ms": 0.123456, "ratio": 4.275335e5, "key": "internal"}]
    t = plots.table(rows, {"seq_len": "Tokens", "ms": "Time (ms)", "ratio": "Ratio"})
    assert list(t.columns) == ["Tokens", "Time (ms)", "Ratio"]
    assert t.iloc[0].tolist() == ["16,384", "0.123", "427,534"]
    assert plots.table([{"x": math.nan}], {"x": "X"}).iloc[0, 0] == "–"
    with pytest.raises(KeyError, match="missing_key"):
        plots.table(rows, {"missing_key": "M"})
