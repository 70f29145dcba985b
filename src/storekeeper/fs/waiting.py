"""Waiting for input on fds without ``select()``'s limit.

``select.select`` refuses any fd numbered 1024 or more ("filedescriptor out of
range"): a daemon with many connections, or a process that builds in-process
after opening many files, gets such numbers.  :func:`readable` uses ``poll``,
which has no such limit, and answers like ``select`` for reading: an fd at its
end, hung up or in error counts as readable (the read that follows says which).
"""

from __future__ import annotations

import math
import select

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from typing import Protocol, TypeVar, Union

    class _HasFileno(Protocol):
        def fileno(self) -> int: ...

    W = TypeVar("W", bound=Union[int, _HasFileno])

_EVENTS = select.POLLIN | select.POLLPRI


def readable(waitables: "list[W] | tuple[W, ...]", timeout: float | None) -> list[W]:
    """The members of ``waitables`` (fds or objects with ``fileno()``) ready to be
    read within ``timeout`` seconds (None: no limit); [] on timeout or EINTR."""
    poller = select.poll()
    by_fd: dict[int, W] = {}
    for w in waitables:
        fd = w if isinstance(w, int) else w.fileno()
        by_fd[fd] = w
        poller.register(fd, _EVENTS)
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    try:
        events = poller.poll(ms)
    except InterruptedError:
        return []
    return [by_fd[fd] for fd, _ in events]


__all__ = ["readable"]
