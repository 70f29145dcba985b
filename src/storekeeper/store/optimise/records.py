"""Done-records: paths known to be fully linked."""

from __future__ import annotations

import array
import os
import struct
from typing import TYPE_CHECKING, Sequence

from ...fs.atomic import write_file_atomic
from ..locks import lock_fd

if TYPE_CHECKING:
    pass

from .hashing import LINKS_DIR
from .pool import OptimiseStats, PoolLock

# --- done-records: paths known to be fully linked -----------------------------------
#
# ``<state>/optimised-paths`` remembers, per valid path, that every file of it
# was on a pool inode after a run: (ValidPaths id, inode of the path's top
# entry and, for a directory, its ctime; the pool inodes).  The next run skips
# such a path unwalked only if its row id and top entry are unchanged (it was
# not deleted, re-added or repaired) and every recorded inode is still in
# ``.links``: a deleted or partly deleted pool makes the path be walked again
# and the pool rebuilt.  Checking that needs the pool's inodes (a readdir of
# ``.links``), except when ``.links`` itself is unchanged (same inode and
# ctime: no entry added or removed) since the end of the run that wrote the
# file.  Losing the file only costs time.

DONE_NAME = "optimised-paths"
_DONE_MAGIC = b"skopt-3\n"
# magic, record count, .links (dev, inode, ctime) at the end of the writing
# run (zeros: not to be trusted), the records, then all their inodes (u64 each)
_DONE_HEAD = struct.Struct("<8sQQQq")
_DONE_REC = struct.Struct("<32sQQqQQ")  # hash part, row id, top inode, top ctime, first, count
_NO_CTIME = -1  # a single-file path: its ctime moves with every link to its (pool) inode

#: path hash -> (rowid, top inode, top ctime, the pool inodes it links to)
_Records = dict[bytes, tuple[int, int, int, Sequence[int]]]


def _load_done(state_dir: str) -> tuple[tuple[int, int, int], _Records]:
    try:
        with open(os.path.join(state_dir, DONE_NAME), "rb") as f:
            data = f.read()
    except OSError:
        return (0, 0, 0), {}
    try:
        magic, n, dev, ino, ctime = _DONE_HEAD.unpack_from(data, 0)
        if magic != _DONE_MAGIC:
            return (0, 0, 0), {}
        start = _DONE_HEAD.size + n * _DONE_REC.size
        recs = _DONE_REC.iter_unpack(data[_DONE_HEAD.size:start])
        inodes = memoryview(data)[start:].cast("Q")
        out: _Records = {}
        for hp, rowid, top, top_ctime, first, count in recs:
            if first + count > len(inodes):
                return (0, 0, 0), {}  # truncated: trust none of it
            out[hp] = (rowid, top, top_ctime, inodes[first:first + count])
        return (dev, ino, ctime), out
    except (struct.error, TypeError, ValueError):
        return (0, 0, 0), {}


def _links_id(links: str) -> tuple[int, int, int]:
    try:
        st = os.lstat(links)
    except FileNotFoundError:
        return (0, 0, 0)
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _save_done(store, new: _Records, valid: dict[bytes, int], trust_links: bool) -> None:
    state_dir = store.state_dir
    links = os.path.join(store.real_store_dir, LINKS_DIR)
    lock = PoolLock(state_dir)
    try:
        # the gate serialises writers: two runs at once both keep their records
        lock_fd(lock._gate, exclusive=True)
        merged = {hp: rec for hp, rec in _load_done(state_dir)[1].items() if valid.get(hp) == rec[0]}
        merged.update(new)
        # read after our last change to .links: any later one changes its ctime
        dev, ino, ctime = _links_id(links) if trust_links else (0, 0, 0)
        head = [_DONE_HEAD.pack(_DONE_MAGIC, len(merged), dev, ino, ctime)]
        inodes = array.array("Q")
        for hp, (rowid, top, top_ctime, inos) in merged.items():
            head.append(_DONE_REC.pack(hp, rowid, top, top_ctime, len(inodes), len(inos)))
            inodes.extend(inos)
        write_file_atomic(os.path.join(state_dir, DONE_NAME), b"".join(head) + inodes.tobytes(), 0o644)
    finally:
        lock.close()


def _record(done: _Records, ids: dict[bytes, int], base: str, rec: tuple) -> None:
    """Add a walked path's done-record ((top inode, top ctime, pool inodes) from the walk)."""
    hp = base[:32].encode()
    done[hp] = (ids[hp], rec[0], rec[1], array.array("Q", rec[2]))


def _save_run(store, done: _Records, ids: dict[bytes, int], total: OptimiseStats,
              disturbed: bool) -> None:
    # a run that removed pool entries itself (or saw them vanish) does not vouch for .links
    _save_done(store, done, ids, trust_links=not (total.corrupt_links_removed or disturbed))
