"""The one thing the streaming readers in this package need from a stream."""

from __future__ import annotations

from typing import Protocol


class Readable(Protocol):
    """Anything with ``read(n)`` returning at most ``n`` bytes (b"" at end of stream):
    a binary file, a socket's ``makefile("rb")``, :class:`~.wire.FramedReader`,
    :class:`~.nar.HashingReader`.  Short reads are fine."""

    def read(self, n: int, /) -> bytes: ...


class SelfChecking:
    """A stream that checks its own bytes against a NarHash and NarSize (a binary
    cache's decoded NAR): by its last byte, or by :meth:`finish`, it raises unless they
    match.  Only streams of this class (nominal, never duck-typed: a client's stream
    must not claim it) spare a store the second hash of every byte."""

    @property
    def checks(self) -> tuple[object, int]:
        """(NarHash, NarSize) that this stream verifies."""
        raise NotImplementedError

    def finish(self) -> None:
        """Read to the end and check; raises if the bytes were not that NAR."""
        raise NotImplementedError


class ReadAhead:
    """Reads ``stream`` ahead in big chunks and serves small reads from memory, counting
    the bytes it hands out (``size``).  For the NAR parser's many small token reads, one
    Python call each instead of one per stream layer (a cache's NAR is decompressed,
    hashed and counted by three).  It reads past what it hands out, so only for a
    stream that holds nothing else (a :class:`SelfChecking` one: the NAR and its end)."""

    __slots__ = ("_read", "_buf", "_pos", "size", "chunk")

    def __init__(self, stream: Readable, chunk: int = 1 << 16) -> None:
        self._read = stream.read
        self._buf = b""
        self._pos = 0
        self.size = 0
        self.chunk = chunk

    def read(self, n: int, /) -> bytes:
        buf, pos = self._buf, self._pos
        end = pos + n
        if end <= len(buf):  # (the common case: a token inside the buffer)
            self._pos = end
            self.size += n
            return buf[pos:end]
        if pos < len(buf):  # what is left; the caller reads again for the rest
            self._pos = len(buf)
            self.size += len(buf) - pos
            return buf[pos:]
        if n >= self.chunk:  # file contents: straight through, no copy into the buffer
            data = self._read(n)
            self.size += len(data)
            return data
        buf = self._buf = self._read(self.chunk)
        n = min(n, len(buf))
        self._pos = n
        self.size += n
        return buf[:n]
