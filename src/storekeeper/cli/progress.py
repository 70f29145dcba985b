"""Progress on a terminal: one updating line on stderr; nothing when stderr is not a TTY.

``rich`` draws it when installed (the ``progress`` extra); otherwise a plain
carriage-return line does.  Log lines still go through :meth:`Progress.log`
so they never tear the bar.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(self, label: str, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._rich: Any = None
        self._task: Any = None
        self._last = 0.0
        self._lines: list[str] = []
        self._flushed = time.monotonic()
        if self.enabled:
            try:
                from rich.progress import Progress as RichProgress
                self._rich = RichProgress(transient=True)
                self._rich.start()
                self._task = self._rich.add_task(label, total=None)
            except ImportError:
                self._rich = None

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=done, total=total or None)
            return
        now = time.monotonic()
        if done != total and now - self._last < 0.1:
            return
        self._last = now
        self.stream.write(f"\r{self.label}: {done}/{total}\x1b[K")
        self.stream.flush()

    def log(self, message: str) -> None:
        if self._rich is not None:
            self._rich.console.print(message, markup=False, highlight=False)
        elif self.enabled:
            self.stream.write(f"\r\x1b[K{message}\n")
        else:
            # Not a terminal: lines are written in blocks (a GC logs one per
            # deleted path, and a write per line costs more than the unlink),
            # at the latest a tenth of a second after they were logged.
            self._lines.append(message)
            now = time.monotonic()
            if len(self._lines) >= 512 or now - self._flushed >= 0.1:
                self.flush()

    def flush(self) -> None:
        if self._lines:
            self.stream.write("\n".join(self._lines) + "\n")
            self._lines.clear()
            self.stream.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
