"""fd-relative primitives: opening without following links, and changing an inode
through the fd that was checked (see the package docstring for the rules)."""

from __future__ import annotations

import errno
import fcntl
import os
import sys

#: a directory, never reached through a symlink in its last component
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: any entry, for fstat and for changes through /proc/self/fd (no read access needed)
O_PATH = getattr(os, "O_PATH", 0)
O_HANDLE = O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in after a type check must not hang the open.
O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: "this name is not the directory it was": swapped for a link or a file
NOT_A_DIR = frozenset({errno.ENOTDIR, errno.ELOOP})
#: added to a read-only open by a scan (optimise) that reads every file and directory
#: of the store: reading them is not a use of them, and under ``relatime`` each first
#: read since the inode's last change would otherwise update and dirty its atime
#: (measured: ~6 % of an optimise run's CPU).  The kernel allows it only to the
#: file's owner or with CAP_FOWNER; :func:`open_noatime` falls back without it.
O_NOATIME = getattr(os, "O_NOATIME", 0)

HAVE_PROC_FD = os.path.isdir("/proc/self/fd")


def proc_fd(fd: int) -> str:
    """The /proc name of ``fd``: operations on it reach the fd's inode, whatever
    its name now points at (the only way to chmod/chown/utime an ``O_PATH`` fd)."""
    return f"/proc/self/fd/{fd}"


def open_dir(name, dir_fd: int | None = None) -> int:
    return os.open(name, O_DIR, dir_fd=dir_fd)


def open_noatime(name, flags: int, dir_fd: int | None = None) -> int:
    """``os.open(name, flags | O_NOATIME)``, or without ``O_NOATIME`` where the kernel
    refuses it (EPERM: not the owner and no CAP_FOWNER)."""
    if O_NOATIME:
        try:
            return os.open(name, flags | O_NOATIME, dir_fd=dir_fd)
        except PermissionError as e:
            if e.errno != errno.EPERM:
                raise
    return os.open(name, flags, dir_fd=dir_fd)


def entries(dir_fd: int) -> list[os.DirEntry]:
    """The entries of the directory open at ``dir_fd`` (one directory, not a tree;
    ``d_type``/``d_ino`` come free, and an entry's ``stat()`` is an ``fstatat`` on
    ``dir_fd``, so keep it open while you use them)."""
    with os.scandir(dir_fd) as it:
        return list(it)


def open_handle(name, dir_fd: int | None = None) -> int:
    """An ``O_PATH`` fd on the entry itself (a symlink is not followed)."""
    return os.open(name, O_HANDLE, dir_fd=dir_fd)


def open_dir_forcing_access(name, dir_fd: int | None = None) -> int:
    """Open a directory we may not read yet (a 0000 or 0111 directory of ours):
    grant ourselves ``u+rwx`` on the inode behind an ``O_PATH`` handle, then
    open *that inode* through /proc, so a name swapped in between is never used."""
    try:
        return os.open(name, O_DIR, dir_fd=dir_fd)
    except PermissionError:
        if not (O_PATH and HAVE_PROC_FD):
            raise
    pfd = os.open(name, O_HANDLE | os.O_DIRECTORY, dir_fd=dir_fd)
    try:
        mode = os.fstat(pfd).st_mode
        os.chmod(proc_fd(pfd), (mode & 0o7777) | 0o700)
        return os.open(proc_fd(pfd), O_DIR)
    finally:
        os.close(pfd)


def chmod_fd(fd: int, mode: int) -> None:
    """chmod the inode behind ``fd`` (an ``O_PATH`` fd included)."""
    if HAVE_PROC_FD:
        os.chmod(proc_fd(fd), mode)
    else:  # pragma: no cover - Linux without /proc
        os.chmod(fd, mode)


def chown_fd(fd: int, uid: int, gid: int) -> None:
    if HAVE_PROC_FD:
        os.chown(proc_fd(fd), uid, gid)
    else:  # pragma: no cover
        os.chown(fd, uid, gid)


def set_mtime_fd(fd: int, atime_ns: int, mtime_ns: int) -> None:
    if HAVE_PROC_FD:
        os.utime(proc_fd(fd), ns=(atime_ns, mtime_ns))
    else:  # pragma: no cover
        os.utime(fd, ns=(atime_ns, mtime_ns))


def write_all(fd: int, data) -> None:
    n = os.write(fd, data)
    if n < len(data):
        view = memoryview(data)
        while n < len(view):
            n += os.write(fd, view[n:])


def split_top(path) -> tuple[int, bytes]:
    """(fd of the parent directory, last component) for a caller-given path: the
    one path-based open a tree operation makes; everything below it is fd-relative.
    The caller closes the fd."""
    p = os.fsencode(path).rstrip(b"/") or b"/"
    parent, _, name = p.rpartition(b"/")
    if not name or name in (b".", b".."):
        raise ValueError(f"not a tree to operate on: {os.fsdecode(p)!r}")
    return os.open(parent or (b"/" if p.startswith(b"/") else b"."), O_DIR), name


# --- the immutable bit --------------------------------------------------------
# <linux/fs.h>: _IOR('f', 1, long) / _IOW('f', 2, long); the kernel reads and
# writes an int through the pointer whatever the size encoded in the number.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
# "no inode flags here": not an error, there is nothing to clear
_NO_FLAGS = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})


def clear_immutable(name, dir_fd: int | None = None) -> bool:
    """Clear ``FS_IMMUTABLE_FL`` (set on pool files by Nix 1.0-1.2) on one entry;
    True if it was set (and is now clear).

    The entry is opened with ``O_NOFOLLOW`` relative to ``dir_fd``: a symlink
    (which has no flags) is never followed.  Entries we cannot open (symlinks,
    sockets, unreadable files) and filesystems without flags give False.
    """
    try:
        fd = os.open(name, O_FILE, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.ENOENT, errno.EACCES, errno.EPERM):
            return False
        raise
    try:
        buf = bytearray(8)
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        except OSError as e:
            if e.errno in _NO_FLAGS:
                return False
            raise
        flags = int.from_bytes(buf[:4], sys.byteorder)
        if not flags & FS_IMMUTABLE_FL:
            return False
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, (flags & ~FS_IMMUTABLE_FL).to_bytes(4, sys.byteorder) + bytes(4))
        except OSError as e:
            if e.errno in _NO_FLAGS:
                return False
            raise
        return True
    finally:
        os.close(fd)
