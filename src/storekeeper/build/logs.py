"""Build logs: where they live and how builder output is cut into lines.

Layout (Nix's, so that ``nix-store -l`` and ``nix log`` find our logs and we
find theirs): ``<logDir>/drvs/<first 2 chars of the drv basename>/<rest>``,
with ``.bz2`` appended when ``compress-build-log`` is on (the default).  The
file holds the builder's raw output, every byte, in the order it came.

Lines are what the client sees (``BuildLogLine`` results) and what an error
quotes ("last N log lines"): a line ends at ``\\n``; a ``\\r`` starts the
line over (progress bars), as a terminal would show it.
"""

from __future__ import annotations

import bz2
import os
import re
from collections import deque
from typing import BinaryIO, Callable

from ..fs.atomic import write_file_atomic
from ..store.reserve import naming


def log_path(log_dir: str, drv_base: str, compressed: bool) -> str:
    return os.path.join(log_dir, "drvs", drv_base[:2], drv_base[2:] + (".bz2" if compressed else ""))


def read_build_log(log_dir: str, drv_base: str) -> bytes | None:
    """The log of the last build of ``drv_base`` (either form), or None."""
    for compressed in (True, False):
        try:
            with open(log_path(log_dir, drv_base, compressed), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        return bz2.decompress(data) if compressed else data
    return None


def add_build_log(log_dir: str, drv_base: str, log: bytes) -> bool:
    """Keep ``log`` (bzip2-compressed) as the log of ``drv_base`` unless it has one already
    (as Nix's AddBuildLog: a log is never replaced); written atomically.  True if written."""
    if read_build_log(log_dir, drv_base) is not None:
        return False
    path = log_path(log_dir, drv_base, True)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    write_file_atomic(path, bz2.compress(log), 0o644)
    return True


class LineSplitter:
    """Cuts a byte stream into log lines; ``on_line`` gets each complete one."""

    def __init__(self, on_line: Callable[[bytes], bool | None], tail: int = 10) -> None:
        self.on_line = on_line
        self.tail: deque[bytes] = deque(maxlen=max(tail, 0))
        self._line = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        for piece in _pieces(data):
            if piece == b"\n":
                self._flush()
            elif piece == b"\r":
                self._pos = 0
            else:
                # Overwrite from the cursor, as a terminal does after a CR.
                self._line[self._pos:self._pos + len(piece)] = piece
                self._pos += len(piece)

    def _flush(self) -> None:
        line = bytes(self._line)
        self._line.clear()
        self._pos = 0
        if self.on_line(line) is not False:  # (False: not a log line, e.g. an @nix message)
            self.tail.append(line)

    def finish(self) -> None:
        """The stream ended: a last line without ``\\n`` still counts."""
        if self._line:
            self._flush()


_BREAKS = re.compile(rb"([\r\n])")


def _pieces(data: bytes):
    return (p for p in _BREAKS.split(data) if p)


class BuildLogFile:
    """The log file of one build, written as output arrives (module docstring)."""

    def __init__(self, log_dir: str, drv_base: str, compressed: bool = True) -> None:
        self.path = log_path(log_dir, drv_base, compressed)
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        # A log that another build of the same derivation is writing would be
        # garbled by sharing the file: each build writes a fresh inode and
        # renames it into place when done.
        self._tmp = f"{self.path}.tmp-{os.getpid()}-{id(self):x}"
        self._f: BinaryIO | None = open(self._tmp, "wb")
        self._z = bz2.BZ2Compressor() if compressed else None

    def write(self, data: bytes) -> None:
        if self._f is None:
            return
        with naming(self.path):  # (a full disk: say where, as a write to a file does not)
            self._f.write(self._z.compress(data) if self._z else data)

    def close(self) -> None:
        if self._f is None:
            return
        try:
            with naming(self.path):
                if self._z:
                    self._f.write(self._z.flush())
                os.fchmod(self._f.fileno(), 0o644)
                self._f.close()
            os.replace(self._tmp, self.path)
        finally:
            self._f = None
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
