"""Connection processes kept for the next connection of the same user.

A connection process (forked by the accept loop, :mod:`.server`) that ends a
Unix-socket connection cleanly may serve another one, so that a busy daemon
does not pay a fork, an exit and a cold start per connection (measured in
docs/ARCHITECTURE.md, "The daemon under load").

Invariants:

* **One user per process.**  A worker only ever serves connections whose
  peer has the uid of its first connection: the parent hands a connection
  only to an idle worker of that uid, and the worker checks the peer's
  credentials itself and exits on a mismatch.  Nothing of one user's
  connection is ever in a process that serves another user.
* **Each connection still opens the store afresh** (and closes it, dropping
  its temp roots) and gets a new :class:`Session`; the trust decided by the
  parent comes with the connection.
* **Only a clean process is reused**: the connection ended without an
  exception, no thread, child process or file descriptor of it is left, the
  working directory and umask are those the worker started with, it never
  grew beyond :data:`MAX_RSS_KIB`, and it served fewer than
  :data:`REUSE_MAX` connections.  Otherwise it exits and the next connection
  gets a fresh fork.
* **Only the parent retires a worker** (by closing its end of the control
  socket, after :data:`IDLE_KEEP` seconds idle or when the daemon stops): a
  worker never exits while the parent may be handing it a connection.
* Control socket messages: worker -> parent ``R`` (idle, ready for the next
  connection; the previous one is over and no longer counts towards the
  limits); parent -> worker ``T``/``U`` (trusted or not) with the connection's
  fd (``SCM_RIGHTS``).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import struct
import threading
from typing import Callable

REUSE_MAX = 100        # connections per worker process, then a fresh one
IDLE_KEEP = 5.0        # seconds an idle worker is kept
MAX_IDLE = 16          # idle workers kept at most (all users together)
MAX_RSS_KIB = 256 * 1024  # a worker that ever grew beyond this is not reused


class Worker:
    """The parent's view of a reusable connection process."""

    def __init__(self, pid: int, ctl: socket.socket, uid: int) -> None:
        self.pid, self.ctl, self.uid = pid, ctl, uid
        self.idle_since = 0.0

    def hand(self, conn: socket.socket, trusted: bool) -> bool:
        """Pass ``conn`` to this (idle) worker; False if it is gone."""
        try:
            socket.send_fds(self.ctl, [b"T" if trusted else b"U"], [conn.fileno()])
            return True
        except OSError:
            return False

    def retire(self) -> None:
        """Close our end: an idle worker reads end of file and exits."""
        self.ctl.close()


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _clean(cwd: str, umask: int, fds: int) -> bool:
    if threading.active_count() != 1 or _open_fds() != fds:
        return False
    if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > MAX_RSS_KIB:
        return False  # (a big request grew it: a fresh fork is smaller)
    try:
        os.waitpid(-1, os.WNOHANG)
        return False  # a child of the connection is left (running, or just reaped)
    except ChildProcessError:
        pass
    try:
        if os.getcwd() != cwd:
            return False
    except OSError:
        return False
    return os.umask(umask) == umask


def serve_more(ctl: socket.socket, uid: int, serve: Callable[[socket.socket, bool], None]) -> None:
    """In a worker after its first connection: while clean, tell the parent it is idle
    and serve the connection it hands over (``serve(conn, trusted)``), until the parent
    closes the control socket."""
    cwd = os.getcwd()
    umask = os.umask(0o022)
    os.umask(umask)
    fds = _open_fds()
    served = 1
    while served < REUSE_MAX:
        # (a finished session's handlers must not outlive it: idle, SIGTERM ends us)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if not _clean(cwd, umask, fds):
            return
        try:
            ctl.sendall(b"R")
            msg, passed, _flags, _addr = socket.recv_fds(ctl, 1, 1)
        except OSError:
            return  # (the daemon is stopping)
        if not msg or len(passed) != 1:
            for fd in passed:
                os.close(fd)
            return
        conn = socket.socket(fileno=passed[0])
        with conn:
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", cred)[1] != uid:
                return  # (never: the parent matches users; but never serve another)
            serve(conn, msg == b"T")
        served += 1
