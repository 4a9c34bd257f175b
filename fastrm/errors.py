"""User errors: a mistake in what the user gave fastrm, as opposed to a bug in fastrm.

Raise a :class:`UserError` subclass for anything the user can fix by changing a setting, a path or a data row;
the ``fastrm`` command prints its message alone (no traceback; ``fastrm --debug ...`` or ``FASTRM_DEBUG=1``
shows one) and exits with :data:`EXIT_USER_ERROR`. Anything else escaping a command is a bug: it keeps its
traceback and exits with 1.

Exit codes of ``fastrm``: 0 done; 1 a bug (traceback); 2 a user error, nothing trained (:data:`EXIT_USER_ERROR`);
3 training diverged (:data:`EXIT_NON_FINITE`, :class:`fastrm.guard.NonFiniteLossError`); 4 a checkpoint could
not be written (:data:`EXIT_CHECKPOINT_WRITE`, :class:`fastrm.checkpoint.CheckpointWriteError`); 130 interrupted.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_CHECKPOINT_WRITE = 4
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Something the user gave fastrm is wrong; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A setting has a wrong name, type or value, or names a path that is not usable."""


class DataError(UserError, ValueError):
    """A data file or row is malformed or missing; the message names the file and row."""
