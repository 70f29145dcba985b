"""Errors from a daemon, and their kinds (the protocol carries the message only)."""

from __future__ import annotations

import re
from typing import Iterable

from ..errors import InvalidPath, PathInUse, Refused, StoreError

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class DaemonError(StoreError):
    """The daemon answered an operation with ``STDERR_ERROR``; the message is the daemon's
    (colour codes removed), ``traces`` its error traces."""

    def __init__(self, message: str, traces: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.traces = list(traces)


class ConnectionLost(DaemonError):
    """The connection to the daemon failed or fell out of step; it is closed."""


class DaemonInvalidPath(DaemonError, InvalidPath):
    pass


class DaemonPathInUse(DaemonError, PathInUse):
    pass


class DaemonRefused(DaemonError, Refused):
    pass


# The protocol carries an error's message, not its kind: the kinds that matter to a
# caller (and to the CLI's exit code) are told by the messages both daemons use.
_KINDS: list[tuple[re.Pattern[str], type[DaemonError]]] = [
    (re.compile(r"^path '[^']*' is not valid"), DaemonInvalidPath),
    (re.compile(r"since it is still alive|is in use"), DaemonPathInUse),
    (re.compile(r"not allowed to|is read-only|lacks a valid signature|not trusted|refus"),
     DaemonRefused),
]


def daemon_error(message: str, traces: Iterable[str] = ()) -> DaemonError:
    """The :class:`DaemonError` (of the kind its message tells) for a daemon's error."""
    for pattern, cls in _KINDS:
        if pattern.search(message):
            return cls(message, traces)
    return DaemonError(message, traces)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)
