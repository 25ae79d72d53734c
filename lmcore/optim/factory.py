"""Optimizers by name, with the parameter groups of a language model."""

from __future__ import annotations

import inspect

import torch

from lmcore.optim.adamw8bit import AdamW8bit
from lmcore.optim.muon import Muon
from lmcore.optim.shampoo import Shampoo
from lmcore.optim.soap import SOAP
from lmcore.optim.soap_lowbit import SOAPLowBit
from lmcore.train.optim import AdamW

OPTIMIZERS: dict[str, type] = {"adamw": AdamW, "adamw8bit": AdamW8bit, "shampoo": Shampoo, "soap": SOAP,
                               "soap-lowbit": SOAPLowBit, "muon": Muon}
HEAD_NAMES = ("embed", "lm_head", "head", "wte", "output")  # parameter names Muon leaves to AdamW


def param_roles(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, str]]:
    """``(name, parameter, role)`` with role ``"hidden"`` (a matrix inside the network),
    ``"embedding"`` (the input table or output head) or ``"vector"`` (norm gains, biases)."""
    out = []
    for name, p in model.named_parameters():  # a tied table is listed once
        if p.ndim < 2:
            role = "vector"
        elif any(h in part for part in name.lower().split(".")[:-1] for h in HEAD_NAMES):
            role = "embedding"
        else:
            role = "hidden"
        out.append((name, p, role))
    return out


def _groups(name: str, model_or_params, weight_decay: float) -> list:
    if not isinstance(model_or_params, torch.nn.Module):
        return list(model_or_params)  # parameters or groups, as given
    roles = param_roles(model_or_params)
    pick = lambda *wanted: [p for _, p, r in roles if r in wanted and p.requires_grad]  # noqa: E731
    if name == "muon":
        groups = [{"params": pick("hidden"), "use_muon": True, "weight_decay": weight_decay},
                  {"params": pick("embedding"), "use_muon": False, "weight_decay": weight_decay},
                  {"params": pick("vector"), "use_muon": False, "weight_decay": 0.0}]
    else:
        groups = [{"params": pick("hidden", "embedding"), "weight_decay": weight_decay},
                  {"params": pick("vector"), "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optimizer_spec(name: str, model_or_params, **hp) -> tuple[type, list, dict]:
    """``(class, parameter groups, keyword arguments)``: what ``make_optimizer`` builds, kept apart
    so that a wrapper (``lmcore.distributed.ShardedOptimizer``) can build it on each shard."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name={name!r} is not one of {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    if cls is Muon:  # the AdamW part of Muon takes the common Adam settings
        for common, own in (("betas", "adam_betas"), ("eps", "adam_eps")):
            if common in hp:
                hp.setdefault(own, hp.pop(common))
    accepted = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "params", "args",
                                                                                  "kwargs")]
    if cls is SOAPLowBit:
        accepted += [k for k in inspect.signature(SOAP.__init__).parameters if k not in ("self", "params")]
    unknown = sorted(set(hp) - set(accepted))
    if unknown:
        raise ValueError(f"optimizer {name!r} has no hyperparameter {', '.join(unknown)}; "
                         f"expected some of {sorted(set(accepted))}")
    groups = _groups(name, model_or_params, hp.get("weight_decay", 0.0))
    return cls, groups, hp


def make_optimizer(name: str, model_or_params, **hp) -> torch.optim.Optimizer:
    """An optimizer by name (see ``OPTIMIZERS``) over a model's parameters or given groups."""
    cls, groups, kwargs = optimizer_spec(name, model_or_params, **hp)
    return cls(groups, **kwargs)


def check_settings(name: str, **hp) -> None:
    """Refuse an unknown optimizer, an unknown hyperparameter or a value out of range before any
    work starts (by building the optimizer over one scalar parameter)."""
    make_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], **hp)
