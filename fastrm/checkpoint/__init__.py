"""The output folder and its checkpoints: one run at a time (a lock), checkpoints that are complete or absent,
pruning of this run's oldest checkpoints only, a ``latest`` pointer that stays inside the folder, and a trainer
state stored without pickle (safetensors for tensors, JSON for the rest).

``output_dir`` holds::

    fastrm.lock                    while a run uses the folder: its pid, host and start (refreshed every minute)
    config.yaml  metrics.jsonl  tensorboard/
    checkpoint-<step>/             a Hugging Face model folder (safetensors weights, config, tokenizer) plus
        trainer_state.json         run id, step, optimizer hyper-parameters, schedule, RNG, data position, config
        trainer_state.safetensors  the state's tensors (optimizer moments, RNG states, critic weights)
        verified                   written once a training step has run from it with a finite loss and gradient
    latest                         the name of the newest checkpoint
    diverged-checkpoint-<step>/    a checkpoint set aside because the training step run from it diverged

A folder appears under its name only complete (it is written as ``.tmp-...`` and renamed) and is deleted by
renaming it to ``.trash-...`` first, so a kill at any moment leaves no partial folder under a checkpoint's name;
the next run, holding the lock, removes what a killed one left behind. Only rank 0 calls what writes here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastrm.checkpoint.files import (
    TMP_PREFIX,
    TRASH_PREFIX,
    CheckpointLoadError,
    CheckpointWriteError,
    OutputDirError,
    discard,
    fsync,
    os_error_reason,
    read_json,
    write_atomic,
)
from fastrm.checkpoint.lock import LOCK_FILE, OutputLock, folder_flock, release_locks
from fastrm.checkpoint.state import (
    LEGACY_STATE,
    STATE_FORMAT,
    STATE_JSON,
    STATE_TENSORS,
    dataclass_types,
    load_trainer_state,
    read_state,
    saved_settings,
    write_state,
)

__all__ = [  # the folder's API: what callers reach as fastrm.checkpoint.X, wherever it is defined
    "CHECKPOINT_PREFIX", "LATEST_FILE", "LEGACY_STATE", "LOCK_FILE", "STATE_FORMAT", "STATE_JSON", "STATE_TENSORS",
    "TMP_PREFIX", "VERIFIED_FILE", "CheckpointLoadError", "CheckpointWriteError", "OutputDirError", "OutputLock",
    "checkpoint_info", "dataclass_types", "discard", "latest_checkpoint", "load_trainer_state", "mark_verified",
    "open_output_dir", "os_error_reason", "point_latest", "prune", "read_state", "release_locks", "saved_settings",
    "set_aside_diverged", "write_checkpoint", "write_state",
]

log = logging.getLogger("fastrm")


CHECKPOINT_PREFIX = "checkpoint-"


DIVERGED_PREFIX = "diverged-"


LATEST_FILE = "latest"


VERIFIED_FILE = "verified"


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


# What a run writes besides its checkpoints: overwrite_output_dir=true deletes these with them.
RUN_OUTPUTS = (LATEST_FILE, "config.yaml", "metrics.jsonl", "tensorboard", "final")


_CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d+)")


def remove_leftovers(out_dir: Path):
    """Temporary and trashed files a killed run left behind. Only the lock holder may call this: another run's
    ``.tmp-`` folder is that run's checkpoint being written."""
    for path in Path(out_dir).iterdir():
        if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            log.info("output_dir: removing %s, left by an interrupted run", path.name)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    run_id: str | None
    written_at: float
    verified: bool


def checkpoint_in(out_dir: Path, name: str) -> Path | None:
    """``out_dir/name`` if ``name`` is a checkpoint's name (``checkpoint-<step>``) and the folder is really inside
    ``out_dir`` (not a symlink out of it); else None."""
    if not _CHECKPOINT_NAME.fullmatch(name):
        return None
    path = Path(out_dir) / name
    if path.is_symlink() or path.resolve().parent != Path(out_dir).resolve():
        return None
    return path


