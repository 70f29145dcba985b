"""File locks, interoperable with Nix: BSD ``flock(2)`` on whole files, never POSIX record locks.

Per-path locks (``<store path>.lock``) follow Nix's PathLocks protocol:
open/create 0600 → ``flock`` EX → ``fstat``; a non-empty lock file was declared
stale by its previous owner (who unlinked it), so close and retry.  Releasing
"with deletion" unlinks the file, then writes one byte ``d`` into the still-open
fd so that a waiter who opened the old inode sees it is stale.  Several paths
are locked in sorted order, so two lockers never deadlock.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Iterable


def open_lock_file(path: str, create: bool = True) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    return os.open(path, flags, 0o600)


def lock_fd(fd: int, exclusive: bool = True, wait: bool = True) -> bool:
    """flock the fd; with ``wait=False`` return False instead of blocking."""
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    if not wait:
        op |= fcntl.LOCK_NB
    while True:
        try:
            fcntl.flock(fd, op)
            return True
        except InterruptedError:
            continue
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise


def unlock_fd(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


class PathLocks:
    """Exclusive locks on a set of ``<path>.lock`` files (see module docstring)."""

    def __init__(self) -> None:
        self._held: list[tuple[str, int]] = []
        self.delete_on_release = False

    def lock(self, paths: Iterable[str], wait: bool = True) -> bool:
        for path in sorted(set(paths)):
            lock_path = path + ".lock"
            while True:
                fd = open_lock_file(lock_path)
                try:
                    if not lock_fd(fd, exclusive=True, wait=wait):
                        os.close(fd)
                        self.release()
                        return False
                    if os.fstat(fd).st_size != 0:
                        os.close(fd)  # stale: its owner deleted it; take a fresh one
                        continue
                except BaseException:
                    os.close(fd)
                    raise
                self._held.append((lock_path, fd))
                break
        return True

    def release(self) -> None:
        held, self._held = self._held, []
        for lock_path, fd in held:
            try:
                if self.delete_on_release:
                    try:
                        os.unlink(lock_path)
                    except FileNotFoundError:
                        pass
                    os.write(fd, b"d")
            finally:
                os.close(fd)

    def __enter__(self) -> "PathLocks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
