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