def checkpoint_info(path: Path) -> CheckpointInfo | None:
    """What a complete checkpoint says of itself; None for a folder that is not one (missing weights or state)."""
    path = Path(path)
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    if match is None or not path.is_dir() or not any((path / f).is_file() for f in WEIGHT_FILES):
        return None
    verified = (path / VERIFIED_FILE).is_file()
    if (path / STATE_JSON).is_file():
        meta = read_json(path / STATE_JSON)
        if not isinstance(meta, dict) or not (path / STATE_TENSORS).is_file():
            return None
        return CheckpointInfo(path, int(meta.get("step", match.group(1))), meta.get("run_id"),
                              float(meta.get("written_at", 0.0)), verified)
    if (path / LEGACY_STATE).is_file():
        return CheckpointInfo(path, int(match.group(1)), None, (path / LEGACY_STATE).stat().st_mtime, verified)
    return None


def list_checkpoints(out_dir: Path) -> list[CheckpointInfo]:
    """The complete checkpoints inside ``out_dir``, newest written first."""
    found = []
    for path in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        if checkpoint_in(out_dir, path.name) is not None:
            info = checkpoint_info(path)
            if info is not None:
                found.append(info)
    return sorted(found, key=lambda c: (c.written_at, c.step), reverse=True)


def _pointer(out_dir: Path) -> str | None:
    path = Path(out_dir) / LATEST_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names when it is a complete checkpoint inside ``out_dir``,
    else (``latest`` missing, broken, or pointing out of the folder, which is never followed) the newest complete
    one; None if there is none."""
    out = Path(out_dir)
    name = _pointer(out)
    if name is not None:
        named = checkpoint_in(out, name)
        if named is not None and checkpoint_info(named) is not None:
            return named
    newest = list_checkpoints(out)
    if name is not None:
        why = "is not a checkpoint folder inside it" if checkpoint_in(out, name) is None else "is incomplete or gone"
        log.warning("%s: `latest` names %r, which %s; %s", out, name, why,
                    f"using the newest complete checkpoint, {newest[0].path.name}" if newest else "no checkpoint found")
    return newest[0].path if newest else None


def point_latest(out_dir: Path, checkpoint: Path | None):
    """``latest`` := ``checkpoint``'s name, replaced atomically (removed for None)."""
    out = Path(out_dir)
    if checkpoint is None:
        with contextlib.suppress(FileNotFoundError):
            (out / LATEST_FILE).unlink()
        return
    write_atomic(out / LATEST_FILE, Path(checkpoint).name + "\n")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def earlier_run(out_dir: Path) -> list[str]:
    """Names in ``out_dir`` that belong to an earlier run's checkpoints (complete or not)."""
    names = [p.name for p in Path(out_dir).iterdir()
             if p.name.startswith((CHECKPOINT_PREFIX, DIVERGED_PREFIX)) or p.name == LATEST_FILE]
    return sorted(names, key=lambda n: (n == LATEST_FILE, n.startswith(DIVERGED_PREFIX), len(n), n))


