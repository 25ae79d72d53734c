"""Optimizers beyond AdamW (chapter 7): 8-bit AdamW, Shampoo, SOAP, low-bit SOAP and Muon.

Every one is a ``torch.optim.Optimizer`` with parameter groups, decoupled weight decay, and a
state dict that resumes a run bit for bit. ``make_optimizer(name, model_or_params, **hp)`` builds
one by name, with the parameter groups a language model needs (no weight decay on norm gains;
for Muon, AdamW on the embedding, the head and the 1-D parameters).
"""

from lmcore.optim.adamw8bit import AdamW8bit
from lmcore.optim.factory import OPTIMIZERS, check_settings, make_optimizer, optimizer_spec, param_roles
from lmcore.optim.memory import state_bytes, state_bytes_formula
from lmcore.optim.muon import Muon, newton_schulz
from lmcore.optim.quantize import QuantizedState, code_book, dequantize, quantize
from lmcore.optim.shampoo import Shampoo, inverse_root
from lmcore.optim.soap import SOAP
from lmcore.optim.soap_lowbit import SOAPLowBit

__all__ = [
    "OPTIMIZERS", "AdamW8bit", "Muon", "QuantizedState", "SOAP", "SOAPLowBit", "Shampoo", "check_settings",
    "code_book",
    "dequantize", "inverse_root", "make_optimizer", "newton_schulz", "optimizer_spec", "param_roles",
    "quantize", "state_bytes", "state_bytes_formula",
]
