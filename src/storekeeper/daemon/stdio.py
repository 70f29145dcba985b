"""``daemon --stdio`` as a relay: stdin/stdout to a running daemon's Unix socket.

Run by ssh as the user who logged in, the relay connects to the daemon as
that user, so the daemon identifies it by ``SO_PEERCRED`` like any local
client: nothing the remote side says is taken for identity.  The relay looks
at no byte; it copies both directions until the daemon hangs up.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from contextlib import suppress

from ..errors import StoreError

_CHUNK = 1 << 16
_SUN_PATH_MAX = 107


def connect_unix(path: str, required: bool) -> socket.socket | None:
    """A connection to the daemon at ``path``; None if nobody listens there (unless
    ``required``, when that is an error too)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            # Too long for sockaddr_un: connect through /proc/self/fd of its directory.
            dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                sock.connect(f"/proc/self/fd/{dfd}/{os.path.basename(path)}")
            finally:
                os.close(dfd)
        else:
            sock.connect(path)
        return sock
    except OSError as e:
        sock.close()
        if not required and e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise StoreError(f"cannot connect to the daemon at '{path}': {e.strerror or e}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay(sock: socket.socket, in_fd: int, out_fd: int) -> None:
    """Copy ``in_fd`` to ``sock`` and ``sock`` to ``out_fd`` until the daemon hangs up
    (the end of ``in_fd`` is passed on as a half-close)."""

    def upstream() -> None:
        try:
            while data := os.read(in_fd, _CHUNK):
                sock.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, name="storekeeper-relay", daemon=True).start()
    try:
        while data := sock.recv(_CHUNK):
            _write_all(out_fd, data)
    except OSError:
        pass
