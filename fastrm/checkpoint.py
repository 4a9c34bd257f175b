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

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrm.config import ConfigError

log = logging.getLogger("fastrm")

CHECKPOINT_PREFIX = "checkpoint-"
DIVERGED_PREFIX = "diverged-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LATEST_FILE = "latest"
LOCK_FILE = "fastrm.lock"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"  # pickled state of fastrm before the JSON format; loaded weights_only
VERIFIED_FILE = "verified"
STATE_FORMAT = 1
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
# What a run writes besides its checkpoints: overwrite_output_dir=true deletes these with them.
RUN_OUTPUTS = (LATEST_FILE, "config.yaml", "metrics.jsonl", "tensorboard", "final")
LOCK_HEARTBEAT_S = 60  # the holder touches its lock this often, so a lock from another host that has not
LOCK_STALE_S = 600  # been touched for this long belongs to a run that is gone

_CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d+)")


class OutputDirError(ConfigError):
    """The output folder cannot be used as asked (in use by another run, or holding an earlier run's checkpoints).
    Nothing in it was changed."""


class CheckpointLoadError(ConfigError):
    """A checkpoint that fastrm will not load: a pickle that needs more than tensors, a ``latest`` outside the folder."""


class CheckpointWriteError(RuntimeError):
    """An OS error (no space left, permissions, ...) while writing a checkpoint: the temporary folder is removed and
    the previous checkpoint is intact."""


# ---- the lock ---------------------------------------------------------------------------------------------------

def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``): a later process given the same pid has another."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return start is None or _process_start(pid) in (None, start)


@contextlib.contextmanager
def _folder_flock(folder: Path):
    """Exclusive ``flock`` on the folder while its lock is examined or taken over and leftovers are removed. Best
    effort: where flock is missing or refused (some network file systems), the atomic link alone decides."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


_HELD: dict[str, OutputLock] = {}  # the locks this process holds, released at exit


class OutputLock:
    """``output_dir/fastrm.lock``: JSON with the holder's pid, host and process start time, created atomically
    (written beside it and hard-linked into place, which fails if it exists, on local disks and NFS alike).

    Taken over only when stale: its pid on this host is no longer running, or, from another host, it has not been
    touched for ``LOCK_STALE_S`` (the holder touches it every ``LOCK_HEARTBEAT_S`` from a daemon thread). A lock
    of this very process (a second trainer in one Python session) is taken over silently."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()

    def acquire(self):
        try:
            self._acquire()
        except OSError as err:
            raise OutputDirError(f"output_dir {self.path.parent}: cannot write its lock file: "
                                 f"{os_error_reason(err)}") from err
        _HELD[self.token] = self
        threading.Thread(target=self._heartbeat, daemon=True, name="fastrm-lock").start()
        return self

    def _acquire(self):
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300],
                  "token": self.token}
        with _folder_flock(self.path.parent):
            for _ in range(3):
                holder = _read_json(self.path)
                if holder is None and not self.path.exists():
                    if _link_new(self.path, json.dumps(record)):
                        break
                    continue  # another run created it between the look and the link: look again
                stale = _stale_reason(holder, self.path)
                if stale is None:
                    raise OutputDirError(
                        f"output_dir {self.path.parent} is in use by pid {holder['pid']} on {holder['host']} "
                        f"(since {holder.get('since', '?')}: {holder.get('command', '?')}); wait for that run to end "
                        f"or use another output_dir. If it is gone, delete {self.path}")
                if stale:
                    log.warning("output_dir %s: taking over the lock of %s", self.path.parent, stale)
                _write_atomic(self.path, json.dumps(record))
                break
            else:
                raise OutputDirError(f"output_dir {self.path.parent}: could not take {self.path} (contended)")

    def _heartbeat(self):
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self):
        """Delete the lock if it is still this one (a later trainer of the same process may have taken it)."""
        self._stop.set()
        if _HELD.pop(self.token, None) is None:
            return
        holder = _read_json(self.path)
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()


def _stale_reason(holder: dict | None, path: Path) -> str | None:
    """Why the lock ``holder`` no longer guards a run ('' for one of this process), or None while it does."""
    if holder is None or not isinstance(holder.get("pid"), int):
        return f"unreadable lock file {path}"
    if holder.get("host") == socket.gethostname():
        if holder["pid"] == os.getpid():
            return ""
        if not _running(holder["pid"], holder.get("start")):
            return f"pid {holder['pid']}, which is no longer running"
        return None
    with contextlib.suppress(OSError):
        age = time.time() - path.stat().st_mtime
        if age > LOCK_STALE_S:
            return f"pid {holder['pid']} on {holder.get('host')}, not refreshed for {age:.0f} s"
    return None


def release_locks():
    """Release every lock this process holds (at exit; torchrun workers end with ``os._exit``, so they call it)."""
    for lock in list(_HELD.values()):
        lock.release()


atexit.register(release_locks)


