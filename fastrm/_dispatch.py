"""Backend choice shared by every op: ``"auto" | "triton" | "torch"``.

``auto`` runs the Triton kernels on CUDA tensors and the plain-PyTorch path everywhere else.
``triton`` on CPU tensors runs the very same kernels under the Triton interpreter, which only works
when ``TRITON_INTERPRET=1`` was set before fastrm was imported.
"""

from __future__ import annotations

import os
import warnings

import torch

from fastrm import kernels

BACKENDS = ("auto", "triton", "torch")
# The kernels compute in float32; float64 inputs ask for precision, which only the PyTorch path keeps.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned_no_triton = False


def default_backend() -> str:
    backend = os.environ.get("FASTRM_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"FASTRM_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str | None, device: torch.device, op: str,
                    dtype: torch.dtype | None = None, arg: str = "inputs") -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose inputs live on ``device``.

    With ``dtype`` given, float64 inputs go to the PyTorch path under ``auto`` and are a TypeError
    (naming ``arg``) under an explicit ``triton``.
    """
    if backend is None:
        backend = default_backend()
    chosen = _resolve_device(backend, device, op)
    if chosen == "triton" and dtype is not None and dtype not in TRITON_DTYPES:
        if backend == "auto":
            return "torch"
        raise TypeError(
            f"{op}: backend='triton' needs {arg} of dtype float32, bfloat16 or float16, got {dtype}; "
            "use backend='torch' (or 'auto') for float64"
        )
    return chosen


def _resolve_device(backend: str, device: torch.device, op: str) -> str:
    global _warned_no_triton
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if not kernels.HAS_TRITON:
            if not _warned_no_triton:
                warnings.warn("fastrm: triton is not installed; using the PyTorch path on CUDA", stacklevel=3)
                _warned_no_triton = True
            return "torch"
        return "triton"
    # backend == "triton"
    if not kernels.HAS_TRITON:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not installed")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if not kernels.INTERPRET:
            raise RuntimeError(
                f"{op}: backend='triton' on CPU tensors runs the kernels under the Triton interpreter, "
                "which needs TRITON_INTERPRET=1 in the environment before fastrm is imported; "
                "use backend='torch' (or 'auto') for the PyTorch path on CPU"
            )
        return "triton"
    raise RuntimeError(f"{op}: backend='triton' supports CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")
