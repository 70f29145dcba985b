"""Temp roots that tell a running garbage collector about a new root through its
``gc-socket/socket`` (the protocol is in :mod:`.temproots`'s docstring): what the local
store pins with.  Apart from :mod:`.temproots` so that a store opened for queries only
does not import :mod:`socket` (cold start, bench/startup.py).
"""

from __future__ import annotations

import errno
import os
import socket
import time

from .temproots import TempRoots


class NotifyingTempRoots(TempRoots):
    """:class:`TempRoots` that send a root added during a GC to the GC's socket."""

    _gc_sock: socket.socket | None = None

    def _tell_running_gc(self, path: str) -> bool:
        """Send the root to the running GC; False means try the lock again."""
        if self._gc_sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(os.path.join(self.state_dir, "gc-socket", "socket"))
            except OSError as e:
                sock.close()
                if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    # The GC has the lock but no socket yet (or just finished).
                    time.sleep(0.01)
                    return False
                raise
            self._gc_sock = sock
        try:
            self._gc_sock.sendall(path.encode() + b"\n")
            reply = self._gc_sock.recv(1)
        except (BrokenPipeError, ConnectionResetError):
            reply = b""
        if reply != b"1":
            self._gc_sock.close()
            self._gc_sock = None
            return False
        return True

    def _close_gc_socket(self, detach: bool = False) -> None:
        # after a fork the socket is the parent's: let go of it without closing it
        if self._gc_sock is not None:
            if detach:
                self._gc_sock.detach()
            else:
                self._gc_sock.close()
            self._gc_sock = None
