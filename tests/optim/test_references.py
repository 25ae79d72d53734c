"""Each optimizer against an independent implementation (installed for the tests only), or, where a
reference differs by design, against the math it must satisfy."""

from __future__ import annotations

import copy

import pytest
import torch

from lmcore.optim import SOAP, AdamW8bit, Muon, Shampoo, inverse_root, newton_schulz
from lmcore.kernels.common import interpreting as _interpreting
from lmcore.train.optim import AdamW

SHAPES = [(24, 40), (40, 24), (17, 9), (33,)]  # odd shapes, tall and wide, and a vector


def params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def grads(step, ps):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) * (1 + torch.arange(p.shape[-1]) / 4) for p in ps]


def run(opt, ps, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(ps, grads(t, ps)):
            p.grad = g.clone()
        opt.step()


# -- Muon --------------------------------------------------------------------------------------------


def test_newton_schulz_gives_singular_values_near_one():
    """Singular values spread over 2.5 decades (down to 1/600 of the Frobenius norm) all end in about
    [0.68, 1.2] after five quintic steps: near one, not exactly (the coefficients trade that for speed)."""
    torch.manual_seed(0)
    for m, n in [(64, 32), (32, 64), (17, 17)]:
        k = min(m, n)
        U, V = torch.linalg.qr(torch.randn(3, m, k)).Q, torch.linalg.qr(torch.randn(3, n, k)).Q
        B = U @ torch.diag(torch.logspace(-2.5, 0, k)) @ V.mT  # (3, m, n), condition number 316
        s = torch.linalg.svdvals(newton_schulz(B))
        assert s.min() > 0.65 and s.max() < 1.25, (s.min(), s.max())
        assert newton_schulz(B).shape == B.shape


def test_newton_schulz_batched_equals_one_by_one():
    torch.manual_seed(0)
    B = torch.randn(5, 24, 40)
    one_by_one = torch.stack([newton_schulz(b) for b in B])
    torch.testing.assert_close(newton_schulz(B), one_by_one, rtol=1e-5, atol=1e-6)


def test_muon_matches_the_reference_single_device_muon():
    muon = pytest.importorskip("muon")
    ours, theirs = params(), params()
    opt = Muon([{"params": ours[:3], "use_muon": True}, {"params": ours[3:], "use_muon": False}],
               lr=0.02, momentum=0.95, weight_decay=0.1, scale="spectral", adam_lr_ratio=3e-4 / 0.02,
               adam_betas=(0.9, 0.95), adam_eps=1e-10, ns_dtype=torch.bfloat16)
    ref = muon.SingleDeviceMuonWithAuxAdam([
        dict(params=theirs[:3], use_muon=True, lr=0.02, momentum=0.95, weight_decay=0.1),
        dict(params=theirs[3:], use_muon=False, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)])
    run(opt, ours, 5)
    run(ref, theirs, 5)
    for a, b in zip(ours, theirs):  # the reference rounds update * scale to bfloat16 before adding
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4)
    moved = max((a - b).abs().max().item() for a, b in zip(ours, params()))
    assert moved > 0.05  # the comparison means something: the weights moved


# -- SOAP --------------------------------------------------------------------------------------------


def test_soap_matches_pytorch_optimizer_soap():
    po = pytest.importorskip("pytorch_optimizer")
    ours, theirs = params(), params()
    kw = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.0, precondition_frequency=3)
    opt = SOAP(ours, max_precond_dim=30, **kw)  # the 40-long sides keep the identity
    ref = po.SOAP(theirs, max_precondition_dim=30, precondition_1d=False, normalize_gradient=False,
                  correct_bias=True, **kw)
    run(opt, ours, 10)
    run(ref, theirs, 10)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    assert max((a - b).abs().max().item() for a, b in zip(ours, params())) > 0.01


