"""The one tree walker: fd-relative, never following a link, one open fd per level."""

from __future__ import annotations

import errno
import os
import stat

from .openat import NOT_A_DIR, O_DIR, open_dir, open_dir_forcing_access, open_noatime

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: events: a directory opened (its ``fd`` is valid, nothing listed yet), a
#: non-directory entry, a directory done (its ``fd`` still valid)
ENTER, ENTRY, LEAVE = 1, 2, 3
#: kinds
REG, DIR, LNK, OTHER = 0, 1, 2, 3


def kind_of(mode: int) -> int:
    if stat.S_ISREG(mode):
        return REG
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISLNK(mode):
        return LNK
    return OTHER


class Node:
    """One entry met by :func:`walk`.

    ``name`` is relative to ``parent_fd`` (for the top: the name the caller
    gave, relative to its ``dir_fd``); ``path`` is relative to the top (``""``
    for the top), for messages; ``entry`` is the ``os.DirEntry`` (``d_type``,
    ``d_ino``; its ``stat()`` is an ``fstatat`` on ``parent_fd``), None for the
    top.  ``fd`` is open for a directory from ENTER to LEAVE.  Setting
    ``prune`` at ENTER skips the directory's contents.
    """

    __slots__ = ("name", "path", "parent_fd", "fd", "kind", "entry", "depth", "prune")

    def __init__(self, name, path: str, parent_fd: int | None, kind: int,
                 entry: os.DirEntry | None, depth: int) -> None:
        self.name = name
        self.path = path
        self.parent_fd = parent_fd
        self.fd: int | None = None
        self.kind = kind
        self.entry = entry
        self.depth = depth
        self.prune = False

    def lstat(self) -> os.stat_result:
        """``fstatat(parent_fd, name, AT_SYMLINK_NOFOLLOW)``, or ``fstat`` of an open directory."""
        if self.fd is not None:
            return os.fstat(self.fd)
        if self.entry is not None:
            return self.entry.stat(follow_symlinks=False)
        return os.stat(self.name, dir_fd=self.parent_fd, follow_symlinks=False)

    def show(self, top: str) -> str:
        return f"{top}/{self.path}" if self.path else top


def _list(fd: int, sort: bool) -> list[os.DirEntry]:
    with os.scandir(fd) as it:
        entries = list(it)
    if sort:
        # raw bytes order (NAR order); fsencode undoes scandir's surrogateescape
        entries.sort(key=lambda e: os.fsencode(e.name))
    else:
        # files first, then subdirectories: a consumer sees a directory's
        # files together (one batch per directory)
        entries.sort(key=lambda e: e.is_dir(follow_symlinks=False))
    return entries


def _entry_kind(e: os.DirEntry) -> int:
    # d_type answers these without a stat call on most filesystems
    if e.is_file(follow_symlinks=False):
        return REG
    if e.is_dir(follow_symlinks=False):
        return DIR
    if e.is_symlink():
        return LNK
    return OTHER


