"""Every optimizer: trains a tiny model, resumes bit for bit, refuses bad hyperparameters."""

from __future__ import annotations

import io

import pytest
import torch

from lmcore.optim import OPTIMIZERS, Muon, make_optimizer, optimizer_spec, param_roles
from tests.optim.conftest import HP, tiny_model, train_steps

NAMES = list(OPTIMIZERS)


@pytest.mark.parametrize("name", NAMES)
def test_reduces_the_loss_of_a_tiny_model_in_50_steps(name):
    model = tiny_model()
    losses = train_steps(model, make_optimizer(name, model, weight_decay=0.1, **HP[name]), 50)
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_resume_is_bit_exact(name):
    model = tiny_model()
    opt = make_optimizer(name, model, weight_decay=0.1, **HP[name])
    train_steps(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train_steps(model, opt, 5, seed=7)  # through a refresh of the preconditioners (every 3 steps)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = tiny_model(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = make_optimizer(name, resumed, weight_decay=0.1, **{**HP[name],
                                                              "lr": 1.0})  # lr comes from the file
    opt2.load_state_dict(saved["opt"])
    train_steps(resumed, opt2, 5, seed=7)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name,hp,message", [
    ("adamw8bit", dict(lr=-1.0), r"AdamW8bit: lr=-1.0 is out of range; expected a number in \[0, inf\]"),
    ("adamw8bit", dict(betas=(0.9, 1.0)), r"betas=1.0 is out of range; expected a number in \[0, 1\)"),
    ("adamw8bit", dict(block=100), r"block=100 is out of range"),
    ("shampoo", dict(precondition_frequency=0),
     r"precondition_frequency=0 is out of range; expected an integer"),
    ("shampoo", dict(matrix_eps=0.0), r"matrix_eps=0.0 is out of range; expected a number in \(0, inf\]"),
    ("soap", dict(eps=0), r"SOAP: eps=0 is out of range"),
    ("soap", dict(shampoo_beta=1.5), r"shampoo_beta=1.5 is out of range; expected a number in \[0, 1\)"),
    ("soap-lowbit", dict(bits=2), r"SOAPLowBit: bits=2 is out of range; expected 4 or 8"),
    ("muon", dict(momentum=1.0), r"Muon: momentum=1.0 is out of range; expected a number in \[0, 1\)"),
    ("muon", dict(scale="big"), r"scale='big' is out of range"),
    ("muon", dict(ns_steps=2.5), r"ns_steps=2.5 is out of range; expected an integer"),
])
def test_bad_hyperparameters_are_refused_with_name_and_range(name, hp, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(name, tiny_model(), **hp)


def test_factory_refuses_unknown_names_and_settings():
    with pytest.raises(ValueError, match="name='lion' is not one of"):
        make_optimizer("lion", tiny_model())
    with pytest.raises(ValueError, match="'soap' has no hyperparameter momentum"):
        make_optimizer("soap", tiny_model(), momentum=0.9)


def test_groups_decay_matrices_and_muon_leaves_embedding_head_and_vectors_to_adamw():
    model = tiny_model()
    roles = {n: r for n, _, r in param_roles(model)}
    assert roles["embedding.weight"] == "embedding" and roles["lm_head.weight"] == "embedding"
    assert roles["blocks.0.attn.qkv_proj.weight"] == "hidden" and roles["final_norm.weight"] == "vector"
    cls, groups, _ = optimizer_spec("muon", model, weight_decay=0.1)
    assert cls is Muon and [g["use_muon"] for g in groups] == [True, False, False]
    hidden = {id(p) for _, p, r in param_roles(model) if r == "hidden"}
    assert {id(p) for p in groups[0]["params"]} == hidden
    assert groups[2]["weight_decay"] == 0.0
    _, groups, _ = optimizer_spec("soap", model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


@pytest.mark.parametrize("name", NAMES)
def test_weight_decay_is_decoupled(name):
    """With a zero gradient and fresh moments, one step only shrinks the weights by lr * wd."""
    w = torch.nn.Parameter(torch.randn(64, 48))
    opt = make_optimizer(name, [w], weight_decay=0.5, **{**HP[name], "lr": 0.1})
    if name in ("soap", "soap-lowbit"):  # SOAP's first step only measures
        w.grad = torch.randn_like(w)
        opt.step()
    before = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.1 * 0.5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw8bit", "soap-lowbit"])
def test_loaded_codes_stay_8_bit(name):
    model = tiny_model()
    opt = make_optimizer(name, model, **HP[name])
    train_steps(model, opt, 2)
    opt.load_state_dict(opt.state_dict())
    dtypes = {k: v.dtype for s in opt.state.values() for k, v in s.items() if k.endswith("_q")}
    assert dtypes and set(dtypes.values()) == {torch.uint8}


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_formula_equals_the_state_dict(name):
    from lmcore.optim import state_bytes, state_bytes_formula

    model = tiny_model()
    opt = make_optimizer(name, model, **HP[name])
    train_steps(model, opt, 2)
    options = {k: v for k, v in HP[name].items() if k != "lr" and k != "precondition_frequency"}
    assert state_bytes(opt) == state_bytes_formula(name, model, **options)
