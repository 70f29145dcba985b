"""Temporary GC roots of this process, wire- and disk-compatible with Nix 2.8.

Invariants:

* The process's roots live in ``<state>/temproots/<pid>``: NUL-terminated full
  store paths, append-only, mode 0600, held with ``flock`` EX for the life of
  the process.  A file whose lock can be taken belongs to a dead process.
* A file found non-empty right after we created and locked it was declared
  stale by a GC between our open and our lock: start over.
* A root is added by appending it to the file *first*, then taking
  ``gc.lock`` SH *without blocking*.  If that works no GC is running, and any
  later GC reads the file after taking the lock, so it sees the root.  If it
  fails a GC holds ``gc.lock`` EX and may have read the files before our
  append: the path is sent to its ``gc-socket/socket`` and we wait for the
  ``1`` acknowledgement before going on.  (Appending only after the
  acknowledgement, as Nix 2.8 does, loses the root when that GC ends and the
  next one reads the files in between.)
* After a ``fork`` the child owns nothing: it makes its own file on first use.
* On a full disk the first write frees the reserve (:mod:`.reserve`) and is
  tried again: a GC's pins must not fail before it can free anything.
"""

from __future__ import annotations

import os

from ..errors import StoreError
from .locks import lock_fd, open_lock_file, unlock_fd
from .reserve import with_reserve


class TempRoots:
    """This process's temp roots (see the module docstring).  Telling a running GC
    about a new root needs its socket: :class:`~.gcnotify.NotifyingTempRoots` does, for
    the local store; this base, for a store opened for queries only (which never pins),
    leaves out the socket module (cold start, bench/startup.py)."""

    def __init__(self, state_dir: str, db_dir: str | None = None) -> None:
        self.state_dir = state_dir
        self.db_dir = db_dir or os.path.join(state_dir, "db")
        self._pid = -1
        self._fd: int | None = None
        self._gc_lock_fd: int | None = None
        self._added: set[str] = set()

    @property
    def file_path(self) -> str:
        return os.path.join(self.state_dir, "temproots", str(os.getpid()))

    def _reset_after_fork(self) -> None:
        # Inherited fds belong to the parent's roots; never write or unlock them.
        for fd in (self._fd, self._gc_lock_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._close_gc_socket(detach=True)
        self._fd = self._gc_lock_fd = None
        self._added = set()
        self._pid = os.getpid()

    def _ensure_file(self) -> int:
        if self._pid != os.getpid():
            self._reset_after_fork()
        if self._fd is not None:
            return self._fd
        os.makedirs(os.path.dirname(self.file_path), mode=0o755, exist_ok=True)
        while True:
            try:
                os.unlink(self.file_path)  # a leftover of a dead process with our pid
            except FileNotFoundError:
                pass
            fd = open_lock_file(self.file_path)
            lock_fd(fd, exclusive=True)
            if os.fstat(fd).st_size == 0:
                self._fd = fd
                return fd
            os.close(fd)

    def add(self, path: str) -> None:
        """Make ``path`` (a printed store path) a root of this process until it exits."""
        self.add_all([path])

    def add_all(self, paths: list[str]) -> None:
        """:meth:`add` for many paths, with one append and one ``gc.lock`` check (a
        batch of substituted paths: each syscall of the store's thread there waits for
        the GIL held by the unpacking workers)."""
        fd = with_reserve(self.db_dir, self._ensure_file)
        new = [p for p in dict.fromkeys(paths) if p not in self._added]
        if not new:
            return
        if self._gc_lock_fd is None:
            self._gc_lock_fd = open_lock_file(os.path.join(self.state_dir, "gc.lock"))
        record = b"".join(p.encode() + b"\0" for p in new)
        try:
            with_reserve(self.db_dir, lambda: _write_all(fd, record))
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.file_path) from None
        untold = 0  # new[untold:] are not yet acknowledged by a running GC
        while untold < len(new):
            if lock_fd(self._gc_lock_fd, exclusive=False, wait=False):
                unlock_fd(self._gc_lock_fd)
                break
            while untold < len(new) and self._tell_running_gc(new[untold]):
                untold += 1
        self._added.update(new)

    def _tell_running_gc(self, path: str) -> bool:
        """Send the root to the running GC; False means try the lock again.  Here (a
        store opened for queries only, which never pins) there is no way to: the
        local store's :class:`~.gcnotify.NotifyingTempRoots` talks to the GC's socket."""
        raise StoreError(f"cannot pin '{path}' while a garbage collection runs: "
                         f"this store was opened for queries only")

    def _close_gc_socket(self, detach: bool = False) -> None:
        """(No socket here: see :class:`~.gcnotify.NotifyingTempRoots`.)"""

    def close(self) -> None:
        """Drop all roots of this process (the file is unlinked)."""
        if self._pid != os.getpid():
            self._reset_after_fork()
            return
        self._close_gc_socket()
        if self._gc_lock_fd is not None:
            os.close(self._gc_lock_fd)
            self._gc_lock_fd = None
        if self._fd is not None:
            try:
                os.unlink(self.file_path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        self._added = set()


def _write_all(fd: int, data: bytes) -> None:
    # a short append (a full disk mid-write) would leave a torn record: cut it off again
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError:
        os.ftruncate(fd, start)
        raise
