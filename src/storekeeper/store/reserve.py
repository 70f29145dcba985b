"""The reserved space ``<state>/db/reserved``: what lets a GC run on a full disk.

Invariants (Nix 2.8 keeps the same file; setting ``gc-reserved-space``, 8 MiB):

* The file is (re)made, mode 0600, whenever a writable store is opened and it is
  missing or not of the reserved size, but only while the file system has room
  for it and as much again: making it must never be what fills the disk.
* A deleting GC removes it before its first write (Nix does the same), and makes
  it again when it is done.
* Any other first write in the state dir that fails for lack of space (opening
  the database, a temp-roots file, a lease, the gc-socket) gives up one
  :data:`STEP` of the reserve and is tried once more: on a full disk that gets
  the store open long enough to collect, while the rest stays for the GC
  itself.  An add on a full disk still fails unless its content fits in that
  one step (a path of a few bytes may).  A write that fails again fails as
  usual.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import TypeVar
    T = TypeVar("T")

RESERVED_NAME = "reserved"
DEFAULT_SIZE = 8 * 2**20
#: what one write short of space may take from the reserve
STEP = 2**20

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def reserve_path(db_dir: str) -> str:
    return os.path.join(db_dir, RESERVED_NAME)


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def ensure_reserve(db_dir: str, size: int = DEFAULT_SIZE) -> None:
    """Make the reserve if it is missing or short (see the invariants); never fails."""
    if size <= 0:
        return
    path = reserve_path(db_dir)
    try:
        try:
            if os.stat(path).st_size == size:
                return
        except FileNotFoundError:
            pass
        if free_bytes(db_dir) < 2 * size:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, 0)
                os.write(fd, b"X" * size)  # (a file system without fallocate: tmpfs has it)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except OSError:
        pass  # as Nix: no reserve is no reason to refuse the store


def release_reserve(db_dir: str) -> bool:
    """Delete the reserve; True if there was one."""
    try:
        os.unlink(reserve_path(db_dir))
        return True
    except FileNotFoundError:
        return False


def shrink_reserve(db_dir: str, step: int = STEP) -> bool:
    """Give up ``step`` bytes of the reserve; False if there were none left."""
    try:
        fd = os.open(reserve_path(db_dir), os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return False
        os.ftruncate(fd, max(0, size - step))
        return True
    finally:
        os.close(fd)


def is_out_of_space(e: BaseException, where: str) -> bool:
    """``e`` (an OSError or an sqlite3 error) means the file system of ``where`` is full.

    SQLite reports a full disk while it sizes its shared-memory file as an I/O
    error (SQLITE_IOERR_SHMSIZE and friends): such an error counts when ``where``
    has less than a page free."""
    if isinstance(e, OSError):
        return e.errno in _FULL_ERRNOS
    name = getattr(e, "sqlite_errorname", "") or ""
    if name == "SQLITE_FULL":
        return True
    if name.startswith("SQLITE_IOERR"):
        try:
            return free_bytes(where) < 65536
        except OSError:
            return False
    return False


def with_reserve(db_dir: str, action: Callable[[], T]) -> T:
    """Run ``action``; if it fails for lack of space and some reserve is left,
    take a step of it and run it once more."""
    try:
        return action()
    except Exception as e:
        if not is_out_of_space(e, db_dir) or not shrink_reserve(db_dir):
            raise
    return action()


#: failures of the file system itself, which the message must place
_FS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


@contextmanager
def naming(path: str) -> Iterator[None]:
    """An OSError of the file system (full, read-only, I/O) raised inside names ``path``
    when it names nothing itself (a ``write`` to an fd does not) or only a name relative
    to some directory fd (``b'd'``, meaningless to a reader); an absolute bytes name is
    made text."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FS_ERRNOS:
            raise
        name = os.fsdecode(e.filename) if e.filename is not None else None
        if name is None or not os.path.isabs(name):
            raise OSError(e.errno, e.strerror, path) from None
        if name != e.filename:
            raise OSError(e.errno, e.strerror, name) from None
        raise
