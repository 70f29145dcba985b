"""File trees <-> NAR: dump, hash, copy-and-hash, restore, remove.

Invariant: the bytes that are hashed are the bytes that are dumped or copied.
Every file is opened exactly once, without following symlinks and relative to
its already-open parent directory, and its contents are read once; those same
buffers feed the NAR stream, the hash and the copy.  A file swapped for a
symlink mid-walk makes the walk fail with an error; it is never followed.  A
file that shrinks while being read is an error, and one that grows is read up
to the size its NAR header already announced.

Paths are bytes throughout so that directory entries sort by raw bytes, as the
NAR requires (str sorting would misorder non-UTF-8 names).  Restoring creates
files 0666 (0777 if executable) and directories 0777, less the umask; the store
canonicalises permissions afterwards.
"""

from __future__ import annotations

import os
import stat
from typing import Generator, Iterator

from .. import fs
from ..errors import StoreError
from ..formats.hashes import Hash, new_hasher
from ..formats.nar import (
    CLOSE,
    DIRECTORY_HEADER,
    NAR_MAGIC,
    entry_header,
    read_nar,
    regular_header,
    regular_trailer,
    symlink_node,
)
from ..formats.streams import Readable
from .crash import crash_point

#: most bytes of file contents in one chunk from dump_path
CHUNK_SIZE = 1 << 20
# Hashing and copying read smaller chunks, which stay in the L2 cache from
# the read through the hash to the write (a 1 GB copy on ext4 here: 1.38 s
# against 1.70 s with 1 MiB chunks).
_PASS_CHUNK = 256 << 10

_O_DIR = fs.O_DIR
# O_NONBLOCK: if a fifo is swapped in after the type check, opening must not hang.
_O_FILE = fs.O_FILE
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeError(StoreError):
    """A file tree cannot be archived: unsupported file type, or a file
    changed while it was being read.  The message names the file."""


def _shown(root: bytes, path: bytes) -> str:
    return os.fsdecode(os.path.join(root, path) if path else root)


def _unsupported(root: bytes, path: bytes) -> TreeError:
    return TreeError(f"file '{_shown(root, path)}' has an unsupported type")


# --------------------------------------------------------------------------
# The walk: one generator shared by dump, hash and copy.

_DIR, _END, _FILE, _LINK = range(4)


def _walk(root: bytes) -> Iterator[tuple]:
    """Yield the tree's nodes in NAR order, each with its NAR bytes:

    - ``(_DIR, path, head)`` then, after its entries, ``(_END, path, head)``
    - ``(_LINK, path, head, target)``
    - ``(_FILE, path, head, fd, size, executable, tail)``: the consumer reads
      exactly ``size`` bytes from ``fd`` (closed when the walk resumes) and
      emits them between ``head`` and ``tail``.

    ``path`` is relative to ``root`` (``b""`` for the root itself).  The
    traversal is :func:`storekeeper.fs.walk` in sorted (raw byte) order.
    """
    for ev, node in fs.walk(root, sort=True):
        path = os.fsencode(node.path)
        top = not path
        if ev == fs.ENTER:
            yield (_DIR, path, (NAR_MAGIC if top else entry_header(os.fsencode(node.name)))
                   + DIRECTORY_HEADER)
        elif ev == fs.LEAVE:
            yield (_END, path, CLOSE if top else CLOSE + CLOSE)
        else:
            prefix, suffix = (NAR_MAGIC, b"") if top else (entry_header(os.fsencode(node.name)), CLOSE)
            if node.kind == fs.REG:
                yield from _file(node.name, node.parent_fd, root, path, prefix, suffix)
            elif node.kind == fs.LNK:
                target = os.fsencode(os.readlink(node.name, dir_fd=node.parent_fd))
                yield (_LINK, path, prefix + symlink_node(target) + suffix, target)
            else:
                raise _unsupported(root, path)


