"""What ``du`` measured of each store path, kept between runs: store paths never change, so
a path's bytes are walked once.

``<state>/storekeeper/du-cache`` (marshal, written atomically): ``{"v": 2, "links": the
mtime_ns of ``.links``, "paths": the paths joined by newlines, and as native ``array``
bytes ('q'; 'Q' for dev and ino) "ids" (their ValidPaths.id), "own" (own bytes), "n" (how many multiply-linked inodes
each has) and "dev", "ino", "bytes" (those inodes, path after path)}``: flat arrays, not a
tuple per path and inode, so reading and writing it stay cheap on a big store.  A path's
*own* bytes are its entries with one link; the listed inodes have more (hard links, through
``.links``).  What can change a path's split is hard-linking (an optimiser adds ``.links``
entries) or unlinking (a GC drops ``.links`` entries), and both change ``.links``'s mtime:
then the whole cache is dropped.  A re-registered path gets a new id, so a stale entry is
never matched.  Unreadable or unwritable caches (or an older format) are ignored (``du``
still works).
"""

from __future__ import annotations

import marshal
import os
from array import array
from itertools import accumulate

from ...fs.atomic import write_file_atomic

Entry = tuple[str, int, tuple[tuple[int, int, int], ...]]
_VERSION = 2


def _stamp(real_store_dir: str) -> int:
    try:
        return os.stat(os.path.join(real_store_dir, ".links")).st_mtime_ns
    except FileNotFoundError:
        return 0


def _arr(data: bytes, code: str = "q") -> array:
    a = array(code)
    a.frombytes(data)
    return a


class DiskCache:
    def __init__(self, state_dir: str, real_store_dir: str) -> None:
        self.file = os.path.join(state_dir, "storekeeper", "du-cache")
        self.stamp = _stamp(real_store_dir)
        self.new: dict[int, Entry] = {}
        self._index: dict[int, int] = {}  # id -> position in the arrays read
        self._paths: list[str] = []
        self._own = self._n = self._bytes = array("q")
        self._dev = self._ino = array("Q")
        self._start: list[int] = []
        try:
            with open(self.file, "rb") as f:
                data = marshal.load(f)
            if (isinstance(data, dict) and data.get("v") == _VERSION
                    and data.get("links") == self.stamp):
                self._load(data)
        except (OSError, EOFError, ValueError, TypeError, KeyError):
            self._index = {}

    def _load(self, data: dict) -> None:
        ids = _arr(data["ids"])
        paths = data["paths"].split("\n") if ids else []
        own, n = _arr(data["own"]), _arr(data["n"])
        dev, ino, nbytes = _arr(data["dev"], "Q"), _arr(data["ino"], "Q"), _arr(data["bytes"])
        if not len(ids) == len(paths) == len(own) == len(n) or not (
                len(dev) == len(ino) == len(nbytes) == sum(n)):
            return
        self._paths, self._own, self._n = paths, own, n
        self._dev, self._ino, self._bytes = dev, ino, nbytes
        self._start = [0, *accumulate(n)]
        self._index = {i: k for k, i in enumerate(ids)}

    def get(self, i: int, path: str) -> Entry | None:
        e = self.new.get(i)
        if e is not None:
            return e if e[0] == path else None
        k = self._index.get(i)
        if k is None or self._paths[k] != path:
            return None
        a, b = self._start[k], self._start[k + 1]
        return path, self._own[k], tuple(zip(self._dev[a:b], self._ino[a:b], self._bytes[a:b]))

    def put(self, i: int, entry: Entry) -> None:
        self.new[i] = entry

    def save(self, live: set[int]) -> None:
        """Write what was measured (only paths still valid)."""
        if not self.new and all(i in live for i in self._index):
            return
        ids, own, n = array("q"), array("q"), array("q")
        dev, ino, nbytes = array("Q"), array("Q"), array("q")
        paths = []
        for i, k in self._index.items():
            if i in live and i not in self.new:
                a, b = self._start[k], self._start[k + 1]
                ids.append(i)
                paths.append(self._paths[k])
                own.append(self._own[k])
                n.append(b - a)
                dev.extend(self._dev[a:b])
                ino.extend(self._ino[a:b])
                nbytes.extend(self._bytes[a:b])
        for i, (path, o, inodes) in self.new.items():
            if i in live:
                ids.append(i)
                paths.append(path)
                own.append(o)
                n.append(len(inodes))
                for d, j, b in inodes:
                    dev.append(d)
                    ino.append(j)
                    nbytes.append(b)
        data = {"v": _VERSION, "links": self.stamp, "paths": "\n".join(paths),
                "ids": ids.tobytes(), "own": own.tobytes(), "n": n.tobytes(),
                "dev": dev.tobytes(), "ino": ino.tobytes(), "bytes": nbytes.tobytes()}
        try:
            os.makedirs(os.path.dirname(self.file), exist_ok=True)
            write_file_atomic(self.file, marshal.dumps(data), 0o600)
        except OSError:
            pass
