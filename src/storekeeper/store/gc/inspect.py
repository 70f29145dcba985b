"""Read-only answers about liveness: root listings, why a path is alive, what a GC would free.

Nothing here deletes or locks anything: these run beside a GC and report a
consistent snapshot of the DB plus what the file system shows.
"""

from __future__ import annotations

import os
import pwd
import stat
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ... import fs
from ...api import DEAD, GCDryRun, GCOptions
from ...formats.storepath import StorePath
from ..roots import CENSORED, Root, RootFinder, registrations
from .chain import Ancestry
from .graph import Graph


@dataclass
class RootInfo:
    kind: str
    link: str
    target: str  # "" for an unreadable indirect root that never resolved
    owner: str | None
    age_seconds: float | None
    closure_size: int | None  # NAR bytes of the target's closure (None: not computed)
    valid: bool
    uid: int | None = None
    first_missed: float | None = None  # indirect-unresolved: when it was first unreadable
    expires: float | None = None  # lease: end; indirect-unresolved: when it is dropped

    def to_json(self) -> dict:
        return {"kind": self.kind, "link": self.link, "target": self.target, "owner": self.owner,
                "ageSeconds": None if self.age_seconds is None else round(self.age_seconds),
                "closureSize": self.closure_size, "valid": self.valid, "uid": self.uid,
                "firstMissed": self.first_missed, "expires": self.expires}

    @classmethod
    def from_json(cls, obj: dict) -> "RootInfo":
        return cls(obj["kind"], obj["link"], obj["target"], obj.get("owner"), obj.get("ageSeconds"),
                   obj.get("closureSize", 0), obj.get("valid", False), obj.get("uid"),
                   obj.get("firstMissed"), obj.get("expires"))

    def detail(self) -> str:
        """What the kind alone does not say: when an unreadable root was first missed, when a
        lease ends."""
        def at(t: float) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC"
        if self.kind == "indirect-unresolved" and self.first_missed is not None:
            out = f"unreadable since {at(self.first_missed)}"
            return out + (f", kept until {at(self.expires)}" if self.expires else "")
        if self.kind == "lease" and self.expires is not None:
            return f"lease until {at(self.expires)}"
        return ""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _owner_and_age(root: Root, state_dir: str) -> tuple[str | None, float | None]:
    if root.uid is not None:
        return _user_name(root.uid), None
    if root.kind == "indirect-unresolved":
        return None, None
    if root.kind == "temp":
        probe = os.path.join(state_dir, "temproots", root.link[len("{temp:"):-1])
    elif root.kind == "runtime":
        probe = "/".join(root.link.split("/")[:3])  # /proc/<pid>
    else:
        probe = root.link
    try:
        st = os.lstat(probe)
    except OSError:
        return None, None
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return owner, max(0.0, time.time() - st.st_mtime)


def _finder(store) -> RootFinder:
    return RootFinder(store.store_dir, store.real_store_dir, store.state_dir,
                      indirect_grace=store.settings.indirect_root_grace,
                      runtime_mode=store.settings.runtime_roots)


def all_roots(store, finder: RootFinder | None = None) -> list[Root]:
    f = finder or _finder(store)
    return (list(f.permanent_roots()) + list(f.user_roots()) + list(f.runtime_roots())
            + list(f.temp_roots()))


def list_roots(store, sizes: bool = True) -> list[RootInfo]:
    """Every root, and the unreadable indirect roots that hold nothing (never resolved).

    ``sizes=False`` leaves every closure size 0 and reads no reference graph (what
    ``nix-store --gc --print-roots`` does: on a million paths the graph is most of
    the time)."""
    graph: Graph | _Validity = Graph(store.db) if sizes else _Validity(store.db)
    out = []
    finder = _finder(store)
    roots = all_roots(store, finder)
    unique = {(r, r.uid): r for r in roots}.values()
    cfg = store.settings
    ordered = sorted(unique, key=lambda r: (r.kind, r.link, r.path, r.uid or 0))
    ids = {r: graph.id_of_path(store.print_path(r.path)) for r in ordered}
    closure_bytes: dict[int, int] = {}  # per distinct target: many links share one
    if isinstance(graph, Graph):
        closure_bytes = _closure_bytes(graph, sorted({i for i in ids.values() if i is not None}),
                                       cfg.keep_outputs, cfg.keep_derivations)
    for r in ordered:
        p = store.print_path(r.path)
        i = ids[r]
        owner, age = _owner_and_age(r, store.state_dir)
        size = (closure_bytes.get(i, 0) if i else 0) if sizes else None
        out.append(RootInfo(r.kind, r.link, p, owner, age, size,
                            i is not None, r.uid, r.first_missed, r.expires))
    for u in finder.unresolved:
        if u["path"] is None:
            out.append(RootInfo("indirect-unresolved", u["link"], "", None, None, 0, False, None,
                                u["first_missed"], u["kept_until"]))
    return out


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


class _Validity:
    """Ids and names from the DB, one row at a time: what ``list_roots`` asks of a graph
    when it needs no sizes, and ``why_alive`` of the paths it names."""

    def __init__(self, db) -> None:
        self.db = db

    def id_of_path(self, path: str) -> int | None:
        row = self.db.conn.execute("select id from ValidPaths where path = ?", (path,)).fetchone()
        return row[0] if row else None

    def path_of_id(self, i: int) -> str:
        return self.db.conn.execute("select path from ValidPaths where id = ?", (i,)).fetchone()[0]


def why_alive(store, sp: StorePath,
              hide_link: Callable[[Root], bool] = lambda r: False) -> list[tuple[str, str]] | None:
    """The shortest chain root → … → ``sp``: [(root label, root path), (edge kind, path), …].

    ``hide_link`` says which roots' links the asker may not see: such a root is
    labelled ``{censored}`` (a visible root of the same path is preferred).
    """
    ids = _Validity(store.db)
    target = ids.id_of_path(store.print_path(sp))
    if target is None:
        return None
    roots: dict[int, str] = {}
    for r in all_roots(store):
        i = ids.id_of_path(store.print_path(r.path))
        if i is None:
            continue
        if hide_link(r):
            roots.setdefault(i, f"{CENSORED} ({r.kind} root)")
        elif roots.get(i, CENSORED).startswith(CENSORED):
            roots[i] = f"{r.link} ({r.kind} root)"
    s = store.settings
    chain = Ancestry(store.db, target, s.keep_outputs, s.keep_derivations).shortest_chain(roots)
    if chain is None:
        return None
    return [(label, ids.path_of_id(i)) for i, label in chain]


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
