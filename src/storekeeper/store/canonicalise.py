"""Canonical metadata of store paths: what every file in a valid path looks like.

Invariant kept for every valid path: no write bits anywhere; regular files are
0444 or 0555 (0555 iff the owner-execute bit was set), directories 0555; mtime
is 1 (one second after the epoch), symlinks included; owner is the store's
owner (this process's euid/egid); no extended attributes except the ignored
ones; only regular files, directories and symlinks.

Everything goes through :mod:`storekeeper.fs` (its rules): each entry is
opened ``O_PATH | O_NOFOLLOW`` relative to its parent's fd, checked with
``fstat`` on that fd and changed through that fd, so an entry swapped in
between the check and the change is never the one changed.

Build outputs (``from_uid`` given, or ``check_links``) are walked twice.  The
first pass changes nothing: every entry must be owned by the build user, and
no regular file may be a hard link to an inode outside the outputs (its link
count must equal the links seen inside them).  The second pass changes, and
it re-checks every inode on the fd it then changes: a directory is made
``0555`` and ours *before* it is listed, so nobody else can add to it from
then on, and an entry that appeared between the passes (an inode the first
pass did not see, or a link count that grew: ``ln /etc/shadow $out/sub/x``
into a world-writable directory) is refused without being touched.  Builds
run as the daemon's own user skip the ownership check (everything is the
daemon's) but keep the hard-link checks.

A caller's own check of each top (``top_check``: a build's "suspicious
ownership or permission") runs in both passes on the fd the pass holds, in
the second right before that fd is changed; the top's final owner is read on
that fd too.  No check by path is followed by a change by path.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .. import fs
from ..errors import StoreError
from ..fs import ENTER, ENTRY, LNK, REG

MTIME_STORE = 1
_MTIME_NS = MTIME_STORE * 10**9
IGNORED_XATTRS = frozenset({"security.selinux", "system.nfs4_acl"})


class CanonicaliseError(StoreError):
    pass


#: ``top_check(shown, lstat)``: raises to reject a top (module docstring)
TopCheck = Callable[[str, os.stat_result], None]


@dataclass
class _Walk:
    from_uid: int | None
    check_links: bool
    top_check: TopCheck | None = None
    euid: int = field(default_factory=os.geteuid)
    egid: int = field(default_factory=os.getegid)
    # (dev, ino) -> [nlink, links seen inside the outputs, first path]
    inodes: dict[tuple[int, int], list] = field(default_factory=dict)

    def owner_ok(self, st: os.stat_result) -> bool:
        # (an inode already made ours: a second link to a file canonicalised earlier)
        return self.from_uid is None or st.st_uid in (self.from_uid, self.euid)


# The two calls the second pass makes on every entry; tests hook them to race us.
_open_nofollow = fs.open_handle
_chmod_fd = fs.chmod_fd


def _check_tree(top: str, w: _Walk) -> None:
    """Pass one for build outputs: ownership and hard links, nothing changed
    (except that a directory of the build user's we cannot read is made so)."""
    for ev, node in fs.walk(top, force_access=True):
        if ev == fs.LEAVE:
            continue
        st = node.lstat()
        shown = node.show(top)
        if node.depth == 0 and w.top_check is not None:
            w.top_check(shown, st)
        if node.kind not in (REG, fs.DIR, LNK) or fs.kind_of(st.st_mode) != node.kind:
            raise CanonicaliseError(f"file '{shown}' has an unsupported type")
        if w.from_uid is not None and st.st_uid != w.from_uid:
            raise CanonicaliseError(f"invalid ownership on file '{shown}'")
        if node.kind == REG:
            rec = w.inodes.setdefault((st.st_dev, st.st_ino), [st.st_nlink, 0, shown])
            rec[1] += 1


def _strip_xattrs(fd: int, shown: str) -> None:
    target = fs.proc_fd(fd)
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


def _fix(fd: int, st: os.stat_result, want: int, shown: str, w: _Walk) -> None:
    """Owner, mode and xattrs of the inode behind ``fd`` (already checked)."""
    if fs.HAVE_PROC_FD:
        _strip_xattrs(fd, shown)
        if st.st_uid != w.euid:
            fs.chown_fd(fd, w.euid, w.egid)
    if st.st_mode & 0o7777 != want:
        _chmod_fd(fd, want)


def _file_mode(perm: int) -> int:
    if perm in (0o444, 0o555):
        return perm
    return 0o555 if perm & stat.S_IXUSR else 0o444


def _canon_entry(node: fs.Node, shown: str, w: _Walk) -> None:
    fd = _open_nofollow(node.name, node.parent_fd)
    try:
        st = os.fstat(fd)
        if node.depth == 0 and w.top_check is not None:
            w.top_check(shown, st)
        kind = fs.kind_of(st.st_mode)
        if kind == LNK:
            # No fd reaches a symlink's own metadata; by name, relative to a
            # parent that is already ours and 0555 (nobody can swap it now).
            if not w.owner_ok(st):
                raise CanonicaliseError(f"invalid ownership on file '{shown}'")
            if st.st_mtime_ns != _MTIME_NS:
                os.utime(node.name, ns=(st.st_atime_ns, _MTIME_NS), dir_fd=node.parent_fd,
                         follow_symlinks=False)
            if st.st_uid != w.euid:
                os.chown(node.name, w.euid, w.egid, dir_fd=node.parent_fd, follow_symlinks=False)
            if node.depth == 0:
                _owned(os.stat(node.name, dir_fd=node.parent_fd, follow_symlinks=False), shown, w)
            return
        if kind != REG:
            raise CanonicaliseError(f"file '{shown}' has an unsupported type")
        if not w.owner_ok(st):
            raise CanonicaliseError(f"invalid ownership on file '{shown}'")
        if w.check_links:
            rec = w.inodes.get((st.st_dev, st.st_ino))
            if rec is None or st.st_nlink != rec[0]:
                raise CanonicaliseError(f"file '{shown}' is a hard link to a file outside the "
                                        f"build output (it appeared or gained links while the "
                                        f"output was checked)")
        _fix(fd, st, _file_mode(st.st_mode & 0o7777), shown, w)
        if st.st_mtime_ns != _MTIME_NS:
            fs.set_mtime_fd(fd, st.st_atime_ns, _MTIME_NS)
        if node.depth == 0:
            _owned(os.fstat(fd), shown, w)
    finally:
        os.close(fd)


def _owned(st: os.stat_result, shown: str, w: _Walk) -> None:
    """A top, once changed, must be ours (a failed chown would leave it the builder's)."""
    if st.st_uid != w.euid:
        raise CanonicaliseError(f"wrong ownership of top-level store path '{shown}'")


def _canon_tree(top: str, w: _Walk) -> None:
    pfd, name = fs.split_top(top)
    try:
        for ev, node in fs.walk(name, pfd, force_access=True):
            shown = node.show(top)
            if ev == ENTRY:
                _canon_entry(node, shown, w)
                continue
            assert node.fd is not None
            st = os.fstat(node.fd)
            if ev == ENTER:
                if node.depth == 0 and w.top_check is not None:
                    w.top_check(shown, st)
                if not w.owner_ok(st):
                    raise CanonicaliseError(f"invalid ownership on file '{shown}'")
                _fix(node.fd, st, 0o555, shown, w)  # locked down before it is listed
                if node.depth == 0:
                    _owned(os.fstat(node.fd), shown, w)
            elif st.st_mtime_ns != _MTIME_NS:
                fs.set_mtime_fd(node.fd, st.st_atime_ns, _MTIME_NS)
    finally:
        os.close(pfd)


def canonicalise_paths(real_paths: Iterable[str], from_uid: int | None = None, *,
                       check_links: bool | None = None, top_check: TopCheck | None = None) -> None:
    """Bring each tree to canonical metadata (module docstring).

    With ``from_uid`` (a build's outputs, checked together) ownership and
    outside hard links are verified first, and re-verified on each fd as it
    is changed; a victim reached through a link is never changed.
    ``check_links=True`` without ``from_uid`` checks the hard links only
    (outputs of a build run as the daemon's own user).  ``top_check(shown,
    lstat)`` is the caller's check of each top, made on the fd each pass holds
    (a missing top raises FileNotFoundError before it is called).
    """
    real_paths = list(real_paths)
    if check_links is None:
        check_links = from_uid is not None
    w = _Walk(from_uid, check_links, top_check)
    if check_links:
        for p in real_paths:
            _check_tree(p, w)
        for nlink, seen, shown in w.inodes.values():
            if nlink != seen:
                raise CanonicaliseError(f"file '{shown}' is a hard link to a file outside the "
                                        f"build output ({nlink} links, {seen} inside)")
    for p in real_paths:
        _canon_tree(p, w)
