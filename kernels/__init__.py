"""Triton kernels of fastrm, installed as ``fastrm.kernels``.

Each module holds one kernel family: the ``@triton.jit`` kernels, a small launch helper per direction,
and the plain-PyTorch reference of the op beside them. Nothing here checks user input or touches
autograd; that is ``fastrm.ops``' job.

Triton decides at *decoration* time whether a kernel is compiled or interpreted, so
``TRITON_INTERPRET=1`` must be set before this package is imported for the kernels to run on CPU
tensors. ``INTERPRET`` records what was in force when the kernels were defined.
"""

import os

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS: the torch backend still works
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Tests set FASTRM_POISON_OUTPUTS=1 so every buffer a launcher hands to a kernel starts as NaN:
# an element the kernel forgets to write then fails the comparison instead of passing by luck.
POISON_OUTPUTS = os.environ.get("FASTRM_POISON_OUTPUTS", "0") == "1"


def new_output(shape, *, dtype, device):
    """Allocate a kernel output buffer (NaN-filled when POISON_OUTPUTS is on)."""
    import torch

    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
