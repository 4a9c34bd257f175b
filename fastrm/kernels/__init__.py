"""Triton kernels of fastrm, installed as ``fastrm.kernels``.

Each module holds one kernel family: the ``@triton.jit`` kernels, a small launch helper per direction,
and the plain-PyTorch reference of the op beside them. Nothing here checks user input or touches
autograd; that is ``fastrm.ops``' job.

Triton decides at *decoration* time whether a kernel is compiled or interpreted, so
``TRITON_INTERPRET=1`` must be set before this package is imported for the kernels to run on CPU
tensors. ``INTERPRET`` records what was in force when the kernels were defined.
"""

import contextlib
import os

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS: the torch backend still works
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_compiled_settings = False


def interpreter_settings() -> bool:
    """Whether launchers pick the interpreter's block sizes: under the interpreter, unless
    :func:`compiled_launch_settings` is in force."""
    return INTERPRET and not _compiled_settings


@contextlib.contextmanager
def compiled_launch_settings():
    """Launch with the block sizes and warps of a compiled (CUDA) run even under the interpreter, so that
    what is launched on CPU tensors is exactly what a GPU would compile (the compile-coverage test and the
    resource report record launches this way)."""
    global _compiled_settings
    saved, _compiled_settings = _compiled_settings, True
    try:
        yield
    finally:
        _compiled_settings = saved


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


# Row-scan kernels (GAE, PPO losses, KL): one program per row walks T in chunks of BLOCK_T lanes, carrying the
# scan state between chunks, so a batch is one launch. Compiled, each thread holds ROW_LANES_PER_THREAD lanes
# of a chunk: 512 lanes over 4 warps. Measured with the compile check (benchmarks/kernel_compile.py, ptxas
# of CUDA 12.9 / 13.4), that keeps every row kernel at <= 64 registers with no spills on sm_80 and sm_90, so
# 8 programs (32 warps) fit on an SM and a batch of up to ~1000 rows is resident at once on an H100/H200;
# 1024 lanes over 4 warps needed 90-111 registers (3-4 programs per SM), and 4096 spilled. The interpreter
# pays per chunk iteration, so it takes bigger chunks. Chunks are powers of two (tl.arange); a short row takes
# one chunk just big enough, but at least ROW_SHORT_BLOCK_T lanes, so that padded lengths varying from batch
# to batch compile at most three chunk sizes (128, 256, 512). An explicit block_t (tests) goes down to 16.
ROW_BLOCK_T = 512
ROW_BLOCK_T_INTERPRET = 4096
ROW_SHORT_BLOCK_T = 128
ROW_MIN_BLOCK_T = 16
ROW_NUM_WARPS = 4
ROW_LANES_PER_THREAD = 4


def row_block_t(T: int, block_t: int | None = None) -> int:
    """Chunk length for a row of T positions (``block_t``: the longest chunk, default per backend)."""
    floor = ROW_MIN_BLOCK_T
    if block_t is None:
        block_t = ROW_BLOCK_T_INTERPRET if interpreter_settings() else ROW_BLOCK_T
        floor = min(ROW_SHORT_BLOCK_T, next_power_of_2(block_t))
    return max(floor, min(next_power_of_2(block_t), next_power_of_2(T)))


def row_num_warps(block: int) -> int:
    """Warps for a chunk of ``block`` lanes: ROW_LANES_PER_THREAD lanes per thread, at most ROW_NUM_WARPS."""
    return max(1, min(ROW_NUM_WARPS, block // (32 * ROW_LANES_PER_THREAD)))


def kernel_op(name: str, fake, mutates_args=()):
    """Make a launcher usable inside ``torch.compile(fullgraph=True)``: register it as the torch.library
    custom op ``fastrm::<name>``, which dynamo keeps as one opaque node. Its schema comes from the launcher's
    annotations, its output shapes from ``fake`` (a function of the same arguments returning empty tensors).
    Calls go through the op only while torch.compile traces; eager calls go straight to the launcher, as a
    Python custom op costs tens of microseconds per call. An output annotated ``Tensor | None`` crosses the
    op as an empty tensor. The returned function has the op as its ``.op`` attribute."""
    import functools
    import inspect
    import typing

    import torch

    def decorate(launcher):
        hints = typing.get_type_hints(launcher)
        returned = hints["return"]
        several = typing.get_origin(returned) is tuple
        outputs = typing.get_args(returned) if several else (returned,)
        optional = [type(None) in typing.get_args(t) for t in outputs]

        def encode(out, args, kwargs):  # None outputs -> empty tensors
            if returned is type(None):
                return None
            device = next(v.device for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
            outs = tuple(torch.empty(0, device=device) if o is None else o for o in (out if several else (out,)))
            return outs if several else outs[0]

        def decode(out):  # empty tensors -> None where the launcher returns None
            if not any(optional):
                return out
            outs = tuple(None if opt and o.numel() == 0 else o for o, opt in zip(out if several else (out,), optional))
            return outs if several else outs[0]

        def impl(*args, **kwargs):
            return encode(launcher(*args, **kwargs), args, kwargs)

        def fake_impl(*args, **kwargs):
            return encode(fake(*args, **kwargs), args, kwargs)

        op_return = tuple[tuple(torch.Tensor for _ in outputs)] if several else (
            torch.Tensor if outputs[0] is not type(None) else None)
        signature = inspect.signature(launcher)
        impl.__signature__ = signature.replace(
            parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()],
            return_annotation=op_return)
        impl.__name__ = impl.__qualname__ = launcher.__name__
        impl.__module__ = launcher.__module__
        op = torch.library.custom_op(f"fastrm::{name}", impl, mutates_args=mutates_args)
        op.register_fake(fake_impl)

        @functools.wraps(launcher)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return decode(op(*args, **kwargs))
            return launcher(*args, **kwargs)

        call.op = op
        return call

    return decorate


def mask_as_bytes(mask):
    """Bool masks go to kernels as bytes (same storage and strides, no copy); 16-bit float masks as ``mask != 0``
    bytes (one small copy: the interpreter of triton < 3.9 misreads bfloat16 masks); other dtypes as they are."""
    import torch

    if mask.dtype in (torch.bfloat16, torch.float16):
        mask = mask != 0
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask
