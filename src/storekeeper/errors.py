"""Every error storekeeper raises on purpose, and the exit code the CLI gives it.

The CLI prints any of them as one line (``error: …``) and exits with the class's
``exit_code``:

===  =============  ==========================================================
  1  StorekeeperError  an operation failed (the message says why)
  2  UsageError     bad arguments or store URL
  3  NotFound       a path that should be valid is not
  4  Refused        not allowed: read-only store, untrusted client, a peer's refusal
  5  Conflict       in use: a live path, a held lock
 65  FormatError    input that is not in a Nix format (also a bad NAR / archive)
 74  (OSError)      the file system or the network failed
===  =============  ==========================================================

``FormatError`` lives in :mod:`storekeeper.formats.errors` (the format layer
imports nothing above it); it is re-exported here.
"""

from __future__ import annotations

from .formats.errors import FormatError

__all__ = [
    "BadArchive", "Conflict", "DatabaseError", "FormatError", "InvalidPath", "NotFound", "PathInUse",
    "ReadOnlyStore", "Refused", "StoreError", "StorekeeperError", "UsageError", "EXIT_IO",
]

#: exit code for an OSError (sysexits EX_IOERR)
EXIT_IO = 74


class StorekeeperError(Exception):
    """Root of storekeeper's errors; the message names the path or setting at fault."""

    exit_code = 1


class UsageError(StorekeeperError):
    exit_code = 2


class NotFound(StorekeeperError):
    exit_code = 3


class Refused(StorekeeperError):
    exit_code = 4


class Conflict(StorekeeperError):
    exit_code = 5


class StoreError(StorekeeperError):
    """A store operation failed."""


class InvalidPath(StoreError, NotFound):
    """A path was expected to be valid in the store and is not."""


class ReadOnlyStore(StoreError, Refused):
    """A write was attempted on a store that is read-only."""


class BadArchive(StoreError):
    """An incoming NAR or its metadata did not check out; nothing was registered."""

    exit_code = FormatError.exit_code


class PathInUse(StoreError, Conflict):
    """A path is alive or in use and may not be deleted."""


class DatabaseError(StoreError):
    """SQLite failed on the store's database; the message names the database file.

    ``sqlite_errorname`` is SQLite's name for the failure (``SQLITE_FULL``,
    ``SQLITE_BUSY``, ``SQLITE_CORRUPT`` …); the exit code follows it: the file
    system (full, I/O error, read-only) 74, busy or locked 5, anything else 1."""

    def __init__(self, message: str, sqlite_errorname: str = "") -> None:
        super().__init__(message)
        self.sqlite_errorname = sqlite_errorname
        if sqlite_errorname.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY",
                                        "SQLITE_CANTOPEN")):
            self.exit_code = EXIT_IO
        elif sqlite_errorname.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            self.exit_code = Conflict.exit_code
