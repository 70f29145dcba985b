"""Replacing one name by a link to the pool, the two steps the worker's per-file loop
leaves to this module: the rename into a directory (made writable only if refused,
put back to canonical mode and mtime after, journalled first so that a kill half-way
is undone) and the byte comparison of a file with a pool entry on the two inodes that
were checked (the invariants are the package docstring's)."""

from __future__ import annotations

import errno
import os
import stat

from ...fs import clear_immutable, open_noatime
from ...fs.crash import crash_point
from .hashing import _CHUNK, _MTIME_NS, _O_READ
from .journal import Journal


class _DirState:
    """A directory whose entries are being replaced: made writable only if a rename
    is refused, and put back to canonical mode and mtime afterwards."""

    def __init__(self, dfd: int, path: str, is_store_dir: bool, journal: Journal) -> None:
        self.dfd = dfd
        self.path = path  # absolute (the walk's name for it, no readlink of the fd)
        self.is_store_dir = is_store_dir  # the store dir's own metadata is not ours to touch
        self.journal = journal
        self.touched = False
        self.chmodded = False

    def rename(self, tmp: str, sfd: int, name: str) -> bool:
        """rename; False if the temp link vanished (swept by a GC)."""
        if not self.touched and not self.is_store_dir:
            self.journal.note(self.path)  # (a kill before restore() is undone from here)
        for attempt in range(3):
            try:
                os.rename(tmp, name, src_dir_fd=sfd, dst_dir_fd=self.dfd)
                self.touched = True
                return True
            except FileNotFoundError:
                return False
            except PermissionError as e:
                if attempt == 2 or self.is_store_dir:
                    raise
                if e.errno == errno.EACCES:
                    # not root (or no CAP_DAC_OVERRIDE): u+w for the rename only
                    os.fchmod(self.dfd, 0o755)
                    self.chmodded = True
                    self.touched = True
                elif not (clear_immutable(name, self.dfd) | clear_immutable(".", self.dfd)
                          | clear_immutable(tmp, sfd)):
                    raise
        return False  # pragma: no cover

    def restore(self) -> None:
        if self.is_store_dir or not self.touched:
            return
        if self.chmodded:
            os.fchmod(self.dfd, 0o555)
        os.utime(self.dfd, ns=(os.fstat(self.dfd).st_atime_ns, _MTIME_NS))
        crash_point("optimise.restored")


def _equal(name: str, dfd: int, st: os.stat_result, h: str, lfd: int, pst: os.stat_result) -> bool:
    if stat.S_ISLNK(st.st_mode):
        try:
            return os.readlink(name, dir_fd=dfd) == os.readlink(h, dir_fd=lfd)
        except OSError:
            return False
    try:
        a = open_noatime(name, _O_READ, dfd)
    except OSError:
        return False
    try:
        try:
            b = open_noatime(h, _O_READ, lfd)
        except OSError:
            return False
        try:
            if os.fstat(a).st_ino != st.st_ino or os.fstat(b).st_ino != pst.st_ino:
                return False
            left = st.st_size
            while left:
                n = min(left, _CHUNK)
                x, y = _read_n(a, n), _read_n(b, n)
                if x != y or len(x) != n:
                    return False
                left -= n
            return not os.read(a, 1) and not os.read(b, 1)
        finally:
            os.close(b)
    finally:
        os.close(a)


def _read_n(fd: int, n: int) -> bytes:
    data = os.read(fd, n)
    while len(data) < n:
        more = os.read(fd, n - len(data))
        if not more:
            break
        data += more
    return data
