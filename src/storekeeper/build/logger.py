"""Where build progress goes: the :class:`BuildLogger` protocol (the daemon session
implements it), a logger that stays quiet once the client is gone, and the
request-wide activities whose shape is the real daemon's (spec §4).

Invariant: after the first failed logger call (the client went away) nothing
more is passed on, so cleanup after a lost client never fails on logging.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ..formats.wire import ActivityType, ResultType, Verbosity


class BuildLogger(Protocol):
    """Where build progress goes (the daemon session implements this)."""

    def log(self, level: int, message: str) -> None: ...

    def start_activity(self, level: int, act_type: int, text: str,
                       fields: Sequence[int | str] = (), parent: int = 0) -> int: ...

    def stop_activity(self, act_id: int) -> None: ...

    def result(self, act_id: int, result_type: int, fields: Sequence[int | str]) -> None: ...


class NullLogger:
    def __init__(self) -> None:
        self._n = 0

    def log(self, level: int, message: str) -> None:
        pass

    def start_activity(self, level: int, act_type: int, text: str,
                       fields: Sequence[int | str] = (), parent: int = 0) -> int:
        self._n += 1
        return self._n

    def stop_activity(self, act_id: int) -> None:
        pass

    def result(self, act_id: int, result_type: int, fields: Sequence[int | str]) -> None:
        pass


class GuardedLogger:
    """Passes calls on until one fails (the client went away); after that the
    failure has been raised once and everything else is dropped, so that
    cleanup after a lost client never fails on logging."""

    def __init__(self, inner: BuildLogger) -> None:
        self.inner = inner
        self.broken = False

    def _call(self, fn, *args, default=None):
        if self.broken:
            return default
        try:
            return fn(*args)
        except BaseException:
            self.broken = True
            raise

    def log(self, level: int, message: str) -> None:
        self._call(self.inner.log, level, message)

    def start_activity(self, level: int, act_type: int, text: str,
                       fields: Sequence[int | str] = (), parent: int = 0) -> int:
        return self._call(self.inner.start_activity, level, act_type, text, fields, parent, default=0)

    def stop_activity(self, act_id: int) -> None:
        self._call(self.inner.stop_activity, act_id)

    def result(self, act_id: int, result_type: int, fields: Sequence[int | str]) -> None:
        self._call(self.inner.result, act_id, result_type, fields)


class Activities:
    """The activities a build request holds open while it runs (realise, builds,
    copy paths: the shape the real daemon sends, spec §4), and its progress."""

    def __init__(self, logger: BuildLogger) -> None:
        self.logger = logger
        self.ids: dict[str, int] = {}

    def __enter__(self) -> "Activities":
        lg, a = self.logger, self.ids
        a["realise"] = lg.start_activity(Verbosity.ERROR, ActivityType.REALISE, "")
        a["builds"] = lg.start_activity(Verbosity.ERROR, ActivityType.BUILDS, "")
        a["copy"] = lg.start_activity(Verbosity.ERROR, ActivityType.COPY_PATHS, "")
        return self

    def __exit__(self, *exc: object) -> None:
        for name in ("copy", "builds", "realise"):
            self.logger.stop_activity(self.ids.pop(name))

    @property
    def open(self) -> bool:
        return bool(self.ids)

    def progress(self, done: int, expected: int, running: int, failed: int) -> None:
        lg, a = self.logger, self.ids
        lg.result(a["builds"], ResultType.PROGRESS, [done, expected, running, failed])
        lg.result(a["copy"], ResultType.PROGRESS, [0, 0, 0, 0])
        lg.result(a["realise"], ResultType.SET_EXPECTED, [ActivityType.FILE_TRANSFER, 0])
        lg.result(a["realise"], ResultType.SET_EXPECTED, [ActivityType.COPY_PATH, 0])


def format_error(message: str) -> str:
    """An error as Nix's logger prints it: coloured tag, continuation lines indented."""
    return "\x1b[31;1merror:\x1b[0m " + message.replace("\n", "\n       ")
