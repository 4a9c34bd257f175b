"""Input validation shared by the ops. Every error names the argument and what was expected.

Checks that only look at metadata (shape, dtype, device) are free. Checks that read values (label range,
0/1 masks, finite inputs and outputs) would cost a host-device sync on a GPU, which stalls the pipeline
and breaks CUDA graphs, so where they run depends on the device and ``FASTRM_CHECK_VALUES``:

* ``1`` (default): on CPU the check reads the values and raises at once (no sync to pay there). On any
  other device it never waits: the failed condition is kept on the device (one tiny kernel) and raised,
  with the same message, by :func:`raise_deferred_errors` -- which the trainers call where they read values
  anyway, once per step (:meth:`fastrm.guard.DivergenceGuard.check_step`). Kernels stay memory-safe on such input
  (an out-of-range label reads nothing and gives a NaN log-prob), so the loss they feed turns NaN.
* ``sync``: read and raise at once on every device (one sync per check; for debugging).
* ``assert``: device-side asserts (``torch._assert_async``) off the CPU: no sync, but a failure ends the
  CUDA context with PyTorch's generic message, as an out-of-range index in ``F.cross_entropy`` does.
* ``0``: no value checks.

While ``torch.compile`` traces, checks become ``torch._assert_async`` (traceable, no graph break).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


VALUE_CHECK_MODES = ("1", "0", "sync", "assert")
_FINITE_CHECKS_DEFERRED = contextvars.ContextVar("fastrm_finite_checks_deferred", default=False)


def value_check_mode() -> str:
    mode = os.environ.get("FASTRM_CHECK_VALUES", "1")
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"FASTRM_CHECK_VALUES must be one of {VALUE_CHECK_MODES}, got {mode!r}")
    return mode


def value_checks_enabled() -> bool:
    return value_check_mode() != "0"


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


def host_reads_allowed(device) -> bool:
    """Whether code may read tensor values on ``device`` from the host right now without a device sync
    (or with one the user asked for): CPU tensors in eager mode, or any device with FASTRM_CHECK_VALUES=sync."""
    if torch.compiler.is_compiling():
        return False
    return _is_host(device) or value_check_mode() == "sync"


def _is_host(device) -> bool:
    """Whether ``device``'s memory is the host's. Tests replace this to run the GPU code paths on CPU tensors."""
    return torch.device(device).type == "cpu"


# Conditions found false on a device, waiting for raise_deferred_errors: (device, message) -> 0-d bool "failed".
_deferred: dict[tuple[torch.device, str], torch.Tensor] = {}


def require(ok: torch.Tensor, message: str, detail: Callable[[], str] | None = None, error=ValueError):
    """Fail unless the 0-d bool tensor ``ok`` is true (see the module docstring for when and how).

    ``detail()``, only called when a failure is raised on the spot, may read values for a precise message
    (e.g. the offending label); the deferred and asserted forms use ``message`` alone.
    """
    mode = value_check_mode()
    if mode == "0":
        return
    if host_reads_allowed(ok.device):
        if not bool(ok):
            raise error(message + (detail() if detail is not None else ""))
    elif mode == "assert" or torch.compiler.is_compiling():
        torch._assert_async(ok, message)
    else:
        key = (ok.device, message)
        failed = _deferred.get(key)
        if failed is None:
            failed = _deferred[key] = torch.zeros((), dtype=torch.bool, device=ok.device)
        failed.logical_or_(~ok)


def deferred_failure(device) -> torch.Tensor | None:
    """A 0-d bool on ``device``: whether a deferred check there has failed (None when none is pending).
    No sync: trainers fold it into the loss they are about to read."""
    device = torch.device(device)
    flags = [flag for (dev, _), flag in _deferred.items()
             if dev.type == device.type and (device.index is None or dev.index == device.index)]
    return torch.stack(flags).any().to(device) if flags else None


def raise_deferred_errors():
    """Raise (ValueError) every check that failed on a device since the last call, then forget them.

    Costs one sync per device holding pending checks; call it where values are read anyway (fastrm's
    trainers do, when they check the loss). On CPU, checks have already raised where they failed.
    """
    if not _deferred:
        return
    by_device: dict[str, list] = {}
    for key, flag in _deferred.items():
        by_device.setdefault(key[0], []).append((key[1], flag))
    failed = []
    for items in by_device.values():
        states = torch.stack([flag for _, flag in items]).tolist()
        failed += [message for (message, _), bad in zip(items, states) if bad]
    _deferred.clear()
    if failed:
        raise ValueError("invalid input to a fastrm op (found on the device without a sync, reported here):\n  "
                         + "\n  ".join(failed))


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
    require(((mask == 0) | (mask == 1)).all(), f"{op}: {name} must contain only 0 and 1",
            lambda: f", found {mask[(mask != 0) & (mask != 1)].flatten()[0].item()}")


def check_finite(op: str, name: str, x: torch.Tensor, hint: str = ""):
    # (torch.compile cannot read a ContextVar: traced, the check stays, as a device assert)
    if not torch.compiler.is_compiling() and _FINITE_CHECKS_DEFERRED.get():
        return
    if value_checks_enabled():
        require(torch.isfinite(x).all(), f"{op}: {name} contains NaN or inf{hint}")


def check_labels(op: str, labels: torch.Tensor, V: int, ignore_index: int):
    """Every label lies in [0, V) or equals ignore_index."""
    if not value_checks_enabled():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    require(~bad.any(), f"{op}: labels must lie in [0, {V}) or equal ignore_index={ignore_index}",
            lambda: f", found {labels[bad].flatten()[0].item()}")
