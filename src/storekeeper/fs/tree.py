"""The one deleter."""

from __future__ import annotations

import errno
import os

from .crash import crash_point
from .openat import clear_immutable, split_top
from .walker import DIR, ENTER, ENTRY, walk

# A tree that keeps growing while we delete it (someone with write access
# adding entries) is given up on after this many re-walks of one directory.
_MAX_REWALKS = 8


def remove_tree(path, dir_fd: int | None = None) -> int:
    """Delete the tree at ``path`` (relative to ``dir_fd``; with no ``dir_fd``
    its parent is opened once by path and everything below is fd-relative).

    Read-only directories (store content is 0555) are made writable through
    their own fd; symlinks are removed, never followed; a directory swapped
    for a symlink mid-walk loses the symlink, not the target's contents; an
    immutable bit left by an old Nix is cleared.  A missing tree is fine.
    Returns the bytes Nix counts as freed: ``st_size`` of each non-directory
    whose link count is 1 or 2 (the second assumed to be its ``.links`` entry).
    """
    if dir_fd is None:
        try:
            pfd, name = split_top(path)
        except FileNotFoundError:
            return 0
        try:
            return _remove(name, pfd, 0)
        finally:
            os.close(pfd)
    return _remove(path, dir_fd, 0)


def _remove(name, dir_fd: int, rewalks: int) -> int:
    freed = 0
    try:
        for ev, node in walk(name, dir_fd, force_access=True):
            if ev == ENTER:
                assert node.fd is not None
                _make_writable(node.fd, node.name, node.parent_fd)
            elif ev == ENTRY:
                freed += _unlink(node.name, node.parent_fd, node.kind == DIR, rewalks)
                crash_point("fs.removed")
            else:
                _rmdir(node.name, node.parent_fd, rewalks)
                crash_point("fs.removed")
    except FileNotFoundError:
        pass
    return freed


def _make_writable(fd: int, name, parent_fd: int | None) -> None:
    mode = os.fstat(fd).st_mode
    if mode & 0o700 == 0o700:
        return
    try:
        os.fchmod(fd, (mode & 0o7777) | 0o700)
    except PermissionError:
        if not clear_immutable(name, parent_fd):
            raise
        os.fchmod(fd, (mode & 0o7777) | 0o700)


def _unlink(name, dir_fd: int | None, is_dir: bool, rewalks: int) -> int:
    if is_dir:  # a directory swapped in after its parent was listed
        return _rewalk(name, dir_fd, rewalks)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        freed = st.st_size if st.st_nlink <= 2 else 0
        try:
            os.unlink(name, dir_fd=dir_fd)
        except PermissionError:
            # An old store (Nix 1.0-1.2) may have set the immutable bit on the
            # file (or the directory).  Retry even when we found none: a
            # concurrent deleter sharing the inode through .links may have
            # cleared it first.
            clear_immutable(name, dir_fd)
            if dir_fd is not None:
                clear_immutable(".", dir_fd)
            os.unlink(name, dir_fd=dir_fd)
        return freed
    except FileNotFoundError:
        return 0
    except IsADirectoryError:
        return _rewalk(name, dir_fd, rewalks)


def _rmdir(name, dir_fd: int | None, rewalks: int) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except NotADirectoryError:  # swapped for a file or a link: remove that, follow nothing
        _unlink(name, dir_fd, False, rewalks)
    except OSError as e:
        if e.errno != errno.ENOTEMPTY:
            raise
        _rewalk(name, dir_fd, rewalks)  # entries added while we walked


def _rewalk(name, dir_fd: int | None, rewalks: int) -> int:
    if rewalks >= _MAX_REWALKS:
        raise OSError(errno.ENOTEMPTY, "directory keeps changing while being deleted",
                      os.fsdecode(name))
    assert dir_fd is not None
    return _remove(name, dir_fd, rewalks + 1)
