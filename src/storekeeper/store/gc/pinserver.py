"""The GC's end of ``gc-socket/socket`` (invariant 1 of :mod:`.collector`): while a GC
holds ``gc.lock``, a process that pins a path sends it here and waits for the
acknowledgement.

Invariants:

* A pin is acknowledged only once its hash part is in :attr:`PinServer._temp_hashes`;
  one of the batch being deleted (``_pending``) waits until that batch is done (the
  client then finds the path invalid and re-creates it).
* Every client connection is shut down before the server stops (and so before
  ``gc.lock`` is released): no client gets an acknowledgement from a GC that has
  finished.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Callable

from ...formats.storepath import StoreDir, StorePathError
from ...fs.waiting import readable
from . import threads
from .threads import Task


class PinServer:
    """The gc-socket server of one GC run; the shared state (``_cond`` guarding
    ``_temp_hashes`` and ``_pending``) is the collector's too."""

    def __init__(self, store_dir: StoreDir, state_dir: str, log: Callable[[str], None]) -> None:
        self.store_dir = store_dir
        self.state_dir = state_dir
        self.log = log
        self._cond = threading.Condition()
        self._temp_hashes: set[str] = set()
        self._pending: set[str] = set()
        self._server: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._stop = threading.Event()

    def _start_server(self) -> None:
        d = os.path.join(self.state_dir, "gc-socket")
        os.makedirs(d, mode=0o755, exist_ok=True)
        path = os.path.join(d, "socket")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            srv.bind(path)
        except OSError as e:
            srv.close()
            raise OSError(e.errno, e.strerror, path) from None
        os.chmod(path, 0o666)
        srv.listen(64)
        srv.setblocking(False)
        self._server = srv
        self._wake = os.pipe2(os.O_CLOEXEC)
        self._accepting = Task(self._accept_loop, srv, self._wake[0])

    def _accept_loop(self, srv: socket.socket, wake: int) -> None:
        while True:
            if wake in readable([srv.fileno(), wake], None):
                return  # (_stop_server)
            try:
                conn, _ = srv.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            with self._cond:
                if self._stop.is_set():
                    conn.close()
                    return
                self._clients.add(conn)
            threads.start(self._serve_client, conn)

    def _serve_client(self, conn: socket.socket) -> None:
        sd = self.store_dir
        buf = b""
        with conn:
            conn.settimeout(None)
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        h = sd.parse(line.decode(), lax=True).hash_part
                    except (StorePathError, UnicodeDecodeError):
                        self.log("received garbage instead of a root from client")
                        h = None
                    if h is not None:
                        with self._cond:
                            self._temp_hashes.add(h)
                            while h in self._pending:
                                self._cond.wait()
                    try:
                        conn.sendall(b"1")
                    except OSError:
                        return

    def _stop_server(self) -> None:
        # Every client connection is shut down before gc.lock is released: a
        # client must never get an acknowledgement from a GC that has finished
        # (it would skip telling the next one).  It sees EOF and reconnects.
        with self._cond:
            self._stop.set()
            clients, self._clients = self._clients, set()
        if self._server is not None:
            os.write(self._wake[1], b"x")
            self._accepting.result()
            self._server.close()
            for fd in self._wake:
                os.close(fd)
        for conn in clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
