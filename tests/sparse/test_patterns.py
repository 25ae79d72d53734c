"""Layouts and densities against hand-counted small cases, element masks against their definitions."""

import pytest
import torch

from lmcore.sparse import PATTERNS, BlockLayout, make_layout, render
from lmcore.sparse.patterns import bigbird, dilated, global_tokens, local, mixed, strided


def rows(layout):
    """Each query block's allowed key blocks, as lists (easy to compare with a drawing)."""
    return [torch.nonzero(r).flatten().tolist() for r in layout.blocks]


def test_local_blocks_and_density_hand_counted():
    lay = local(64, 16, window=16)  # 4 blocks; a 16-token window reaches one block each side
    assert rows(lay) == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]
    assert lay.density == pytest.approx(10 / 16)
    assert lay.sparsity == pytest.approx(6 / 16)
    # diagonal blocks lie wholly inside |q - k| < 16, neighbours only partly
    assert lay.partial.tolist() == [[False, True, False, False], [True, False, True, False],
                                    [False, True, False, True], [False, False, True, False]]
    causal = local(64, 16, window=16, causal=True)
    assert rows(causal) == [[0], [0, 1], [1, 2], [2, 3]]
    assert causal.density == pytest.approx(7 / 16)


def test_strided_global_dilated_hand_counted():
    assert rows(strided(64, 16, stride=32)) == [[0, 1, 3], [0, 1, 3], [1, 2, 3], [1, 2, 3]]
    assert rows(strided(64, 16, stride=32, causal=True)) == [[0], [0, 1], [1, 2], [1, 2, 3]]
    assert rows(global_tokens(64, 16, num_global=16)) == [[0, 1, 2, 3], [0, 1], [0, 2], [0, 3]]
    assert global_tokens(64, 16, num_global=16, causal=True).density == pytest.approx(7 / 16)
    assert rows(dilated(64, 16, span=64, dilation=2)) == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert make_layout("dense", 64, 16, causal=True).density == pytest.approx(10 / 16)


@pytest.mark.parametrize("causal", [False, True])
def test_local_element_mask_is_the_window(causal):
    t, w = 50, 7  # ragged last block, window not a multiple of the block
    lay = local(t, 16, window=w, causal=causal)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    want = (i - j).abs() < w
    if causal:
        want &= j <= i
    assert torch.equal(lay.element_mask(), want)
    assert lay.element_density == pytest.approx(want.float().mean().item())


@pytest.mark.parametrize("causal", [False, True])
def test_mixed_element_mask_is_window_or_global(causal):
    t, w, g = 80, 9, 16
    lay = mixed(t, 16, window=w, num_global=g, causal=causal)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    want = ((i - j).abs() < w) | (i < g) | (j < g)
    if causal:
        want &= j <= i
    assert torch.equal(lay.element_mask(), want)


def test_every_block_marked_allowed_holds_an_allowed_pair():
    for name, params in [("local", {"window": 5}), ("mixed", {"window": 5, "num_global": 16}),
                         ("bigbird", {"window": 5, "num_global": 16, "num_random": 1})]:
        lay = make_layout(name, 64, 16, causal=True, **params)
        per_block = lay.element_mask().reshape(4, 16, 4, 16).any(3).any(1)
        assert torch.equal(per_block, lay.blocks), name


def test_bigbird_is_seeded_and_adds_random_blocks():
    a = bigbird(256, 16, window=16, num_global=16, num_random=2, seed=1)
    b = bigbird(256, 16, window=16, num_global=16, num_random=2, seed=1)
    c = bigbird(256, 16, window=16, num_global=16, num_random=2, seed=2)
    assert torch.equal(a.blocks, b.blocks)
    assert not torch.equal(a.blocks, c.blocks)
    base = mixed(256, 16, window=16, num_global=16)
    assert bool((a.blocks | base.blocks).eq(a.blocks).all())  # a superset of window + global
    assert a.density > base.density
    causal = bigbird(256, 16, window=16, num_global=16, num_random=2, seed=1, causal=True)
    assert not bool(causal.blocks.triu(1).any())


def test_image_and_render():
    lay = local(64, 16, window=16, causal=True)
    img = lay.image()
    assert img.shape == (4, 4) and img.dtype.name == "uint8"
    assert img[0, 0] == 128 and img[1, 0] == 128 and img[0, 1] == 0  # diagonal causal blocks are partial
    assert lay.image(elements=True).shape == (64, 64)
    ax = render(lay)
    assert "local" in ax.get_title()


@pytest.mark.parametrize("call, match", [
    (lambda: local(64, 16, window=0), "window=0"),
    (lambda: mixed(64, 16, window=8, num_global=10), "num_global=10 must be a multiple"),
    (lambda: strided(64, 16, stride=24), "stride=24"),
    (lambda: strided(64, 16, stride=128), "stride=128"),
    (lambda: dilated(64, 16, span=64, dilation=0), "dilation=0"),
    (lambda: bigbird(64, 16, window=8, num_global=16, num_random=9), "num_random=9"),
    (lambda: make_layout("nope", 64, 16), "unknown pattern 'nope'"),
    (lambda: make_layout("local", 64, 16, width=3), "local"),
    (lambda: local(64, 0, window=8), "block_size=0"),
    (lambda: BlockLayout(torch.ones(3, 4, dtype=torch.bool), 16, 64), r"expected \(\.\.\., 4, 4\)"),
    (lambda: BlockLayout(torch.ones(4, 4), 16, 64), "bool tensor"),
])
def test_bad_parameters_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_patterns_registry_is_complete():
    assert set(PATTERNS) == {"dense", "local", "strided", "global", "mixed", "bigbird", "dilated"}