# ---- small file operations ---------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _fsync(path: Path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_new(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` atomically; False if it exists."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _write_atomic(path: Path, text: str):
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def discard(path: Path):
    """Delete a file or folder so that no kill leaves it half-deleted under its name: renamed to ``.trash-...``
    first, then removed (a symlink is removed, never followed)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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


# ---- finding checkpoints -----------------------------------------------------------------------------------------

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
        meta = _read_json(path / STATE_JSON)
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
    _write_atomic(out / LATEST_FILE, Path(checkpoint).name + "\n")


# ---- opening the output folder -----------------------------------------------------------------------------------

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
        with _folder_flock(out):  # a run being refused may be writing its .tmp- lock file
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


# ---- the trainer state: safetensors + JSON -----------------------------------------------------------------------

def _encode(obj, tensors: dict, storages: set, path: str):
    """JSON-able form of ``obj``; tensors go to ``tensors`` and are referenced by key. Tuples and non-string keys
    are tagged so that the state round-trips exactly (``random.setstate`` needs its tuples)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        storage = t.untyped_storage()
        whole = t.is_contiguous() and storage.nbytes() == t.numel() * t.element_size()
        if storage.data_ptr() in storages or not whole:
            t = t.clone()  # safetensors stores whole, unshared storages
        storages.add(t.untyped_storage().data_ptr())
        key = path
        while key in tensors:
            key += "'"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, storages, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, storages, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, storages, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, storages, f"{path}/key{i}"),
                               _encode(v, tensors, storages, f"{path}/{i}")] for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"trainer state: cannot store a {type(obj).__name__} (at {path or '/'}) without pickle; "
                    f"convert it to tensors, numbers, strings, lists or dicts")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, value), = obj.items()
            if tag == "__tensor__":
                return tensors[value]
            if tag == "__tuple__":
                return tuple(_decode(v, tensors) for v in value)
            if tag == "__items__":
                return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def write_state(folder: Path, state: dict):
    """``state`` as ``trainer_state.json`` (everything but tensors) + ``trainer_state.safetensors``."""
    from safetensors.torch import save_file

    tensors: dict = {}
    encoded = _encode(state, tensors, set(), "")
    save_file(tensors, str(Path(folder) / STATE_TENSORS))
    with open(Path(folder) / STATE_JSON, "w") as f:
        json.dump(encoded, f)


def read_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    with open(Path(folder) / STATE_JSON) as f:
        encoded = json.load(f)
    return _decode(encoded, load_file(str(Path(folder) / STATE_TENSORS)))


def load_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer state, read without executing anything: the JSON + safetensors format, or an older
    fastrm's ``trainer_state.pt`` through ``torch.load(weights_only=True)`` (tensors, numbers and fastrm's own config
    dataclasses only). ``state["config"]`` is a plain dict in both cases."""
    checkpoint = Path(checkpoint)
    if (checkpoint / STATE_JSON).is_file():
        return read_state(checkpoint)
    legacy = checkpoint / LEGACY_STATE
    if not legacy.is_file():
        raise CheckpointLoadError(f"{checkpoint} holds no trainer state ({STATE_JSON})")
    from dataclasses import asdict, is_dataclass

    from fastrm.models import ModelConfig
    from fastrm.trainers.reward import RewardConfig
    from fastrm.trainers.rl import RLConfig
    from fastrm.trainers.sft import SFTConfig

    allowed = [ModelConfig, RewardConfig, SFTConfig, RLConfig]
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(allowed):
                state = torch.load(legacy, map_location="cpu", weights_only=True)
        else:  # torch < 2.5
            torch.serialization.add_safe_globals(allowed)
            state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unpickling failure means the same thing here)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointLoadError(
            f"{legacy}: refusing to load this pickled trainer state: it holds more than tensors, numbers and "
            f"fastrm's configs (torch.load(weights_only=True) says: {first}). fastrm never runs code from an output "
            f"folder; a state written by fastrm loads this way") from None
    if is_dataclass(state.get("config")):
        state["config"] = asdict(state["config"])
    return state


def saved_settings(checkpoint: Path) -> dict:
    """``{"config": the settings the checkpoint was written with, "world_size": its number of processes or None}``,
    without reading its tensors."""
    path = Path(checkpoint) / STATE_JSON
    if path.is_file():
        raw = _read_json(path) or {}
        return {"config": _decode(raw.get("config") or {}, {}), "world_size": raw.get("world_size")}
    return {"config": load_trainer_state(checkpoint).get("config") or {}, "world_size": None}


# ---- writing and pruning -----------------------------------------------------------------------------------------

def os_error_reason(err: BaseException) -> str | None:
    """The OS's words for ``err`` or its causes ("No space left on device"): from an ``OSError`` or from a library
    that reports it in its message (safetensors: "... (os error 28)"); None if the OS did not fail."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return os.strerror(err.errno) if err.errno else (str(err) or type(err).__name__)
        match = re.search(r"os error (\d+)", str(err))
        if match:
            return os.strerror(int(match.group(1)))
        err = err.__cause__ or err.__context__
    return None


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
                _fsync(child)
        if final.exists() or final.is_symlink():
            discard(final)  # an earlier write of this step (a run resumed before it)
        os.replace(tmp, final)
        _fsync(out)
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
