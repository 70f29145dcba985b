"""Disk usage of trees: the walk of :mod:`.walker` cut down to counting blocks.

Same rules (one path-based open of the parent, then ``openat`` with ``O_DIRECTORY |
O_NOFOLLOW``, every entry ``fstatat(AT_SYMLINK_NOFOLLOW)`` relative to its directory's fd,
at most one open fd per level), none of its per-entry objects: a directory is listed and
its entries stat'ed in one ``scandir`` loop, and only the numbers are kept.  That is what
makes ``du`` over a store of 100k files take a fraction of a second of CPU.
"""

from __future__ import annotations

import errno
import marshal
import os
from stat import S_ISDIR

from .openat import NOT_A_DIR, open_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

#: one tree's usage in bytes (``st_blocks * 512``): (its entries with one link, directories
#: included, and ``(dev, ino, bytes)`` of each non-directory with more links, listed once
#: however often the tree links it)
Usage = tuple[int, tuple[tuple[int, int, int], ...]]


def _scan(fd: int, shared: dict[tuple[int, int], int]) -> tuple[int, list[str]]:
    """Blocks of the singly-linked entries of the directory at ``fd``, and its subdirectories."""
    blocks = 0
    subdirs: list[str] = []
    with os.scandir(fd) as it:
        for e in it:
            st = e.stat(follow_symlinks=False)  # fstatat(fd, name, AT_SYMLINK_NOFOLLOW)
            if S_ISDIR(st.st_mode):
                blocks += st.st_blocks
                subdirs.append(e.name)
            elif st.st_nlink > 1:
                shared[(st.st_dev, st.st_ino)] = st.st_blocks
            else:
                blocks += st.st_blocks
    return blocks, subdirs


def _tree(fd: int, shared: dict[tuple[int, int], int]) -> int:
    """Blocks below the directory at ``fd`` (which the caller closes); depth-first, one open
    fd per level."""
    blocks, subdirs = _scan(fd, shared)
    stack: list[tuple[int, list[str], int]] = [(fd, subdirs, 0)]
    try:
        while stack:
            dfd, names, i = stack[-1]
            if i == len(names):
                stack.pop()
                if dfd != fd:
                    os.close(dfd)
                continue
            stack[-1] = (dfd, names, i + 1)
            try:
                sub = open_dir(names[i], dfd)
            except OSError as e:
                # vanished, or swapped for a link or a file after listing: its lstat is
                # counted already, nothing below it is ours to follow
                if e.errno == errno.ENOENT or e.errno in NOT_A_DIR:
                    continue
                raise
            try:
                b, more = _scan(sub, shared)
            except BaseException:
                os.close(sub)
                raise
            blocks += b
            stack.append((sub, more, 0))
    finally:
        for dfd, _, _ in stack:
            if dfd != fd:
                os.close(dfd)
    return blocks


def usage(name, dir_fd: int) -> Usage:
    """The usage of the tree (or single file or symlink) ``name`` relative to ``dir_fd``;
    ``(0, ())`` if it is missing."""
    try:
        # a store path is mostly a directory: open it straight away (O_NOFOLLOW), an lstat
        # only for what is not one
        fd = open_dir(name, dir_fd)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return 0, ()
        if e.errno not in NOT_A_DIR:
            raise
    else:
        return _dir(fd)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0, ()
    if S_ISDIR(st.st_mode):  # a file or link until a moment ago: nothing below it to count
        return st.st_blocks * 512, ()
    if st.st_nlink > 1:
        return 0, ((st.st_dev, st.st_ino, st.st_blocks * 512),)
    return st.st_blocks * 512, ()


def _dir(fd: int) -> Usage:
    shared: dict[tuple[int, int], int] = {}
    try:
        blocks = os.fstat(fd).st_blocks + _tree(fd, shared)
    finally:
        os.close(fd)
    return blocks * 512, tuple((d, i, b * 512) for (d, i), b in shared.items())


#: entries to measure before a second process pays for its fork
PARALLEL_MIN = 2000


def usages(names: Sequence, dir_fd: int, processes: int = 1) -> list[Usage]:
    """:func:`usage` of each of ``names`` (entries of the one directory at ``dir_fd``), in
    order.  ``processes`` > 1 forks that many - 1 helpers, each measuring every n-th name
    (store paths in hash order: the big ones spread evenly) and handing back its numbers
    through a pipe (``marshal``); a helper that fails has its share measured here."""
    n = max(1, min(processes, len(names) // PARALLEL_MIN or 1))
    if n == 1:
        return [usage(name, dir_fd) for name in names]
    helpers: list[tuple[int, int]] = []
    out: list = [None] * len(names)
    try:
        for k in range(1, n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the helper (coverage does not follow forks)
                code = 1
                try:
                    os.close(r)
                    data = marshal.dumps([usage(name, dir_fd) for name in names[k::n]])
                    with open(w, "wb") as f:
                        f.write(data)
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            helpers.append((pid, r))
        out[0::n] = [usage(name, dir_fd) for name in names[0::n]]
        while helpers:
            pid, r = helpers.pop(0)
            k = n - 1 - len(helpers)
            with open(r, "rb") as f:
                data = f.read()
            _, status = os.waitpid(pid, 0)
            part = names[k::n]
            try:
                got = marshal.loads(data) if status == 0 else None
            except (EOFError, ValueError, TypeError):
                got = None
            if not isinstance(got, list) or len(got) != len(part):
                got = [usage(name, dir_fd) for name in part]
            out[k::n] = got
    finally:
        # an error here: a helper left writing to a closed pipe ends (EPIPE), and is reaped
        # (no ``signal`` import for a kill: it costs the CLI's quick paths an ``enum``)
        for pid, r in helpers:
            os.close(r)
            os.waitpid(pid, 0)
    return out
