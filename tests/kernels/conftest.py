"""Kernel tests: without CUDA, run the Triton kernels through Triton's CPU interpreter.

``TRITON_INTERPRET`` is read when the kernels are defined (when ``lmcore.kernels`` is imported),
so it is set here, before any test module imports them.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
