"""Test setup: on a machine without CUDA the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton kernels are defined, i.e. before fastrm is imported,
so it is set here at conftest import time (pytest imports conftest before any test module).
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every kernel output buffer starts as NaN (see fastrm.kernels.new_output).
os.environ.setdefault("FASTRM_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test (crc32, not hash(): str hashes change every process).
    # FASTRM_TEST_SEED shifts all of them, to run the suite on fresh inputs.
    shift = int(os.environ.get("FASTRM_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + shift) % (2**31))


@pytest.fixture
def device():
    return DEVICE