def test_soap_with_identity_bases_and_no_refresh_is_adam():
    ours, ref_ps = params(), params()
    opt = SOAP(ours, lr=1e-2, betas=(0.9, 0.99), eps=1e-30, weight_decay=0.1, precondition_frequency=10 ** 9)
    run(opt, ours, 1)  # the first step only measures
    for p in ours:
        for side in ("left", "right"):
            if side in opt.state[p]:
                opt.state[p][side + "_basis"] = torch.eye(opt.state[p][side].shape[0])
    ref = torch.optim.AdamW(ref_ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-30, weight_decay=0.1)
    run(opt, ours, 6, start=1)
    run(ref, ref_ps, 6, start=1)
    for a, b in zip(ours, ref_ps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_soap_bases_are_orthogonal_eigenvectors_of_the_factors():
    """Gradients of a steady structure (a fixed matrix plus noise): the factors settle, and the power
    iterations of the refreshes turn the bases into their eigenvectors."""
    ps = params()
    fixed = [torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) for p in ps]
    opt = SOAP(ps, lr=1e-3, precondition_frequency=2)
    for t in range(30):
        for p, a, g in zip(ps, fixed, grads(t, ps)):
            p.grad = a + 0.1 * g
        opt.step()
    for p in ps[:3]:
        for side in ("left", "right"):
            q = opt.state[p][side + "_basis"]
            torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), rtol=0, atol=1e-5)
            factor = opt.state[p][side]
            rotated = q.T @ factor @ q  # closer to diagonal in the basis than in the standard one
            off = lambda a: (a - torch.diag(a.diagonal())).norm()  # noqa: E731
            assert off(rotated) < 0.2 * off(factor)
            diagonal = rotated.diagonal()
            assert torch.all(diagonal[:-1] >= diagonal[1:] * 0.5)  # largest first, roughly


# -- Shampoo -----------------------------------------------------------------------------------------


def test_inverse_root_is_a_root_of_the_damped_inverse():
    torch.manual_seed(0)
    a = torch.randn(12, 30)
    factor = a @ a.T
    root = inverse_root(factor, 4, 1e-6)
    torch.testing.assert_close(torch.linalg.matrix_power(root, 4) @ (factor + 1e-6 * torch.eye(12)),
                               torch.eye(12), rtol=0, atol=1e-3)


