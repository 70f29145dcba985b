"""Canonical metadata of store paths: what every file in a valid path looks like.

Invariant kept for every valid path: no write bits anywhere; regular files are
0444 or 0555 (0555 iff the owner-execute bit was set), directories 0555; mtime
is 1 (one second after the epoch), symlinks included; owner is the store's
owner (this process's euid/egid); no extended attributes except the ignored
ones; only regular files, directories and symlinks.

Every operation is fd-relative with ``O_NOFOLLOW``: an entry is opened
``O_PATH`` without following links, checked with ``fstat`` on that fd, and
changed through ``/proc/self/fd/N``, so a symlink swapped in between the check
and the change is never followed.

Build outputs (``from_uid`` given) are checked *before* anything is changed:
every entry must be owned by the build user, and no regular file may be a hard
link to an inode outside the outputs (its link count must equal the links seen
inside them).  That refuses ``ln /etc/shadow $out/foo`` without ever touching
the victim.  Builds run as the daemon's own user skip the ownership check
(everything is the daemon's) but keep the hard-link check.

The immutable bit (``FS_IMMUTABLE_FL``, set on pool files by Nix 1.0-1.2) is
never set by us; :func:`clear_immutable` / :func:`clear_immutable_tree` clear
it where an old store left it, so that the GC can delete and the optimiser can
link.  Filesystems without inode flags answer ``ENOTTY``/``EOPNOTSUPP``: that
simply means there is no bit to clear.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Iterable

from .errors import StoreError

MTIME_STORE = 1
IGNORED_XATTRS = frozenset({"security.selinux", "system.nfs4_acl"})
_OPATH = getattr(os, "O_PATH", 0)
_HAVE_PROC_FD = os.path.isdir("/proc/self/fd")


class CanonicaliseError(StoreError):
    pass


# <linux/fs.h>: _IOR('f', 1, long) / _IOW('f', 2, long); the kernel reads and
# writes an int through the pointer whatever the size encoded in the number.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
# "no inode flags here": not an error, there is nothing to clear
_NO_FLAGS = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})


def clear_immutable(name, dir_fd: int | None = None) -> bool:
    """Clear ``FS_IMMUTABLE_FL`` on one entry; True if it was set (and is now clear).

    The entry is opened with ``O_NOFOLLOW`` relative to ``dir_fd``: a symlink
    (which has no flags) is never followed.  Entries we cannot open (symlinks,
    sockets, unreadable files) and filesystems without flags give False.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
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


def clear_immutable_tree(path) -> bool:
    """Clear the immutable bit on ``path`` and everything below it (fd-relative,
    never following symlinks); True if any entry had it."""
    top = os.fsencode(path)
    cleared = clear_immutable(top)
    try:
        fd = _open_dir(top, None)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
            return cleared
        raise
    # one open fd per level: bounded by depth, not by the size of the tree
    stack = [(fd, iter(_entries(fd)))]
    try:
        while stack:
            dfd, it = stack[-1]
            name = next(it, None)
            if name is None:
                stack.pop()
                os.close(dfd)
                continue
            cleared |= clear_immutable(name, dfd)
            try:
                cfd = _open_dir(name, dfd)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
                    continue
                raise
            stack.append((cfd, iter(_entries(cfd))))
    finally:
        for dfd, _ in stack:
            os.close(dfd)
    return cleared


@dataclass
class _Walk:
    from_uid: int | None
    euid: int = field(default_factory=os.geteuid)
    egid: int = field(default_factory=os.getegid)
    # (dev, ino) -> [nlink, links seen inside the outputs, first path]
    inodes: dict[tuple[int, int], list] = field(default_factory=dict)


def _entries(dfd: int) -> list[bytes]:
    with os.scandir(dfd) as it:
        return [os.fsencode(e.name) for e in it]


