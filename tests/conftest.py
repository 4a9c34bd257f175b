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


def pytest_configure(config):
    """Stop at once, with the fix, where this triton's interpreter cannot run under this numpy: triton 3.6's turns
    1-element arrays into Python ints with int(), which numpy >= 2.4 refuses (every Triton test would fail with
    "only 0-dimensional arrays can be converted to Python scalars"). Later triton squeezes first."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import inspect
    import warnings

    import numpy
    import triton
    from triton.runtime import interpreter

    try:
        with warnings.catch_warnings():  # numpy < 2.4 only deprecates it
            warnings.simplefilter("ignore", DeprecationWarning)
            int(numpy.zeros(1))
    except TypeError:
        if "int(self.handle.data))" in inspect.getsource(interpreter):
            raise pytest.UsageError(
                f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, the CPU kernel tests) cannot run "
                f"under numpy {numpy.__version__}: pip install 'numpy<2.4', or a newer triton") from None


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test (crc32, not hash(): str hashes change every process).
    # FASTRM_TEST_SEED shifts all of them, to run the suite on fresh inputs.
    shift = int(os.environ.get("FASTRM_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + shift) % (2**31))


@pytest.fixture
def device():
    return DEVICE
