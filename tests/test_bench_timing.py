"""The benchmarks' timing helpers that need no GPU: interleaving and spreads."""

import pytest

from lmcore.bench.timing import ratio_spread, rounds, spread


def test_rounds_interleave_in_rotating_order():
    calls = []

    def timer(name, value):
        def t():
            calls.append(name)
            return value
        return t

    out = rounds({"a": timer("a", 1.0), "b": timer("b", 2.0), "c": timer("c", 3.0)}, 4)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert out == {"a": [1.0] * 4, "b": [2.0] * 4, "c": [3.0] * 4}
    assert rounds({}, 3) == {}
    with pytest.raises(ValueError, match="rounds=0"):
        rounds({"a": lambda: 1.0}, 0)


def test_spread_and_paired_ratio():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    st = ratio_spread([2.0, 3.0, 8.0], [1.0, 2.0, 4.0])  # per round: 2, 1.5, 2
    assert st == {"median": 2.0, "min": 1.5, "max": 2.0}
    with pytest.raises(ValueError, match="paired rounds"):
        ratio_spread([1.0], [1.0, 2.0])