def walk(top, dir_fd: int | None = None, *, sort: bool = False, force_access: bool = False,
         on_error: Callable[[Node, OSError], None] | None = None) -> Iterator[tuple[int, Node]]:
    """Walk the tree at ``top`` (relative to ``dir_fd``) in pre-order.

    Yields ``(ENTER, dir)`` before listing a directory (so a consumer can lock
    it down first: entries made before that are listed, none can be added
    after by anyone without write access), ``(ENTRY, node)`` for every
    non-directory, ``(LEAVE, dir)`` after a directory's contents.  ``sort``:
    entries in raw byte order, subdirectories where they sort (NAR order);
    otherwise a directory's non-directories come before its subdirectories.

    A subdirectory is opened ``O_DIRECTORY | O_NOFOLLOW`` relative to its
    parent's fd: one swapped for a symlink or a file after listing is yielded
    as an ENTRY of its new kind (never followed); one that vanished is
    skipped.  ``force_access`` opens directories we own but may not read
    (``open_dir_forcing_access``).  A missing ``top`` raises FileNotFoundError.
    ``on_error``: a subdirectory that cannot be opened or listed (say EACCES)
    is reported to it and skipped, instead of raising.
    """
    opener = open_dir_forcing_access if force_access else open_dir
    st = os.stat(top, dir_fd=dir_fd, follow_symlinks=False)
    node = Node(top, "", dir_fd, kind_of(st.st_mode), None, 0)
    if node.kind != DIR:
        yield ENTRY, node
        return
    try:
        node.fd = opener(top, dir_fd)
    except OSError as e:
        if e.errno not in NOT_A_DIR:
            raise
        node.kind = kind_of(os.stat(top, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        yield ENTRY, node
        return
    # frames: [directory node, its entries (None until listed), next index]
    stack: list[list] = [[node, None, 0]]
    try:
        yield ENTER, node
        while stack:
            frame = stack[-1]
            d: Node = frame[0]
            assert d.fd is not None
            if frame[1] is None:
                try:
                    frame[1] = [] if d.prune else _list(d.fd, sort)
                except OSError as err:
                    if on_error is None:
                        raise
                    on_error(d, err)
                    frame[1] = []
            entries: list[os.DirEntry] = frame[1]
            i = frame[2]
            if i == len(entries):
                yield LEAVE, d
                stack.pop()
                os.close(d.fd)
                d.fd = None
                continue
            frame[2] = i + 1
            entry = entries[i]
            child = Node(entry.name, f"{d.path}/{entry.name}" if d.path else entry.name, d.fd,
                         _entry_kind(entry), entry, d.depth + 1)
            if child.kind != DIR:
                yield ENTRY, child
                continue
            try:
                child.fd = opener(entry.name, d.fd)
            except OSError as err:
                if err.errno == errno.ENOENT:
                    continue
                if err.errno not in NOT_A_DIR:
                    if on_error is None:
                        raise
                    on_error(child, err)
                    continue
                try:  # swapped after listing: report what is there now
                    child.kind = kind_of(os.stat(entry.name, dir_fd=d.fd,
                                                 follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    continue
                child.entry = None
                yield ENTRY, child
                continue
            stack.append([child, None, 0])
            yield ENTER, child
    finally:
        for frame in stack:
            if frame[0].fd is not None:
                os.close(frame[0].fd)
                frame[0].fd = None


#: kind of an entry met by :func:`dirs` that was listed as a directory but is not one
#: any more when opened (swapped for a file or a link after listing; not followed)
SWAPPED = 4


def dirs(top, dir_fd: int) -> Iterator[tuple[int, str, list[tuple[str, int, int]]]]:
    """The directories of the tree at ``top`` (a directory, relative to ``dir_fd``), pre-order:
    ``(fd, path relative to top, its non-directories as (name, d_ino, kind))``.

    :func:`walk` cut down for a consumer that works a directory's files as one
    batch (the optimiser): same rules (``O_DIRECTORY | O_NOFOLLOW`` relative to
    the parent's fd, at most one open fd per level, a subdirectory that vanished
    is skipped), plus ``O_NOATIME`` where allowed (a scan is not a use), no
    object per entry and no sort.  ``kind`` is from ``d_type``
    (REG, LNK, OTHER), or :data:`SWAPPED` for a subdirectory that was not one
    any more when opened (``top`` itself not a directory: ``(dir_fd, "", [(top, 0,
    SWAPPED)])``).  ``fd`` is valid until the next step of the iterator.  A missing
    ``top`` raises FileNotFoundError.
    """
    try:
        fd = open_noatime(top, O_DIR, dir_fd)
    except OSError as err:
        if err.errno not in NOT_A_DIR:
            raise
        yield dir_fd, "", [(top, 0, SWAPPED)]
        return
    # frames: (fd, path, subdirectory names, next index)
    stack: list[list] = []
    try:
        path = ""
        while True:
            files: list[tuple[str, int, int]] = []
            subdirs: list[str] = []
            with os.scandir(fd) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        subdirs.append(e.name)
                    elif e.is_file(follow_symlinks=False):
                        files.append((e.name, e.inode(), REG))
                    elif e.is_symlink():
                        files.append((e.name, e.inode(), LNK))
                    else:
                        files.append((e.name, e.inode(), OTHER))
            stack.append([fd, path, subdirs, 0])
            fd = -1
            top_frame = stack[-1]
            yield top_frame[0], path, files
            # next directory: depth first
            while stack:
                frame = stack[-1]
                names = frame[2]
                i = frame[3]
                if i == len(names):
                    os.close(frame[0])
                    stack.pop()
                    continue
                frame[3] = i + 1
                name = names[i]
                try:
                    fd = open_noatime(name, O_DIR, frame[0])
                except OSError as err:
                    if err.errno == errno.ENOENT:
                        continue
                    if err.errno not in NOT_A_DIR:
                        raise
                    yield frame[0], frame[1], [(name, 0, SWAPPED)]
                    continue
                path = f"{frame[1]}/{name}" if frame[1] else name
                break
            if fd < 0:
                return
    finally:
        if fd >= 0:
            os.close(fd)
        for frame in stack:
            os.close(frame[0])
