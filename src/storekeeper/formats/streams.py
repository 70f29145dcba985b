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
