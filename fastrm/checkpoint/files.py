"""Files of the output folder that are complete or absent: atomic writes and renames, deletion by renaming first,
and the errors of the folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from fastrm.config import ConfigError

TMP_PREFIX = ".tmp-"


TRASH_PREFIX = ".trash-"


class OutputDirError(ConfigError):
    """The output folder cannot be used as asked (in use by another run, or holding an earlier run's checkpoints).
    Nothing in it was changed."""


class CheckpointLoadError(ConfigError):
    """A checkpoint that fastrm will not load: a pickle that needs more than tensors, a ``latest`` outside the folder."""


class CheckpointWriteError(RuntimeError):
    """An OS error (no space left, permissions, ...) while writing a checkpoint: the temporary folder is removed and
    the previous checkpoint is intact."""


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def fsync(path: Path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def link_new(path: Path, text: str) -> bool:
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


def write_atomic(path: Path, text: str):
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


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
