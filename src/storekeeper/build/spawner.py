"""Starting builders from a small confined helper, so that no Python runs between fork and exec.

Why: ``NO_NEW_PRIVS`` and the seccomp filter (:mod:`.confine`) must be set
between fork and exec.  Done by a ``preexec_fn``, Popen forks the whole
connection process (no ``vfork``) and runs Python in the child: ~2 ms per
builder where a ``vfork`` + exec takes ~0.1 ms (measured: 3.0 vs 1.0 ms for
a trivial ``/bin/sh`` builder, start to exit).  With hundreds of small builds
that is a large part of a build request (bench/build.py).  So a build
request forks one helper, which confines *itself* and then starts every
builder with a plain Popen (``vfork``): the confinement is inherited.

Invariants:

* **The spawner holds nothing of its parent's** but its control socket: every
  other inherited fd is closed first thing (it keeps no lock, database or
  client connection alive), its signal handlers are the defaults, the
  garbage collector is off (no object of the parent's stack is ever freed
  there, so no stale fd number is ever closed).  It runs only Popen and
  ``wait4``, and ends with ``os._exit``.
* **It is confined exactly as a builder is** (``NO_NEW_PRIVS`` and the same
  filter) before it starts anything; if that fails, no builder is started
  through it and the caller falls back to the ``preexec_fn``.
* **A builder is reaped only when the scheduler asks** (``wait``, after it
  killed the builder's session), as with a direct child: until then its pid
  is a zombie and cannot be reused, so ``killpg`` by pid is safe.
* **Nothing outlives it**: when its control socket closes it kills the
  session of every builder not yet reaped, reaps them and exits; the
  scheduler reaps the spawner itself (:meth:`Spawner.close`).

Messages (length-prefixed pickles over a Unix stream socket; both ends are
this module in one program): ``("spawn", popen kwargs)`` with the output
pipe's fd attached -> ``("pid", pid)`` or ``("error", errno, text)``;
``("wait", pid)`` -> ``("status", exit code, user µs, system µs)``.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import socket
import struct
import subprocess
from typing import Any, Callable

_LEN = struct.Struct("<Q")


def _send(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(obj)
    head = _LEN.pack(len(data))
    if fds:
        socket.send_fds(sock, [head], fds)
    else:
        sock.sendall(head)
    sock.sendall(data)


def _recv(sock: socket.socket, want_fds: int = 0) -> tuple[Any, list[int]]:
    """One message (EOFError at the end of the stream) and the fds sent with it."""
    fds: list[int] = []
    head = b""
    while len(head) < _LEN.size:
        if want_fds and not head:
            chunk, got, _flags, _addr = socket.recv_fds(sock, _LEN.size, want_fds)
            fds.extend(got)
        else:
            chunk = sock.recv(_LEN.size - len(head))
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise EOFError
        head += chunk
    (n,) = _LEN.unpack(head)
    parts, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError
        parts.append(chunk)
        left -= len(chunk)
    return pickle.loads(b"".join(parts)), fds


class SpawnedBuilder:
    """A builder started by the spawner: what the scheduler needs of a Popen."""

    def __init__(self, spawner: "Spawner", pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._spawner = spawner

    def wait_with_times(self) -> tuple[int, tuple[int | None, int | None]]:
        if self.returncode is not None:
            return self.returncode, (None, None)
        code, utime, stime = self._spawner.wait(self.pid)
        self.returncode = code
        return code, (utime, stime)

    def wait(self) -> int:
        return self.wait_with_times()[0]


class Spawner:
    """The parent's end: started on first use, one per build request (module docstring)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._pid = 0
        self._failed = False

    def start(self, confine_self: Callable[[], None]) -> bool:
        """Fork the spawner (``confine_self`` confines it); False if it cannot be had."""
        if self._sock is not None:
            return True
        if self._failed:
            return False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            self._failed = True
            return False
        if pid == 0:  # the spawner
            code = 1
            try:
                ours.close()
                code = _serve(theirs, confine_self)
            finally:
                os._exit(code)
        theirs.close()
        self._sock, self._pid = ours, pid
        try:
            ok, _ = _recv(ours)  # confined (or not)
        except (EOFError, OSError):
            ok = False
        if not ok:
            self.close()
            self._failed = True
        return bool(ok)

    def spawn(self, out_fd: int, **popen: Any) -> SpawnedBuilder:
        """Start a builder (``Popen(**popen)`` in the spawner, its stdout and stderr
        ``out_fd``); OSError as Popen would raise it."""
        assert self._sock is not None
        _send(self._sock, ("spawn", popen), [out_fd])
        reply, _ = _recv(self._sock)
        if reply[0] == "error":
            raise OSError(reply[1], reply[2])
        return SpawnedBuilder(self, reply[1])

    def wait(self, pid: int) -> tuple[int, int | None, int | None]:
        try:
            assert self._sock is not None
            _send(self._sock, ("wait", pid))
            reply, _ = _recv(self._sock)
            return reply[1], reply[2], reply[3]
        except (EOFError, OSError, AssertionError):
            return -signal.SIGKILL, None, None  # (the spawner died: its builders with it)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._pid:
            pid, self._pid = self._pid, 0
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _serve(sock: socket.socket, confine_self: Callable[[], None]) -> int:
    """The spawner's life (runs in the forked child only)."""
    gc.disable()
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    try:
        confine_self()
    except OSError:
        _send(sock, False)
        return 1
    _send(sock, True)
    children: dict[int, subprocess.Popen] = {}
    try:
        while True:
            try:
                msg, fds = _recv(sock, want_fds=1)
            except (EOFError, OSError):
                return 0
            if msg[0] == "spawn":
                out = fds[0]
                try:
                    p = subprocess.Popen(stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         close_fds=True, start_new_session=True, **msg[1])
                except OSError as e:
                    _send(sock, ("error", e.errno, e.strerror))
                else:
                    children[p.pid] = p
                    _send(sock, ("pid", p.pid))
                finally:
                    os.close(out)
            elif msg[0] == "wait":
                p = children.pop(msg[1])
                try:
                    _, st, ru = os.wait4(p.pid, 0)
                    code = os.waitstatus_to_exitcode(st)
                    p.returncode = code
                    _send(sock, ("status", code, int(ru.ru_utime * 1e6), int(ru.ru_stime * 1e6)))
                except ChildProcessError:
                    _send(sock, ("status", -signal.SIGKILL, None, None))
    finally:
        for pid, p in children.items():
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.waitpid(pid, 0)
                p.returncode = -signal.SIGKILL
            except ChildProcessError:
                pass
