"""Shampoo and SOAP step same-shaped parameters as one stack, and SOAP's refresh takes its QR from
Cholesky QR: both must compute what one parameter at a time, with Householder QR, computes."""

from __future__ import annotations

import json

import pytest
import torch

from lmcore.optim import SOAP, SOAPLowBit, Shampoo, inverse_root
from lmcore.optim import base
from lmcore.optim.base import orthonormal_columns
from tests.optim.test_references import grads, params, run

# stacks of 3, 2 and 1 (the vector of 7000 allows stacks of that many values)
SAME = [(24, 40), (24, 40), (24, 40), (40, 24), (40, 24), (17, 9), (33,), (33,), (7000,)]
OPTIMIZERS = {
    "shampoo": lambda ps, **kw: Shampoo(ps, lr=1e-2, precondition_frequency=3, matrix_eps=1e-6, **kw),
    "soap": lambda ps, **kw: SOAP(ps, lr=1e-2, precondition_frequency=3, **kw),
    "soap-lowbit": lambda ps, **kw: SOAPLowBit(ps, lr=1e-2, precondition_frequency=3, bits=8, **kw),
}


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_cholesky_qr_is_householder_qr_up_to_column_signs(one_at_a_time, monkeypatch):
    """Batched, and with each Gram matrix factored alone (as the widest are)."""
    if one_at_a_time:
        monkeypatch.setattr(base, "CHOLESKY_ONE_AT_A_TIME", 48)
    torch.manual_seed(0)
    a = torch.randn(4, 48, 48)
    a[1] = a[1] @ torch.diag(torch.logspace(0, -4, 48))  # graded columns
    a[2] = a[2] @ a[2].T  # symmetric, as a factor times a basis is
    a[3, :, 7] = a[3, :, 6]  # rank-deficient: solved by Householder QR instead
    q, h = orthonormal_columns(a), orthonormal_columns(a, "householder")
    signs = torch.sign((q * h).sum(-2, keepdim=True))
    assert torch.all(signs.abs() == 1)
    torch.testing.assert_close(q, h * signs, rtol=0, atol=2e-5)
    torch.testing.assert_close(q.mT @ q, torch.eye(48).expand(4, 48, 48), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="method='lu'; expected 'cholesky' or 'householder'"):
        orthonormal_columns(a, "lu")


def test_batched_inverse_root_equals_one_matrix_at_a_time():
    torch.manual_seed(0)
    a = torch.randn(3, 12, 30)
    factors = a @ a.mT
    roots = inverse_root(factors, 4, 1e-6)
    for f, r in zip(factors, roots):
        torch.testing.assert_close(r, inverse_root(f, 4, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_stack_of_same_shaped_parameters_steps_as_one_optimizer_per_parameter(name, monkeypatch):
    cls = Shampoo if name == "shampoo" else SOAP
    method = "_step_bucket" if name == "shampoo" else "_step_matrices"
    real, stacks = getattr(cls, method), []
    monkeypatch.setattr(cls, method, lambda self, ps, *a: (stacks.append(len(ps)), real(self, ps, *a))[1])
    together = params(shapes=SAME)
    alone = params(shapes=SAME)
    opt = OPTIMIZERS[name](together, weight_decay=0.1)
    opts = [OPTIMIZERS[name]([p], weight_decay=0.1) for p in alone]
    for t in range(8):  # through two refreshes
        for ps in (together, alone):
            for p, g in zip(ps, grads(t, ps)):
                p.grad = g.clone()
        opt.step()
        for o in opts:
            o.step()
    for a, b, start in zip(together, alone, params(shapes=SAME)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert (a - start).abs().max() > 1e-3  # every parameter moved
    assert max(stacks) == 3


@pytest.mark.parametrize("name", ["soap", "soap-lowbit"])
def test_soap_with_cholesky_qr_follows_soap_with_householder_qr(name):
    a, b = params(shapes=SAME), params(shapes=SAME)
    run(OPTIMIZERS[name](a, qr="cholesky"), a, 10)
    run(OPTIMIZERS[name](b, qr="householder"), b, 10)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=2e-5)


def test_states_are_tensors_of_their_own_not_slices_of_a_stack():
    """A slice kept as a state would keep (and save into every checkpoint) the whole stack."""
    ps = params(shapes=SAME)
    for opt in (SOAP(ps, precondition_frequency=2), Shampoo(ps, precondition_frequency=2)):
        run(opt, ps, 5)
        for state in opt.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key


def test_soap_refuses_an_unknown_qr_method():
    with pytest.raises(ValueError, match=r"SOAP: qr='lu' is not one of \('cholesky', 'householder'\)"):
        SOAP(params(), qr="lu")


def test_speed_test_times_only_the_optimizers_asked_for(tmp_path):
    from lmcore.bench.optim import main

    result = main(["--quick", "--optimizers", "adamw,soap"])
    assert set(result["step_ms"]) == {"torch-fused-adamw", "adamw", "soap"}
    assert set(result["metrics"]) == {"lmcore_adamw_step_vs_torch", "soap_train_vs_adamw"}
    json.dumps(result, default=str)
    with pytest.raises(ValueError, match="--optimizers='soap,lion'"):
        main(["--quick", "--optimizers", "soap,lion"])


def test_stacks_hold_at_most_the_largest_parameter():
    from lmcore.optim.base import chunks

    assert chunks(list("abcde"), [4, 4, 4, 4, 9], 9) == [["a", "b"], ["c", "d"], ["e"]]
    assert chunks(list("ab"), [20, 1], 9) == [["a"], ["b"]]  # one item a run even when too large
