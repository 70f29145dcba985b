"""The one thing the streaming readers in this package need from a stream."""

from __future__ import annotations

from typing import Protocol


class Readable(Protocol):
    """Anything with ``read(n)`` returning at most ``n`` bytes (b"" at end of stream):
    a binary file, a socket's ``makefile("rb")``, :class:`~.wire.FramedReader`,
    :class:`~.nar.HashingReader`.  Short reads are fine."""

    def read(self, n: int, /) -> bytes: ...