def test_shampoo_without_factors_is_adam():
    ours, ref_ps = params(), params()
    opt = Shampoo(ours, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, max_precond_dim=0)
    ref = AdamW(ref_ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    run(opt, ours, 5)
    run(ref, ref_ps, 5)
    for a, b in zip(ours, ref_ps):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_shampoo_step_is_the_preconditioned_momentum_grafted_to_adams_norm():
    (w,) = params(shapes=[(24, 40)])
    opt = Shampoo([w], lr=0.1, betas=(0.9, 0.99), eps=1e-8, precondition_frequency=1, matrix_eps=1e-6)
    run(opt, [w], 3)
    before = w.detach().clone()
    (g,) = grads(3, [w])
    w.grad = g.clone()
    s = opt.state[w]
    m = s["exp_avg"].lerp(g, 0.1)
    v = s["exp_avg_sq"] * 0.99 + 0.01 * g * g
    left, right = s["left"].lerp(g @ g.T, 0.01), s["right"].lerp(g.T @ g, 0.01)
    direction = inverse_root(left, 4, 1e-6) @ m @ inverse_root(right, 4, 1e-6)
    adam = (m / (1 - 0.9 ** 4)) / ((v / (1 - 0.99 ** 4)).sqrt() + 1e-8)
    opt.step()
    step = (before - w.detach()) / 0.1
    torch.testing.assert_close(step.norm(), adam.norm(), rtol=1e-5, atol=0)
    torch.testing.assert_close(step / step.norm(), direction / direction.norm(), rtol=0, atol=1e-4)


# -- AdamW8bit ---------------------------------------------------------------------------------------


def _adam8_vs(ref_cls, steps=10, **kw):
    ours, theirs, exact = params(shapes=[(64, 512)]), params(shapes=[(64, 512)]), params(shapes=[(64, 512)])
    run(AdamW8bit(ours, lr=1e-2, fused=False, **kw), ours, steps)
    run(ref_cls(theirs, lr=1e-2, **kw), theirs, steps)
    run(AdamW(exact, lr=1e-2, **kw), exact, steps)
    start = params(shapes=[(64, 512)])[0]
    moved = (exact[0] - start).norm()
    return (ours[0] - theirs[0]).norm() / moved, (ours[0] - exact[0]).norm() / moved


def test_adamw8bit_matches_torchao_adamw8bit():
    torchao_optim = pytest.importorskip("torchao.optim")
    gap_ref, gap_fp32 = _adam8_vs(torchao_optim.AdamW8bit, betas=(0.9, 0.95), weight_decay=0.1)
    assert gap_ref < 0.03, gap_ref  # two 8-bit codes of the same states: a few percent of the whole move
    assert gap_fp32 < 0.03, gap_fp32


def test_adamw8bit_keeps_small_and_1d_parameters_in_float32():
    big, small, vec = (torch.nn.Parameter(torch.randn(s)) for s in [(64, 64), (8, 8), (5000,)])
    opt = AdamW8bit([big, small, vec], min_8bit_size=4096)
    run(opt, [big, small, vec], 1)
    assert opt.state[big]["exp_avg_q"].dtype == torch.uint8
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "exp_avg" in opt.state[vec]


@pytest.mark.skipif(not _interpreting() and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 or CUDA")
def test_fused_kernel_matches_the_torch_path():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(100, 70)]  # 7000 values: the last block of 256 is partly padding
    a = [p.to(device) for p in params(shapes=shapes)]
    b = [p.to(device) for p in params(shapes=shapes)]
    fused = AdamW8bit([torch.nn.Parameter(a[0])], lr=1e-2, weight_decay=0.1, fused=True)
    plain = AdamW8bit([torch.nn.Parameter(b[0])], lr=1e-2, weight_decay=0.1, fused=False)
    pa, pb = fused.param_groups[0]["params"], plain.param_groups[0]["params"]
    for t in range(3):
        for p in (pa[0], pb[0]):
            p.grad = grads(t, [p])[0].to(device)
        fused.step()
        plain.step()
    torch.testing.assert_close(pa[0], pb[0], rtol=0, atol=1e-5)
    sa, sb = fused.state[pa[0]], plain.state[pb[0]]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(sa[key + "_scale"], sb[key + "_scale"], rtol=1e-6, atol=0)
        same = (sa[key + "_q"] == sb[key + "_q"]).float().mean().item()
        assert same > 0.99, (key, same)  # a value on a midpoint may round either way


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1")
def test_fused_adamw8bit_updates_all_tensors_of_a_group_in_two_launches(monkeypatch):
    from lmcore.optim import adamw8bit

    launches = []
    real = adamw8bit.AdamW8bit._step_fused
    def counted(self, ps, scalars, quantized):
        launches.append((len(ps), quantized))
        real(self, ps, scalars, quantized)

    monkeypatch.setattr(adamw8bit.AdamW8bit, "_step_fused", counted)
    shapes = [(70, 100), (3, 257), (16, 16), (9, 31), (5,), (1, 1), (300,)]  # blocks cut short; small; 1-D
    a, b = params(shapes=shapes), params(shapes=shapes)
    kw = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=500)
    fused, plain = AdamW8bit(a, fused=True, **kw), AdamW8bit(b, fused=False, **kw)
    for t in range(3):
        for pa, pb, g in zip(a, b, grads(t, a)):
            pa.grad, pb.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    assert launches == [(2, True), (5, False)] * 3  # one launch for the 8-bit tensors, one for the rest
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5)
        sa, sb = fused.state[pa], plain.state[pb]
        if "exp_avg_q" in sa:
            torch.testing.assert_close(sa["exp_avg_sq_scale"], sb["exp_avg_sq_scale"], rtol=1e-6, atol=0)
            assert (sa["exp_avg_q"] == sb["exp_avg_q"]).float().mean() > 0.99
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in a]
    resumed = AdamW8bit(resumed_p, fused=True, **kw)
    resumed.load_state_dict(copy.deepcopy(fused.state_dict()))  # as from a checkpoint file
    for ps, opt in ((a, fused), (resumed_p, resumed)):
        for p, g in zip(ps, grads(7, ps)):
            p.grad = g
        opt.step()
    for pa, pr in zip(a, resumed_p):
        assert torch.equal(pa, pr)  # resumed from the state dict: the same step bit for bit
