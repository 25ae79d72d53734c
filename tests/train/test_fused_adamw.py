"""The fused (Triton) AdamW path against torch.optim.AdamW: on CPU under Triton's interpreter,
and on a GPU with the compiled kernel."""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is first defined, at the first fused step

import pytest  # noqa: E402

from lmcore.train import AdamW  # noqa: E402
from lmcore.kernels.common import interpreting as _interpreting  # noqa: E402
from lmcore.train.optim import BLOCK  # noqa: E402

pytest.importorskip("triton")

SHAPES = [(7,), (33, 5), (3, BLOCK // 2 + 1), (1,), (2, 3, 5)]  # odd sizes; one spans two programs


def _compare_with_torch(device: str, steps: int = 10):
    """Run ours (fused) and torch's AdamW side by side on the same parameters and gradients."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours_p = [torch.nn.Parameter(x.clone().to(device)) for x in init]
    torch_p = [torch.nn.Parameter(x.clone().to(device)) for x in init]
    groups = lambda ps: [{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0}]  # noqa: E731
    kw = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
    ours = AdamW(groups(ours_p), fused=True, **kw)
    theirs = torch.optim.AdamW(groups(torch_p), foreach=False, **kw)
    for step in range(steps):
        grads = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
        for ps, opt in ((ours_p, ours), (torch_p, theirs)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            for group in opt.param_groups:
                group["lr"] = 3e-2 * (1 - step / 12)  # changes every step: scalars are runtime arguments
            opt.step()
        for a, b in zip(ours_p, torch_p):
            torch.testing.assert_close(a, b)
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"])
        torch.testing.assert_close(ours.state[a]["exp_avg_sq"], theirs.state[b]["exp_avg_sq"])
        assert ours.state[a]["step"] == steps
    # the moved parameters really moved (a no-op kernel would fail here)
    assert max((a.detach().cpu() - x).abs().max().item() for a, x in zip(ours_p, init)) > 1e-2
    return ours


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 (set here only when CUDA is absent)")
def test_fused_adamw_matches_torch_under_interpreter():
    _compare_with_torch("cpu")


@pytest.mark.gpu
def test_fused_adamw_matches_torch_on_gpu():
    ours = _compare_with_torch("cuda")
    assert ours._fuse([p for g in ours.param_groups for p in g["params"]])


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1")
def test_fused_state_dict_is_the_foreach_format():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))
    b.data.copy_(a.data)
    fused, plain = AdamW([a], fused=True), AdamW([b], fused=False)
    for opt, p in ((fused, a), (plain, b)):
        p.grad = torch.ones_like(p)
        opt.step()
    sd_f, sd_p = fused.state_dict(), plain.state_dict()
    assert sd_f["param_groups"] == sd_p["param_groups"]
    assert sd_f["state"].keys() == sd_p["state"].keys() == {0}
    assert sd_f["state"][0].keys() == sd_p["state"][0].keys()
    assert sd_f["state"][0]["step"] == sd_p["state"][0]["step"] == 1
    # a fused optimizer resumes from a foreach checkpoint and continues identically
    resumed = AdamW([a], fused=True)
    resumed.load_state_dict(sd_p)
    torch.testing.assert_close(resumed.state[a]["exp_avg"], plain.state[b]["exp_avg"])


def test_fused_true_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        AdamW([torch.nn.Parameter(torch.zeros(3))], fused=True)
    with pytest.raises(ValueError, match="fused="):
        AdamW([torch.nn.Parameter(torch.zeros(3))], fused="yes")


def test_auto_uses_foreach_on_cpu():
    opt = AdamW([torch.nn.Parameter(torch.zeros(3))])
    assert opt.fused is None
    assert not opt._fuse(opt.param_groups[0]["params"])


def _odd_params(seed: int = 0):
    """Many tensors of awkward sizes: one value, exactly a chunk, a chunk and one, empty, and one that is a
    view at a 4-byte offset (so the kernel runs without its alignment promise)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,), (BLOCK,), (BLOCK + 1,), (3, 7), (0,), (2, BLOCK // 2 + 3), (5,), (1, 1)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    buffer = torch.randn(40, generator=gen)
    ps.append(torch.nn.Parameter(buffer[1:38].view(37)))
    return ps


def _groups(ps):
    """Matrices with decay in one group, vectors (and the odd view) without in another."""
    return [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}]


def _run(opt, ps, steps: int, seed: int = 1, in_place: bool = False):
    """``steps`` steps on random gradients: new gradient tensors each step, or (in_place) the same ones."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            g = torch.randn(p.shape, generator=gen)
            if in_place and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = g
        opt.step()


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1")
def test_many_odd_tensors_in_one_launch_per_group_match_foreach_and_torch(monkeypatch):
    from lmcore.train import optim as optim_module

    launches = []
    real = optim_module._adamw_multi_tensor_
    def counted(cache, operands, *scalars):
        launches.append(len(operands))
        real(cache, operands, *scalars)

    monkeypatch.setattr(optim_module, "_adamw_multi_tensor_", counted)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    fused_p, foreach_p, torch_p = _odd_params(), _odd_params(), _odd_params()
    assert fused_p[-1].data_ptr() % 16 != 0  # the unaligned view really is unaligned
    fused, foreach = AdamW(_groups(fused_p), fused=True, **kw), AdamW(_groups(foreach_p), fused=False, **kw)
    theirs = torch.optim.AdamW(_groups(torch_p), foreach=False, **kw)
    for opt, ps in ((fused, fused_p), (foreach, foreach_p), (theirs, torch_p)):
        _run(opt, ps, 4)
    assert launches == [3, 6] * 4  # one launch per group and step, every tensor in it
    for a, b, c in zip(fused_p, foreach_p, torch_p):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(fused.state[a]["exp_avg_sq"], foreach.state[b]["exp_avg_sq"])
    assert (fused_p[2] - _odd_params()[2]).abs().min() > 0  # the last value of a chunk-and-one tensor moved


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1")
def test_fused_resume_is_bit_exact():
    whole_p, first_p = _odd_params(), _odd_params()
    whole = AdamW(_groups(whole_p), lr=1e-2, fused=True)
    _run(whole, whole_p, 2, seed=1)
    _run(whole, whole_p, 2, seed=2)
    first = AdamW(_groups(first_p), lr=1e-2, fused=True)
    _run(first, first_p, 2, seed=1)
    saved = first.state_dict()
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in first_p]
    resumed = AdamW(_groups(resumed_p), lr=1e-2, fused=True)
    resumed.load_state_dict(saved)
    _run(resumed, resumed_p, 2, seed=2)
    for a, b in zip(whole_p, resumed_p):
        assert torch.equal(a, b)
        assert torch.equal(whole.state[a]["exp_avg"], resumed.state[b]["exp_avg"])


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1")
def test_address_table_is_rebuilt_only_when_the_parameter_set_or_storage_changes(monkeypatch):
    from lmcore.train.multi_tensor import AddressTable

    builds = []
    real = AddressTable._build
    monkeypatch.setattr(AddressTable, "_build", lambda self, *a: (builds.append(1), real(self, *a))[1])
    ps, ref_p = _odd_params(), _odd_params()
    opt, ref = AdamW(_groups(ps), lr=1e-2, fused=True), AdamW(_groups(ref_p), lr=1e-2, fused=False)
    _run(opt, ps, 3, in_place=True)
    assert len(builds) == 2  # once per group; the same gradient tensors and storage afterwards: reused
    ps[0].data = ps[0].data.clone()  # the parameter moved to new storage
    extra, extra_ref = torch.nn.Parameter(torch.ones(9)), torch.nn.Parameter(torch.ones(9))
    opt.add_param_group({"params": [extra], "weight_decay": 0.0})
    ref.add_param_group({"params": [extra_ref], "weight_decay": 0.0})
    _run(ref, ref_p, 3, in_place=True)
    _run(opt, ps + [extra], 1, seed=5, in_place=True)
    _run(ref, ref_p + [extra_ref], 1, seed=5, in_place=True)
    assert len(builds) == 4  # the moved parameter's group and the new group
    _run(opt, ps + [extra], 1, seed=6)
    _run(ref, ref_p + [extra_ref], 1, seed=6)
    assert len(builds) == 7  # new gradient tensors: every group again
    for a, b in zip(ps + [extra], ref_p + [extra_ref]):
        torch.testing.assert_close(a, b)


def test_address_table_layout():
    from lmcore.train.multi_tensor import AddressTable

    xs = [torch.zeros(1), torch.zeros(8), torch.zeros(0), torch.zeros(9)]
    table, chunks, n, aligned = AddressTable(4).get([[x, x] for x in xs])
    assert n == 4 and aligned
    assert chunks.tolist() == [0, 1, 1, 3, 3, 3]  # 1, 2, 0 and 3 chunks of 4 values
    assert table[:4].tolist() == table[4:8].tolist() == [x.data_ptr() for x in xs]
    assert table[8:].tolist() == [1, 8, 0, 9] + [0, 1, 3, 3]
    assert not AddressTable(4).get([[xs[3][1:]]])[3]
