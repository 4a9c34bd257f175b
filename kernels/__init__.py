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


# Row-scan kernels (GAE, PPO losses): one program per row walks T in chunks of BLOCK_T lanes. Compiled,
# 1024 fp32 lanes over 4 warps is 8 per thread, so a chunk's scan stays in registers and long rows loop;
# the interpreter pays per chunk iteration, so it takes bigger chunks. Chunks are powers of two
# (tl.arange); below 16 lanes they would only add compiled variants.
ROW_BLOCK_T = 1024
ROW_BLOCK_T_INTERPRET = 4096
ROW_MIN_BLOCK_T = 16
ROW_NUM_WARPS = 4


def row_block_t(T: int, block_t: int | None = None) -> int:
    """Chunk length for a row of T positions; short rows take one chunk just big enough."""
    if block_t is None:
        block_t = ROW_BLOCK_T_INTERPRET if INTERPRET else ROW_BLOCK_T
    return max(ROW_MIN_BLOCK_T, min(next_power_of_2(block_t), next_power_of_2(T)))


def row_num_warps(block: int) -> int:
    return max(1, min(ROW_NUM_WARPS, block // 256))


def mask_as_bytes(mask):
    """Bool masks go to kernels as bytes (same storage and strides, no copy); 16-bit float masks as ``mask != 0``
    bytes (one small copy: the interpreter of triton < 3.9 misreads bfloat16 masks); other dtypes as they are."""
    import torch

    if mask.dtype in (torch.bfloat16, torch.float16):
        mask = mask != 0
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask
