"""Test setup: on a machine without CUDA the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton kernels are defined, i.e. before fastrm is imported,
so it is set here at conftest import time (pytest imports conftest before any test module).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every kernel output buffer starts as NaN (see fastrm.kernels.new_output).
os.environ.setdefault("FASTRM_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: fresh random inputs, never the same tensor twice.
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))


@pytest.fixture
def device():
    return DEVICE
