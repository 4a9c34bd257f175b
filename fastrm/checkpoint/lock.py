"""One run at a time in an output folder: ``output_dir/fastrm.lock``, taken atomically, refreshed while held,
taken over only from a run that is gone, released at exit."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from fastrm.checkpoint.files import OutputDirError, link_new, os_error_reason, read_json, write_atomic

log = logging.getLogger("fastrm")

LOCK_FILE = "fastrm.lock"


LOCK_HEARTBEAT_S = 60  # the holder touches its lock this often, so a lock from another host that has not


LOCK_STALE_S = 600  # been touched for this long belongs to a run that is gone


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
def folder_flock(folder: Path):
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
        with folder_flock(self.path.parent):
            for _ in range(3):
                holder = read_json(self.path)
                if holder is None and not self.path.exists():
                    if link_new(self.path, json.dumps(record)):
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
                write_atomic(self.path, json.dumps(record))
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
        holder = read_json(self.path)
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