def open_output_dir(out_dir: Path, resume: bool, overwrite: bool) -> tuple[OutputLock, Path | None, str]:
    """Rank 0's first act on the output folder: take its lock, clear what a killed run left, and decide where the
    run starts. Returns ``(lock, checkpoint to resume from or None, run id)``.

    Without ``resume`` or ``overwrite`` a folder holding an earlier run's checkpoints is refused (its checkpoints
    would be pruned by the new run or mixed with them); ``overwrite`` deletes that run's checkpoints and outputs
    (``RUN_OUTPUTS``), leaving other files alone; ``resume`` continues it (its run id included), or starts fresh
    when there is no checkpoint."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out).acquire()
    try:
        with folder_flock(out):  # a run being refused may be writing its .tmp- lock file
            remove_leftovers(out)
        checkpoint = None
        if overwrite:
            removed = [p for p in earlier_run(out) + [n for n in RUN_OUTPUTS if n != LATEST_FILE]
                       if (out / p).exists() or (out / p).is_symlink()]
            for name in removed:
                discard(out / name)
            if removed:
                log.warning("overwrite_output_dir=true: deleted the earlier run's %s in %s", ", ".join(removed), out)
        elif resume:
            checkpoint = latest_checkpoint(out)
            if checkpoint is None and _pointer(out) and checkpoint_in(out, _pointer(out)) is None:
                raise CheckpointLoadError(
                    f"resume: {out}/latest names {_pointer(out)!r}, which is not a checkpoint inside {out}, and there "
                    f"is no complete checkpoint inside it to resume from (fastrm never follows `latest` out of "
                    f"output_dir)")
            if checkpoint is None:
                log.info("resume: no checkpoint in %s, starting fresh", out)
        else:
            earlier = earlier_run(out)
            if earlier:
                shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
                raise OutputDirError(
                    f"output_dir {out} holds an earlier run's checkpoints ({shown}): continue that run with --resume, "
                    f"or set overwrite_output_dir=true to delete them and start a new run there, or use another "
                    f"output_dir")
        run_id = None
        if checkpoint is not None:
            run_id = checkpoint_info(checkpoint).run_id
        return lock, checkpoint, run_id or new_run_id()
    except BaseException:
        lock.release()
        raise


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if free < 1000 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1000


def write_checkpoint(out_dir: Path, step: int, model, tokenizer, state: dict, model_state: dict | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically and point ``latest`` at it: everything goes to a temporary folder,
    renamed into place once complete. An OS error (disk full, ...) removes the temporary folder and raises
    :class:`CheckpointWriteError` with one line; ``latest`` and the previous checkpoint are untouched.
    ``model_state``: the weights to write instead of ``model.state_dict()`` (an FSDP model's gathered state)."""
    out = Path(out_dir)
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_state(tmp, state)
        for child in tmp.iterdir():
            if child.is_file():
                fsync(child)
        if final.exists() or final.is_symlink():
            discard(final)  # an earlier write of this step (a run resumed before it)
        os.replace(tmp, final)
        fsync(out)
        point_latest(out, final)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = os_error_reason(err)
        if reason is None:
            raise
        previous = _pointer(out)
        raise CheckpointWriteError(
            f"checkpoint not written: {reason[:1].lower() + reason[1:]} on {out} ({_free_space(out)} free) while "
            f"writing {final.name}; the temporary folder is removed and "
            + (f"the previous checkpoint, {previous}, is intact (`latest` names it)" if previous
               else "no earlier checkpoint exists")) from err
    return final


def prune(out_dir: Path, run_id: str, keep: int):
    """Delete this run's checkpoints beyond the ``keep`` newest, by time of writing (not step number), never the
    one ``latest`` names nor the newest verified one (the last that a finite step ran from), so that a good
    checkpoint survives even with ``keep=1``. Other runs' checkpoints are never touched. ``keep <= 0``: keep all."""
    if keep <= 0:
        return
    mine = [c for c in list_checkpoints(out_dir) if c.run_id == run_id]
    protected = {_pointer(out_dir), next((c.path.name for c in mine if c.verified), None)}
    for old in mine[keep:]:
        if old.path.name not in protected:
            discard(old.path)


def mark_verified(checkpoint: Path, step: int):
    (Path(checkpoint) / VERIFIED_FILE).write_text(f"step {step + 1} ran from this checkpoint with a finite loss and "
                                                   f"gradient\n")


def set_aside_diverged(out_dir: Path, run_id: str, suspect: Path | None) -> Path | None:
    """After training diverged: rename ``suspect`` (a checkpoint the failing step started from, never verified) to
    ``diverged-checkpoint-<step>``, and point ``latest`` at the newest remaining checkpoint of this run. Returns it
    (None if there is none, and ``latest`` is removed)."""
    out = Path(out_dir)
    if suspect is not None and Path(suspect).is_dir():
        aside = out / f"{DIVERGED_PREFIX}{Path(suspect).name}"
        if aside.exists():
            discard(aside)
        os.replace(suspect, aside)
        log.warning("training diverged from %s: set aside as %s", Path(suspect).name, aside.name)
    good = next((c.path for c in list_checkpoints(out) if c.run_id == run_id), None)
    point_latest(out, good)
    return good
