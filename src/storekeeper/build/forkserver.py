"""The daemon's side of the sandbox launcher's fork server (:mod:`.launcher`).

Invariants:

* **One server per build session** (:class:`LauncherServer`, held by a
  :class:`~storekeeper.build.scheduler.Builder`): started at the session's
  first sandboxed build, stopped when the session ends, so a daemon's
  connection process keeps no child between requests (:mod:`..daemon.workers`
  reuses only processes without one).  A process forked while a server runs
  (``os.register_at_fork``) does not share it: it starts its own.
* **A launched builder is the server's child**, not ours: it is killed and
  reaped only through the server, which never reaps it before we asked for its
  status, so a kill can never reach a recycled pid.  Requests and answers
  alternate (a lock makes them so across threads), so answers need no ids.
"""

from __future__ import annotations

import functools
import marshal
import os
import socket
import subprocess
import threading
import weakref

from ..errors import StoreError
from .confine import python_for_builders

_live: weakref.WeakSet[LauncherServer] = weakref.WeakSet()


def _forget_in_child() -> None:
    for server in list(_live):
        server._drop()


os.register_at_fork(after_in_child=_forget_in_child)


@functools.lru_cache(maxsize=None)
def launcher_source() -> str:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py"),
              encoding="utf-8") as f:
        return f.read()


class LauncherError(StoreError):
    """The fork server cannot be started or did not answer."""


class Launched:
    """A builder started by the server: what :class:`subprocess.Popen` would be."""

    def __init__(self, server: LauncherServer, pid: int) -> None:
        self.server, self.pid = server, pid
        self.returncode: int | None = None
        #: user and system CPU microseconds of the whole sandbox, once reaped
        self.cpu: tuple[int | None, int | None] = (None, None)

    def kill(self) -> None:
        """SIGKILL to its process group (the sandbox's first process and its monitor;
        the kernel kills the rest with PID 1)."""
        if self.returncode is None:
            self.server.kill(self.pid)

    def wait(self) -> int:
        """Its exit code (negative: killed by that signal), once it has exited."""
        if self.returncode is None:
            status, self.cpu = self.server.wait(self.pid)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class LauncherServer:
    """The fork server of one build session (module docstring)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._owner = 0
        self._lock = threading.Lock()

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [python_for_builders(), "-I", "-S", "-c", launcher_source(), str(theirs.fileno())],
                env={}, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, cwd="/", close_fds=True, start_new_session=True)
        except OSError as e:
            ours.close()
            raise LauncherError(f"cannot start the sandbox launcher: {e.strerror}") from None
        finally:
            theirs.close()
        self._sock, self._owner = ours, os.getpid()
        _live.add(self)
        return ours

    def _request(self, msg: tuple, fds: tuple[int, ...] = (), answer: bool = True) -> tuple:
        if self._sock is None or self._owner != os.getpid():
            self._drop()
            self._start()
        assert self._sock is not None
        try:
            socket.send_fds(self._sock, [marshal.dumps(msg)], list(fds))
            if not answer:
                return ()
            data = self._sock.recv(1 << 16)
        except OSError as e:
            self.close()
            raise LauncherError(f"the sandbox launcher failed: {e.strerror}") from None
        if not data:
            self.close()
            raise LauncherError("the sandbox launcher died")
        reply = marshal.loads(data)
        if reply[0] == "error":
            raise LauncherError(f"sandbox launcher: {reply[1]}")
        return reply

    def launch(self, spec_fd: int, log_fd: int) -> Launched:
        """Start a sandboxed builder: the spec in the memfd ``spec_fd``, its stdout
        and stderr ``log_fd`` (both still ours to close)."""
        with self._lock:
            _, pid = self._request(("start",), (spec_fd, log_fd))
        return Launched(self, pid)

    def kill(self, pid: int) -> None:
        with self._lock:
            if self._sock is not None and self._owner == os.getpid():
                try:
                    self._request(("kill", pid), answer=False)
                except LauncherError:
                    pass  # (the server is gone, and its children with it)

    def wait(self, pid: int) -> tuple[int, tuple[int | None, int | None]]:
        """(wait status, CPU microseconds) of ``pid``, once it has exited."""
        with self._lock:
            if self._sock is None or self._owner != os.getpid():
                return 9, (None, None)  # (killed with the server: as by SIGKILL)
            try:
                _, got, status, utime, stime = self._request(("wait", pid))
            except LauncherError:
                # the server died, and with it (PDEATHSIG) the whole sandbox
                return 9, (None, None)
        assert got == pid
        return status, (utime, stime)

    def _drop(self) -> None:
        """Forget a server inherited through ``fork`` (it is our parent's)."""
        if self._owner != os.getpid():
            if self._sock is not None:
                self._sock.close()
            self._sock, self._proc = None, None

    def close(self) -> None:
        """Stop the server (its running builds are killed) and reap it."""
        if self._sock is None or self._owner != os.getpid():
            self._drop()
            return
        self._sock.close()
        self._sock = None
        _live.discard(self)
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
