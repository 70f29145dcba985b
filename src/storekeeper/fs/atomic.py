"""Small file-system primitives every state write goes through.

State files are written atomically: a temp file in the same directory, fsync,
rename over the target, fsync the directory.  A crash leaves either the old or
the new content, never a mix.
"""

from __future__ import annotations

import errno
import os
import stat

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (NFS) refuse fsync on directories
    finally:
        os.close(fd)


_libc = None  # (ctypes.CDLL, loaded on first use)


def sync_filesystem(path: str) -> None:
    """Write out everything dirty on the file system holding ``path`` (``syncfs``):
    one call makes a whole tree of new files and their renames durable, where an
    fsync per file costs a journal commit each."""
    global _libc
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        import ctypes  # noqa: PLC0415 -- only a writer needs it: kept off the start-up of queries
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    except AttributeError:  # (no syncfs in this libc)
        os.sync()
    finally:
        os.close(fd)


#: fsyncs issued at once by :func:`fsync_all`
FSYNC_THREADS = 8


def fsync_all(fds: list[int]) -> None:
    """fsync each of ``fds``; a few at once, so the file system commits them together
    (one journal commit for a group instead of one per file).  The threads end before
    this returns: a process that forks (build launchers) must not keep any."""
    if len(fds) <= 2:
        for fd in fds:
            os.fsync(fd)
        return
    errors: list[BaseException] = []

    def work(part: list[int]) -> None:
        try:
            for fd in part:
                os.fsync(fd)
        except BaseException as e:  # handed to the caller
            errors.append(e)
    import threading  # noqa: PLC0415 -- only a writer needs it: kept off the start-up of queries
    n = min(FSYNC_THREADS, len(fds))
    threads = [threading.Thread(target=work, args=(fds[i::n],), name="sk-fsync") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


#: a batch of new trees with more entries than this is synced with one ``syncfs``
SYNC_EACH_MAX = 64


def sync_new_trees(paths: list[str], parent: str,
                   sync_all: Callable[[], None] | None = None) -> None:
    """Make new trees ``paths`` (renamed into ``parent``) durable: their files' data,
    their directories and the entries in ``parent``.

    A few files are fsynced one by one (that waits for nothing but them); a batch
    with more than :data:`SYNC_EACH_MAX` entries is synced with one ``syncfs`` of
    the file system (one journal commit for all, not one per file), through
    ``sync_all`` when given (which must do at least that)."""
    fds: list[int] = []
    try:
        stack = list(paths)
        count = 0
        while stack:
            p = stack.pop()
            count += 1
            if count > SYNC_EACH_MAX:
                for fd in fds:
                    os.close(fd)
                fds = []
                if sync_all is not None:
                    sync_all()
                else:
                    sync_filesystem(parent)
                return
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    continue  # a symlink: its parent directory's fsync covers it
                raise
            fds.append(fd)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                stack.extend(os.path.join(p, n) for n in os.listdir(fd))
        fsync_all(fds)
        fsync_dir(parent)
    finally:
        for fd in fds:
            os.close(fd)


def open_private_dir(path: str, create: bool, uid: int, forbidden_mode: int) -> tuple[int | None, os.stat_result | None]:
    """(fd, None) on directory ``path``, never reached through a symlink, if ``uid``
    owns it and none of ``forbidden_mode`` is set; (None, stat) if not, the fd
    closed; (None, None) if it does not exist.  ``create`` makes it (0700) first."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    st = os.fstat(fd)
    if st.st_uid != uid or st.st_mode & forbidden_mode:
        os.close(fd)
        return None, st
    return fd, None


def temp_name(directory: str, prefix: str) -> str:
    return os.path.join(directory, f"{prefix}{os.getpid()}-{os.urandom(6).hex()}")


def write_new_file(path: str, data: bytes, mode: int, sync: bool = True) -> None:
    """Create ``path`` (it must not exist, and is never a followed symlink) with ``data``,
    synced (unless ``sync`` is false)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically.  Not ``durable``: without the two fsyncs,
    for records whose loss in a crash is harmless (the caller says why); after a
    crash such a file may be the old one, or empty."""
    directory = os.path.dirname(path) or "."
    tmp = temp_name(directory, "." + os.path.basename(path) + ".tmp-")
    try:
        write_new_file(tmp, data, mode, durable)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(directory)


def symlink_atomic(target: str, link: str) -> None:
    tmp = temp_name(os.path.dirname(link) or ".", os.path.basename(link) + ".tmp-")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        os.unlink(tmp)
        raise
