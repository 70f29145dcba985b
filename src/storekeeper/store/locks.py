"""File locks, interoperable with Nix: BSD ``flock(2)`` on whole files, never POSIX record locks.

Per-path locks (``<store path>.lock``) follow Nix's PathLocks protocol:
open/create 0600 → ``flock`` EX → ``fstat``; a non-empty lock file was declared
stale by its previous owner (who unlinked it), so close and retry.  Releasing
"with deletion" unlinks the file, then writes one byte ``d`` into the still-open
fd so that a waiter who opened the old inode sees it is stale.  Several paths
are locked in sorted order, so two lockers never deadlock.

Lock files live in the store dir, where build users may create entries.  A
``<path>.lock`` that is not a regular file (a directory, a symlink, a fifo), or
a regular file owned by a user other than us or root, is a squatter: it is
removed (:func:`storekeeper.fs.remove_tree`, never followed) and a lock file
made afresh.  A non-empty lock file that is still linked under its name was
never declared stale by an owner (who unlinks first): once we hold its lock,
we unlink it and start again.  Both loops are bounded.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from .. import fs
from ..errors import StoreError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Iterable

# How often a lock file may be found squatted or stale in a row before we give up.
_MAX_ATTEMPTS = 64
_SQUATTED = frozenset({errno.EISDIR, errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP})


def open_lock_file(path: str, create: bool = True) -> int:
    """Open (or create, 0600) a lock file in a directory only we write (the state dir)."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    return os.open(path, flags, 0o600)


def open_lock_unless_read_only_fs(path: str, read_only: bool) -> int | None:
    """The lock file for a reader that only looks (``gc --print-dead``, ``verify``), or None
    for a read-only store (``?read-only=true``) on a file system mounted read-only: there
    it cannot be made or locked, and nothing it guards can change."""
    try:
        return open_lock_file(path)
    except OSError as e:
        if read_only and e.errno == errno.EROFS:
            return None
        raise


def open_path_lock(path: str) -> int:
    """Open (or create) ``<store path>.lock`` in the store dir; a squatter there
    (module docstring) is removed first."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CREAT
    euid = os.geteuid()
    for _ in range(_MAX_ATTEMPTS):
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            if e.errno not in _SQUATTED:
                raise
            fs.remove_tree(path)
            continue
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid in (euid, 0):
            return fd
        os.close(fd)
        fs.remove_tree(path)
    raise StoreError(f"cannot create lock file '{path}': something keeps replacing it")


def is_leftover(path: str, fd: int) -> bool:
    """A locked, non-empty lock file still linked as ``path``: no owner declared it
    stale (they unlink first), so it is junk we may unlink while holding its lock."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def open_shared_lock(path: str) -> int:
    """A lock file anyone may ``flock`` (read-only opens suffice): the daemon's user and
    root both change these files."""
    return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


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
            for _ in range(_MAX_ATTEMPTS):
                fd = open_path_lock(lock_path)
                try:
                    if not lock_fd(fd, exclusive=True, wait=wait):
                        os.close(fd)
                        self.release()
                        return False
                    if os.fstat(fd).st_size != 0:
                        # stale: its owner deleted it; take a fresh one (a
                        # leftover still linked here goes first)
                        if is_leftover(lock_path, fd):
                            os.unlink(lock_path)
                        os.close(fd)
                        continue
                except BaseException:
                    os.close(fd)
                    raise
                self._held.append((lock_path, fd))
                break
            else:
                self.release()
                raise StoreError(f"cannot lock '{lock_path}': it keeps being replaced")
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
