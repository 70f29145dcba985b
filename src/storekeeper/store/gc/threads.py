"""Threads a collection starts without waiting for them to run.

``threading.Thread.start()`` returns only once the new thread has run: on a
loaded machine that is a scheduling delay of its own (tens of milliseconds at a
load of 10-20 on two cores, measured under ``bench/daemon_load.py``), and a
collection holding ``gc.lock`` used to pay it twice, plus once per client of its
socket.  These threads are started with :func:`_thread.start_new_thread`, which
does not wait.  They are not in ``threading.enumerate()``: whoever starts one
makes sure it ends (:meth:`Task.result`, or a socket it closes), so a daemon's
connection process that checks it has no thread left is not misled for long.
"""

from __future__ import annotations

import _thread
from typing import Any, Callable


def start(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in a new thread, not waiting for it to start; it must not raise."""
    _thread.start_new_thread(fn, args)


class Task:
    """``fn(*args)`` in a thread of its own; :meth:`result` waits for it."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._done = _thread.allocate_lock()
        self._done.acquire()
        self._value: Any = None
        self._error: BaseException | None = None
        _thread.start_new_thread(self._run, (fn, args))

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 -- raised again by result(), in the caller
            self._error = e
        finally:
            self._done.release()

    def result(self) -> Any:
        """Its return value, once it has ended (its exception is raised here)."""
        with self._done:
            pass
        if self._error is not None:
            raise self._error
        return self._value
