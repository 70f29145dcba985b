"""Sending a request's payload (a NAR, a framed stream) on a thread while the reply is read,
and spooling a NAR that comes back."""

from __future__ import annotations

import socket
import threading
from typing import Callable, Iterable, Iterator

from ..errors import BadArchive
from ..formats import nar as narfmt
from ..formats.streams import Readable
from ..formats.wire import FramedWriter

_CHUNK = 1 << 16


class _SendFailed(Exception):
    """Writing to the socket failed: the connection is gone (the reader finds out too)."""


class _Upload(threading.Thread):
    """Writes one framed payload while the caller reads the daemon's log channel."""

    def __init__(self, sock: socket.socket, produce: Callable[[Callable[[bytes], object]], None]) -> None:
        super().__init__(name="storekeeper-upload", daemon=True)
        self._sock = sock
        self._produce = produce
        self.error: BaseException | None = None  # the payload source failed

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise _SendFailed(str(e)) from None

    def run(self) -> None:
        framed = FramedWriter(self._send, _CHUNK)
        try:
            self._produce(framed.write)
        except _SendFailed:
            return
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
            self.error = e
            # See the module docstring: drop the connection, never end the frames.
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        try:
            framed.close()
        except _SendFailed:
            pass


class _Tee:
    """A readable stream that hands every byte read through it to ``write`` as well."""

    def __init__(self, stream: Readable, write: Callable[[bytes], object]) -> None:
        self._read = stream.read
        self._write = write

    def read(self, n: int = -1) -> bytes:
        data = self._read(n)
        if data:
            self._write(data)
        return data


def _nar_from(stream: Readable) -> Callable[[Callable[[bytes], object]], None]:
    """A payload of exactly the NAR at the head of ``stream`` (checked on the way)."""
    def produce(write: Callable[[bytes], object]) -> None:
        try:
            narfmt.read_nar(_Tee(stream, write), narfmt.NullSink())
        except narfmt.NarError as e:
            raise BadArchive(str(e)) from None
    return produce


def _rest_of(stream: Readable) -> Callable[[Callable[[bytes], object]], None]:
    def produce(write: Callable[[bytes], object]) -> None:
        while chunk := stream.read(_CHUNK):
            write(chunk)
    return produce


def _chunks(chunks: Iterable[bytes]) -> Callable[[Callable[[bytes], object]], None]:
    def produce(write: Callable[[bytes], object]) -> None:
        for chunk in chunks:
            write(chunk)
    return produce


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            yield chunk



def _read_spool(spool) -> Iterator[bytes]:
    with spool:
        while chunk := spool.read(1 << 20):
            yield chunk
