"""Without a GPU, the kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.

Triton decides at its own import whether @triton.jit functions are compiled or interpreted, so the variable
must be set before anything imports triton (tests/conftest.py does the same for the whole suite)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
