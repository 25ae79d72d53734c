"""Muon's fast paths: matrices batched by their wide orientation, Newton-Schulz with the sums folded
into the products, and the AdamW part in the multi-tensor kernel, each against the plain path."""

from __future__ import annotations

import copy

import pytest
import torch

from lmcore.kernels.common import interpreting
from lmcore.optim import Muon, muon
from lmcore.optim.muon import orthogonalize_

SHAPES = [(48, 16), (16, 48), (16, 16), (2, 8, 6), (48, 16), (40,), (7, 5)]


def params(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def set_grads(ps, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def test_a_matrix_and_its_transpose_iterate_as_one_batch(monkeypatch):
    stacks = []
    real = muon.orthogonalize_
    monkeypatch.setattr(muon, "orthogonalize_",
                        lambda X, steps: stacks.append(tuple(X.shape)) or real(X, steps))
    ps = params()
    opt = Muon([{"params": ps[:5], "use_muon": True}, {"params": ps[5:], "use_muon": False}], lr=0.02)
    set_grads(ps, 0)
    opt.step()
    # (2, 8, 6) is the matrix 2 x 48; two of the three 16 x 48 or 48 x 16 matrices are tall: a tall stack
    assert sorted(stacks) == [(1, 2, 48), (1, 16, 16), (3, 48, 16)]


@pytest.mark.parametrize("scale", ["rms", "spectral"])
def test_batched_step_equals_each_matrix_alone(scale):
    """Stacked with others (and transposed when tall), each matrix steps as it would on its own."""
    together, alone = params(SHAPES[:5]), params(SHAPES[:5])
    kw = dict(lr=0.02, weight_decay=0.1, scale=scale)
    opt = Muon(together, **kw)
    singles = [Muon([p], **kw) for p in alone]
    for t in range(3):
        set_grads(together, t)
        set_grads(alone, t)
        opt.step()
        for o in singles:
            o.step()
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(together, params(SHAPES[:5]))) > 0.01


@pytest.mark.parametrize("fold", [False, True])
def test_a_tall_stack_iterates_as_its_transpose_would(fold):
    """Tall matrices use the Gram matrix of their columns: the same iteration as on the transpose."""
    torch.manual_seed(0)
    B = torch.randn(3, 40, 24, dtype=torch.float64)
    tall = orthogonalize_(B.clone(), 5, fold=fold)
    wide = orthogonalize_(B.mT.contiguous(), 5, fold=fold).mT
    torch.testing.assert_close(tall, wide, rtol=1e-12, atol=1e-12)


def test_folded_newton_schulz_equals_the_term_by_term_one():
    torch.manual_seed(0)
    B = torch.randn(4, 24, 40, dtype=torch.float64)
    exact = orthogonalize_(B.clone(), 5, fold=False)
    torch.testing.assert_close(orthogonalize_(B.float(), 5, fold=True), exact.float(), rtol=1e-4, atol=1e-5)
    gap = {fold: (orthogonalize_(B.bfloat16(), 5, fold=fold).double() - exact).norm() / exact.norm()
           for fold in (True, False)}
    assert gap[True] < 0.02 and gap[False] < 0.05, gap  # bfloat16: near the float64 result,
    assert gap[True] < gap[False], gap  # and nearer folded: one rounding per sum, not one per term


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 or CUDA")
def test_fused_adamw_part_matches_the_plain_one_and_resumes_bit_exactly():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = [torch.nn.Parameter(p.detach().to(device)) for p in params()]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    groups = lambda ps: [{"params": ps[:5], "use_muon": True},  # noqa: E731
                         {"params": ps[5:], "use_muon": False}]
    kw = dict(lr=0.02, weight_decay=0.1, adam_lr_ratio=0.1)
    fused, plain = Muon(groups(a), fused=True, **kw), Muon(groups(b), fused=False, **kw)
    for t in range(3):
        set_grads(a, t)
        set_grads(b, t)
        for p in a + b:
            p.grad = p.grad.to(device)
        fused.step()
        plain.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
        assert fused.state[pa].keys() == plain.state[pb].keys()
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in a]
    resumed = Muon(groups(resumed_p), fused=True, **kw)
    resumed.load_state_dict(copy.deepcopy(fused.state_dict()))
    for ps, opt in ((a, fused), (resumed_p, resumed)):
        set_grads(ps, 9)
        for p in ps:
            p.grad = p.grad.to(device)
        opt.step()
    for pa, pr in zip(a, resumed_p):
        assert torch.equal(pa, pr)


def test_bad_fused_setting_is_refused():
    with pytest.raises(ValueError, match=r"Muon: fused='yes'; expected True, False or None"):
        Muon(params(), fused="yes")