def _file(name: bytes, dfd: int | None, root: bytes, path: bytes, prefix: bytes, suffix: bytes):
    fd = os.open(name, _O_FILE, dir_fd=dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TreeError(f"file '{_shown(root, path)}' changed type while being read")
        size = st.st_size
        executable = bool(st.st_mode & stat.S_IXUSR)
        yield (_FILE, path, prefix + regular_header(executable, size), fd, size, executable,
               regular_trailer(size) + suffix)
    finally:
        os.close(fd)


def _shrank(root: bytes, path: bytes) -> TreeError:
    return TreeError(f"file '{_shown(root, path)}' shrank while being read")


def _chunks(fd: int, size: int, root: bytes, path: bytes) -> Iterator[bytes]:
    remaining = size
    while remaining:
        chunk = os.read(fd, min(remaining, CHUNK_SIZE))
        if not chunk:
            raise _shrank(root, path)
        remaining -= len(chunk)
        yield chunk


# --------------------------------------------------------------------------
# Dump and hash.


def dump_path(path) -> Iterator[bytes]:
    """The NAR of the file tree at ``path``, as chunks of at most about
    ``CHUNK_SIZE`` bytes (memory use does not grow with file size)."""
    root = os.fsencode(path)
    for ev in _walk(root):
        if ev[0] != _FILE:
            yield ev[2]
            continue
        _, rel, head, fd, size, _, tail = ev
        chunks = _chunks(fd, size, root, rel)
        if size <= CHUNK_SIZE:
            yield head + b"".join(chunks) + tail
        else:
            yield head
            yield from chunks
            yield tail


def dump_path_views(path, size: int = _PASS_CHUNK) -> Iterator[memoryview]:
    """The NAR of the file tree at ``path`` as views of one buffer of ``size`` bytes,
    filled again for each: a view is valid only until the next one is asked for.
    For a consumer that hashes, compresses or writes each chunk at once: no bytes
    object per chunk and no joining of headers and contents (half the CPU of
    :func:`dump_path` plus a hash, for a store of small files)."""
    root = os.fsencode(path)
    buf = bytearray(size)
    view = memoryview(buf)

    def place(piece: bytes, pos: int) -> Generator[memoryview, None, int]:  # (the new pos)
        n = len(piece)
        if pos + n > size:
            if pos:
                yield view[:pos]
            pos = 0
            if n > size:  # (a long symlink target with a small buffer)
                yield memoryview(piece)
                return 0
        buf[pos:pos + n] = piece
        return pos + n

    pos = 0
    for ev in _walk(root):
        if ev[0] != _FILE:
            pos = yield from place(ev[2], pos)
            continue
        _, rel, head, fd, remaining, _, tail = ev
        pos = yield from place(head, pos)
        while remaining:
            if pos == size:
                yield view
                pos = 0
            got = os.readv(fd, [view[pos:pos + remaining] if pos + remaining < size else view[pos:]])
            if not got:
                raise _shrank(root, rel)
            pos += got
            remaining -= got
        pos = yield from place(tail, pos)
    if pos:
        yield view[:pos]


def nar_hash_path(path, algo: str = "sha256") -> tuple[Hash, int]:
    """Hash and size of the NAR of the file tree at ``path``."""
    return _nar_pass(os.fsencode(path), algo, None)


def copy_tree_hashing(src, dest, algo: str = "sha256") -> tuple[Hash, int]:
    """Copy the tree at ``src`` to ``dest`` (which must not exist) and return
    the NAR hash and size of what was copied, reading ``src`` once.

    On error ``dest`` may hold a partial tree; remove it with ``remove_tree``.
    """
    writer = _TreeWriter(dest)
    try:
        return _nar_pass(os.fsencode(src), algo, writer)
    finally:
        writer.close()


def _nar_pass(root: bytes, algo: str, writer: "_TreeWriter | None") -> tuple[Hash, int]:
    # One thread, one reused buffer.  A second thread hashing while this one
    # reads and writes made a 1 GB copy 1.5x faster on an idle machine but 2x
    # slower on a busy one (the GIL holder gets preempted); the buffer spares
    # a page-faulting allocation per chunk.
    hasher = new_hasher(algo)
    update = hasher.update
    buf = memoryview(bytearray(_PASS_CHUNK))
    size = 0
    for ev in _walk(root):
        kind = ev[0]
        head = ev[2]
        update(head)
        size += len(head)
        if kind == _FILE:
            _, rel, _, fd, fsize, executable, tail = ev
            if writer is not None:
                writer.regular_start(rel, executable, fsize)
            remaining = fsize
            while remaining:
                n = os.readv(fd, [buf[:remaining] if remaining < _PASS_CHUNK else buf])
                if not n:
                    raise _shrank(root, rel)
                chunk = buf[:n]
                update(chunk)
                if writer is not None:
                    writer.regular_data(chunk)
                remaining -= n
            update(tail)
            size += fsize + len(tail)
            if writer is not None:
                writer.regular_end()
        elif writer is not None:
            if kind == _DIR:
                writer.directory(ev[1])
            elif kind == _LINK:
                writer.symlink(ev[1], ev[3])
    return Hash(algo, hasher.digest()), size


# --------------------------------------------------------------------------
# Restore and remove.


_WRITEBACK_STEP = 8 << 20  # bytes of one file written between starts of its writeback
_WRITEBACK_MIN = 256 << 10  # smaller files are left to the sync


class _TreeWriter:
    """A NarSink that creates the tree at ``dest``, fd-relative.

    Keeps the chain of open directories from the root to the current node;
    NAR order is pre-order, so a node's parent is always on that chain.
    """

    def __init__(self, dest: str | bytes) -> None:
        self._dest = os.fsencode(dest)
        self._dirs: list[tuple[bytes, int]] = []
        self._fd = -1
        self._unflushed = 0

    def _parent(self, path: bytes) -> tuple[int | None, bytes]:
        if not path:
            return None, self._dest
        parent, _, name = path.rpartition(b"/")
        dirs = self._dirs
        while dirs[-1][0] != parent:
            os.close(dirs.pop()[1])
        return dirs[-1][1], name

    def directory(self, path: bytes) -> None:
        dfd, name = self._parent(path)
        os.mkdir(name, 0o777, dir_fd=dfd)
        self._dirs.append((path, os.open(name, _O_DIR, dir_fd=dfd)))

    def regular_start(self, path: bytes, executable: bool, size: int) -> None:
        dfd, name = self._parent(path)
        self._fd = os.open(name, _O_CREATE, 0o777 if executable else 0o666, dir_fd=dfd)
        self._unflushed = 0

    def regular_data(self, chunk) -> None:
        fs.write_all(self._fd, chunk)
        self._unflushed += len(chunk)
        if self._unflushed >= _WRITEBACK_STEP:
            self._start_writeback()

    def regular_end(self) -> None:
        fd = self._fd
        if self._unflushed >= _WRITEBACK_MIN:
            self._start_writeback()
        self._fd = -1
        os.close(fd)
        crash_point("add.copied")

    def _start_writeback(self) -> None:
        # The store syncs new paths before registering them: starting the disk
        # writes of a big file now overlaps them with the rest of the copy
        # (DONTNEED starts writeback of dirty pages without waiting for it).
        self._unflushed = 0
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass

    def symlink(self, path: bytes, target: bytes) -> None:
        dfd, name = self._parent(path)
        os.symlink(target, name, dir_fd=dfd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        while self._dirs:
            os.close(self._dirs.pop()[1])


def restore_nar(stream: Readable, dest: str | bytes) -> None:
    """Unpack the NAR read from ``stream`` (strictly, exactly its bytes) at
    ``dest``, which must not exist.  On error ``dest`` may hold a partial
    tree; remove it with ``remove_tree``."""
    writer = _TreeWriter(dest)
    try:
        read_nar(stream, writer)
    finally:
        writer.close()