def _open_nofollow(name: bytes, dir_fd: int | None) -> int:
    return os.open(name, _OPATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _open_dir(name: bytes, dir_fd: int | None) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _check_tree(name: bytes, dir_fd: int | None, shown: str, w: _Walk) -> None:
    """Pass one for build outputs: ownership and hard links, nothing changed."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise CanonicaliseError(f"file '{shown}' has an unsupported type")
    if w.from_uid is not None and st.st_uid != w.from_uid:
        raise CanonicaliseError(f"invalid ownership on file '{shown}'")
    if stat.S_ISREG(st.st_mode):
        rec = w.inodes.setdefault((st.st_dev, st.st_ino), [st.st_nlink, 0, shown])
        rec[1] += 1
    if stat.S_ISDIR(st.st_mode):
        if not st.st_mode & stat.S_IRUSR or not st.st_mode & stat.S_IXUSR:
            # The build user's own dir: make it readable to look inside.
            fd = _open_nofollow(name, dir_fd)
            try:
                _chmod_fd(fd, (st.st_mode & 0o7777) | 0o500)
            finally:
                os.close(fd)
        dfd = _open_dir(name, dir_fd)
        try:
            for child in _entries(dfd):
                _check_tree(child, dfd, f"{shown}/{os.fsdecode(child)}", w)
        finally:
            os.close(dfd)


def _chmod_fd(fd: int, mode: int) -> None:
    if _HAVE_PROC_FD:
        os.chmod(f"/proc/self/fd/{fd}", mode)
    else:  # pragma: no cover - Linux without /proc
        os.chmod(fd, mode)


def _strip_xattrs(fd: int, shown: str) -> None:
    target = f"/proc/self/fd/{fd}"
    try:
        names = os.listxattr(target)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOENT, errno.EBADF, errno.EACCES):
            return
        raise
    for attr in names:
        if attr in IGNORED_XATTRS:
            continue
        try:
            os.removexattr(target, attr)
        except OSError as e:
            raise CanonicaliseError(f"cannot remove extended attribute '{attr}' of '{shown}': "
                                    f"{e.strerror}") from None


def _canon(name: bytes, dir_fd: int | None, shown: str, w: _Walk) -> None:
    fd = _open_nofollow(name, dir_fd)
    try:
        st = os.fstat(fd)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            if st.st_mtime_ns != MTIME_STORE * 10**9:
                os.utime(name, ns=(st.st_atime_ns, MTIME_STORE * 10**9), dir_fd=dir_fd,
                         follow_symlinks=False)
            if st.st_uid != w.euid:
                os.chown(name, w.euid, w.egid, dir_fd=dir_fd, follow_symlinks=False)
            return
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise CanonicaliseError(f"file '{shown}' has an unsupported type")
        if _HAVE_PROC_FD:
            _strip_xattrs(fd, shown)
        perm = mode & 0o7777
        if stat.S_ISDIR(mode):
            want = 0o555
        elif perm in (0o444, 0o555):
            want = perm
        else:
            want = 0o555 if perm & stat.S_IXUSR else 0o444
        if st.st_uid != w.euid and _HAVE_PROC_FD:
            os.chown(f"/proc/self/fd/{fd}", w.euid, w.egid)
        if perm != want:
            _chmod_fd(fd, want)
        if stat.S_ISDIR(mode):
            dfd = _open_dir(name, dir_fd)
            try:
                for child in _entries(dfd):
                    _canon(child, dfd, f"{shown}/{os.fsdecode(child)}", w)
            finally:
                os.close(dfd)
        if st.st_mtime_ns != MTIME_STORE * 10**9:
            os.utime(f"/proc/self/fd/{fd}" if _HAVE_PROC_FD else name,
                     ns=(st.st_atime_ns, MTIME_STORE * 10**9),
                     **({} if _HAVE_PROC_FD else {"dir_fd": dir_fd}))
    finally:
        os.close(fd)


def canonicalise_paths(real_paths: Iterable[str], from_uid: int | None = None, *,
                       check_links: bool | None = None) -> None:
    """Bring each tree to canonical metadata (module docstring).

    With ``from_uid`` (a build's outputs, checked together) ownership and
    outside hard links are verified first and nothing is changed on failure.
    ``check_links=True`` without ``from_uid`` checks the hard links only
    (outputs of a build run as the daemon's own user).
    """
    real_paths = list(real_paths)
    w = _Walk(from_uid)
    if check_links is None:
        check_links = from_uid is not None
    if check_links:
        for p in real_paths:
            _check_tree(os.fsencode(p), None, p, w)
        for nlink, seen, shown in w.inodes.values():
            if nlink != seen:
                raise CanonicaliseError(f"file '{shown}' is a hard link to a file outside the "
                                        f"build output ({nlink} links, {seen} inside)")
    for p in real_paths:
        _canon(os.fsencode(p), None, p, w)
    for p in real_paths:
        st = os.lstat(p)
        if st.st_uid != w.euid:
            raise CanonicaliseError(f"wrong ownership of top-level store path '{p}'")
