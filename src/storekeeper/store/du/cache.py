"""What ``du`` measured of each store path, kept between runs: store paths never change, so
a path's bytes are walked once.

``<state>/storekeeper/du-cache`` (marshal, written atomically): ``{"links": the mtime_ns of
``.links``, "paths": {ValidPaths.id: (path, own bytes, ((dev, ino, bytes), ...))}}``.  A
path's *own* bytes are its entries with one link; the listed inodes have more (hard links,
through ``.links``).  What can change a path's split is hard-linking (an optimiser adds
``.links`` entries) or unlinking (a GC drops ``.links`` entries), and both change ``.links``'s
mtime: then the whole cache is dropped.  A re-registered path gets a new id, so a stale
entry is never matched.  Unreadable or unwritable caches are ignored (``du`` still works).
"""

from __future__ import annotations

import marshal
import os

from ...fs.atomic import write_file_atomic

Entry = tuple[str, int, tuple[tuple[int, int, int], ...]]


def _stamp(real_store_dir: str) -> int:
    try:
        return os.stat(os.path.join(real_store_dir, ".links")).st_mtime_ns
    except FileNotFoundError:
        return 0


class DiskCache:
    def __init__(self, state_dir: str, real_store_dir: str) -> None:
        self.file = os.path.join(state_dir, "storekeeper", "du-cache")
        self.stamp = _stamp(real_store_dir)
        self.paths: dict[int, Entry] = {}
        self.dirty = False
        try:
            with open(self.file, "rb") as f:
                data = marshal.load(f)
            if isinstance(data, dict) and data.get("links") == self.stamp:
                self.paths = data["paths"]
        except (OSError, EOFError, ValueError, TypeError, KeyError):
            pass

    def get(self, i: int, path: str) -> Entry | None:
        e = self.paths.get(i)
        return e if e is not None and e[0] == path else None

    def put(self, i: int, entry: Entry) -> None:
        self.paths[i] = entry
        self.dirty = True

    def save(self, live: set[int]) -> None:
        """Write what was measured (only paths still valid)."""
        if not self.dirty and all(i in live for i in self.paths):
            return
        keep = {i: e for i, e in self.paths.items() if i in live}
        try:
            os.makedirs(os.path.dirname(self.file), exist_ok=True)
            write_file_atomic(self.file, marshal.dumps({"links": self.stamp, "paths": keep}), 0o600)
        except OSError:
            pass
