"""Input validation shared by the ops. Every error names the argument and what was expected.

Checks that only look at metadata (shape, dtype, device) are free. Checks that read values
(label range, 0/1 masks, finite outputs) cost a device sync; they are on by default and can be
switched off for production loops with ``FASTRM_CHECK_VALUES=0``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


_FINITE_CHECKS_DEFERRED = contextvars.ContextVar("fastrm_finite_checks_deferred", default=False)


def value_checks_enabled() -> bool:
    return os.environ.get("FASTRM_CHECK_VALUES", "1") != "0"


@contextlib.contextmanager
def deferred_finite_checks():
    """Inside, ops let NaN/inf inputs through instead of raising: the caller checks what comes out. The trainers'
    divergence guard does, once per step and on all ranks together, so a diverged model stops training with the
    guard's message (and checkpoint) rather than an op's ValueError raised on one rank."""
    token = _FINITE_CHECKS_DEFERRED.set(True)
    try:
        yield
    finally:
        _FINITE_CHECKS_DEFERRED.reset(token)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, name: str, x, *, dtypes=None, ndim: int | None = None, min_ndim: int | None = None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in ({_names(dtypes)}), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dim(s), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(x.shape)})")


def check_same_shape(op: str, name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor):
    if x.shape != ref.shape:
        raise ValueError(
            f"{op}: {name} must have the same shape as {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)} "
            "(fastrm never broadcasts)"
        )


def check_same_device(op: str, tensors: dict):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{op}: {name} is on {dev} but {first_name} is on {first}; all inputs must share a device")


def check_unit_interval(op: str, name: str, value) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{op}: {name} must lie in [0, 1], got {value}")
    return value


def check_positive(op: str, name: str, value) -> float:
    value = float(value)
    if not value > 0.0 or value != value or value == float("inf"):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


def check_choice(op: str, name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_binary_mask(op: str, name: str, mask: torch.Tensor):
    """A mask must hold only 0 and 1 (bool masks are 0/1 by construction)."""
    if mask.dtype == torch.bool or not value_checks_enabled():
        return
    if not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"{op}: {name} must contain only 0 and 1, found {bad}")


def check_finite(op: str, name: str, x: torch.Tensor, hint: str = ""):
    if _FINITE_CHECKS_DEFERRED.get():
        return
    if value_checks_enabled() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{op}: {name} contains NaN or inf{hint}")
