"""Read-only answers about liveness: root listings, why a path is alive, what a GC would free.

Nothing here deletes or locks anything: these run beside a GC and report a
consistent snapshot of the DB plus what the file system shows.
"""

from __future__ import annotations

import os
import stat
from typing import Callable, Iterable, Iterator

from ... import fs
from ...api import DEAD, GCDryRun, GCOptions
from ...formats.storepath import StorePath
from ..roots import CENSORED, registrations
from . import rootlist
from .graph import Graph
from .rootlist import RootInfo


def list_roots(store, sizes: bool = True) -> list[RootInfo]:
    """Every root (:func:`.rootlist.list_roots`), with its target's closure size (NAR
    bytes) unless ``sizes`` is false."""
    if not sizes:
        return rootlist.list_roots(store)
    cfg = store.settings

    def closure_sizes(targets: list[int]) -> dict[int, int]:
        return _closure_bytes(Graph(store.db), targets, cfg.keep_outputs, cfg.keep_derivations)
    return rootlist.list_roots(store, closure_sizes)


def _closure_bytes(graph: Graph, targets: list[int], keep_outputs: bool,
                   keep_derivations: bool) -> dict[int, int]:
    """Each target's closure size (NAR bytes): one pass for all when the ids allow
    (:meth:`Graph.closure_sums`), else a walk per target."""
    if not targets:
        return {}
    nar_sizes = graph.nar_sizes()
    sums = graph.closure_sums(targets, nar_sizes, keep_outputs, keep_derivations)
    if sums is None:
        sums = [sum(map(nar_sizes.__getitem__, graph.closure_ids([i], keep_outputs, keep_derivations)))
                for i in targets]
    return dict(zip(targets, sums))


def gc_dry_run(store, options: GCOptions | None = None,
               log: Callable[[str], None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> GCDryRun:
    """What a collection would delete now (``DEAD``; nothing changes) and what that frees."""
    cfg = store.settings
    opts = options or GCOptions(action=DEAD, keep_outputs=cfg.keep_outputs,
                                keep_derivations=cfg.keep_derivations)
    assert opts.action == DEAD
    paths = store.collect_garbage(opts, log, progress).paths
    disk, apparent = bytes_freed_by(store, paths)
    return GCDryRun(paths, disk, apparent)


def bytes_freed_by(store, dead_paths: list[str]) -> tuple[int, int]:
    """(disk bytes, apparent bytes) that deleting ``dead_paths`` would free, hard links counted.

    An inode is freed when every link to it goes: the links inside the dead
    paths, plus its ``.links`` pool entry, which the GC drops once nothing
    else links to it.
    """
    pool: set[tuple[int, int]] = set()
    links_dir = os.path.join(store.real_store_dir, ".links")
    try:
        lfd = fs.open_dir(links_dir)
    except FileNotFoundError:
        pass
    else:
        try:
            dev = os.fstat(lfd).st_dev  # (pool entries are files on the pool's own device)
            pool.update((dev, e.inode()) for e in fs.entries(lfd))
        finally:
            os.close(lfd)
    seen: dict[tuple[int, int], list] = {}  # inode -> [links inside dead set, nlink, blocks, size]
    disk = 0
    for p in dead_paths:
        real = os.path.join(store.real_store_dir, os.path.basename(p))
        for st in _lstats(real):
            if stat.S_ISDIR(st.st_mode):
                disk += st.st_blocks * 512
                continue
            rec = seen.setdefault((st.st_dev, st.st_ino), [0, st.st_nlink, st.st_blocks * 512, st.st_size])
            rec[0] += 1
    apparent = 0
    for key, (inside, nlink, blocks, size) in seen.items():
        if inside == nlink or (inside == nlink - 1 and key in pool):
            disk += blocks
            apparent += size
    return disk, apparent


def _lstats(top: str) -> Iterator[os.stat_result]:
    """lstat of every entry of the tree at ``top`` (none if it is gone)."""
    try:
        for ev, node in fs.walk(top):
            if ev != fs.LEAVE:
                yield node.lstat()
    except FileNotFoundError:
        return


def roots_overview(store, uid: int, hide_link: Callable[[RootInfo], bool] = lambda r: False) -> dict:
    """The roots and the settings that decide them, as one JSON-able dict (``storekeeper
    roots``); ``hide_link`` says which links the asker may not see."""
    cfg = store.settings
    roots = []
    for info in list_roots(store):
        obj = info.to_json()
        if hide_link(info):
            obj["link"] = CENSORED
        roots.append(obj)
    return {"uid": uid, "runtimeRoots": cfg.runtime_roots, "runtimeRootLease": cfg.runtime_root_lease,
            "indirectRootGrace": cfg.indirect_root_grace, "roots": roots}


class LocalUserRoots:
    """The same requests on a local store, for the user running this process."""

    def __init__(self, store) -> None:
        self.store = store
        self.uid = os.getuid()

    def register(self, entries: Iterable[tuple[str, StorePath]]) -> list[str]:
        return registrations.register_roots(self.store, self.uid, entries)

    def unregister(self, names: Iterable[str]) -> list[str]:
        return registrations.unregister_roots(self.store, self.uid, names)

    def report_runtime(self, lease_name: str, paths: Iterable[str]) -> tuple[int, int]:
        return registrations.report_runtime_roots(self.store, self.uid, lease_name, paths)

    def overview(self) -> dict:
        return roots_overview(self.store, self.uid)
