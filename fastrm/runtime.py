"""The process a trainer runs in: its device, seeds and RNG state, autocast, and logging."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import random
import sys

import torch

from fastrm import distributed
from fastrm.config import require_setting

log = logging.getLogger("fastrm")


def check_device(name: str, setting_name: str = "device"):
    """``auto``, or a torch device string naming a device this machine has."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        require_setting(False, setting_name, name, "must be auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        require_setting(torch.cuda.is_available(), setting_name, name, "CUDA is not available on this machine")
        require_setting(device.index is None or device.index < torch.cuda.device_count(), setting_name, name,
                f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    else:
        require_setting(device.type == "cpu", setting_name, name, "must be auto, cpu, cuda or cuda:N")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available() and distributed.env_world_size() > 1:
            return torch.device("cuda", distributed.env_local_rank())  # torchrun: one GPU per process
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    return torch.device(name)


def set_seed(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def use_bf16_autocast(mixed_precision: str, device: torch.device) -> bool:
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def setup_logging():
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


class _DropHubKernelNotice(logging.Filter):
    """bitsandbytes (>= 0.50, CPUs with AVX512-BF16) tries to fetch an optional CPU 4-bit GEMM from the Hugging Face
    hub at import, and warns when it cannot ('pip install kernels'): it then runs its own CPU path, so the warning
    asks nothing of a fastrm user, and read at start-up it looks like a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def quiet_third_parties():
    """No per-save / per-load progress bars and INFO logs from transformers under fastrm's own bar and log, and no
    third-party warning a user cannot act on."""
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropHubKernelNotice) for f in bnb_cpu.filters):
        bnb_cpu.addFilter(_DropHubKernelNotice())


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
HEAP_CHOICES = ("keep", "system")


@functools.cache
def glibc():
    """glibc's malloc controls (``mallopt``, ``malloc_trim``), or None (not Linux, or a libc without them, e.g.
    musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def configure_heap(choice: str, device: torch.device) -> bool:
    """``keep`` (one of ``HEAP_CHOICES``, the ``cpu_heap`` setting) on a CPU run: memory a step frees stays with the
    process for the next step to reuse. glibc's
    defaults hand freed memory back to the OS (chunks over a few MB are mapped and unmapped one by one, a free heap
    top is trimmed), so every step's activations and gradients are page-faulted in again. Allocations under 32 MiB
    (glibc's most) come from the heap and freed space is not trimmed below 2 GiB; the peak is what it was, and it is
    not given back until the process ends (``release_free_memory`` still trims on purpose). On CUDA the tensors live
    on the device; the host heap is left to glibc. ``system``: glibc's defaults. Returns whether it changed them."""
    libc = glibc()
    if choice != "keep" or device.type != "cpu" or libc is None:
        return False
    return all([libc.mallopt(M_MMAP_THRESHOLD, 32 << 20), libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1),
                libc.mallopt(M_TOP_PAD, 64 << 20)])


def release_free_memory():
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; nothing elsewhere). Work that allocates
    and frees a model's worth of tensors (the packing probe's float64 copy) otherwise leaves that much resident
    though free, and the run's peak memory grows by it."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
