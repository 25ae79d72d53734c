"""Run the Triton kernels on the CPU through the interpreter when there is no GPU.

The variable must be set before triton is first imported, so it is set here, at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
