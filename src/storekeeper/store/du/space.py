"""Where the space goes: per GC root, the bytes only it keeps alive and the bytes it shares.

One pass over the reference graph, not one closure walk per root: every
distinct root target gets one bit, and each live path's *holder mask* (the
set of roots whose closure holds it) is the OR of its referrers' masks,
pushed along the edges in reverse post-order (a second pass until nothing
changes only when ``keep-outputs``/``keep-derivations`` edges make cycles).
Paths (and hard-linked inodes) are then grouped by mask; a root's closure is
the groups whose mask has its bit, its exclusive bytes the group whose mask is
its bit alone.  The work is O(edges) plus O(groups × roots per group), where
the groups are few (paths held by the same set of roots fall together).

Disk bytes are measured where the files are (``st_blocks``), each inode
counted once: a file hard-linked into several store paths (``optimise``, with
its ``.links`` entry) is one node of its own whose mask is the OR of the
paths holding it, so it is exclusive to a root only if every live path that
links it is.  ``nar=True`` skips the walk and counts ``narSize`` from the DB.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ... import fs
from ..gc.graph import Graph
from ..gc.rootlist import all_roots, owner_and_age
from .cache import DiskCache

#: how many of the largest paths each root (and the whole store) lists
TOP = 10


@dataclass
class PathSpace:
    path: str
    bytes: int  # disk bytes of its files (an inode linked twice inside it once), or narSize
    nar_size: int
    holders: int  # how many distinct root targets hold it
    #: the part counted in its holder group: its bytes less the inodes it shares with paths
    #: other roots hold (so a group's paths add up to at most the group's bytes)
    group_bytes: int = 0

    def to_json(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "narSize": self.nar_size,
                "holders": self.holders, "groupBytes": self.group_bytes}

    @classmethod
    def from_json(cls, o: dict) -> PathSpace:
        return cls(o["path"], o["bytes"], o["narSize"], o["holders"], o["groupBytes"])


@dataclass
class RootSpace:
    kind: str
    link: str
    target: str
    owner: str | None
    closure_bytes: int = 0
    exclusive_bytes: int = 0  # freed if this root (and any other link to its target) went
    closure_paths: int = 0
    exclusive_paths: int = 0
    largest: list[PathSpace] = field(default_factory=list)
    largest_exclusive: list[PathSpace] = field(default_factory=list)
    links: int = 1  # roots with the same target (a profile and its generation link): all must go

    @property
    def shared_bytes(self) -> int:
        return self.closure_bytes - self.exclusive_bytes

    def to_json(self) -> dict:
        return {"kind": self.kind, "link": self.link, "target": self.target, "owner": self.owner,
                "closureBytes": self.closure_bytes, "exclusiveBytes": self.exclusive_bytes,
                "sharedBytes": self.shared_bytes, "closurePaths": self.closure_paths,
                "exclusivePaths": self.exclusive_paths, "links": self.links,
                "largest": [p.to_json() for p in self.largest],
                "largestExclusive": [p.to_json() for p in self.largest_exclusive]}

    @classmethod
    def from_json(cls, o: dict) -> RootSpace:
        return cls(o["kind"], o["link"], o["target"], o["owner"], o["closureBytes"],
                   o["exclusiveBytes"], o["closurePaths"], o["exclusivePaths"],
                   [PathSpace.from_json(p) for p in o["largest"]],
                   [PathSpace.from_json(p) for p in o["largestExclusive"]], o["links"])


@dataclass
class Group:
    """Paths held by exactly the same roots (``holders``: indexes into the report's roots)."""
    holders: list[int]
    bytes: int = 0
    paths: int = 0
    largest: list[PathSpace] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"holders": self.holders, "bytes": self.bytes, "paths": self.paths,
                "largest": [p.to_json() for p in self.largest]}

    @classmethod
    def from_json(cls, o: dict) -> Group:
        return cls(o["holders"], o["bytes"], o["paths"], [PathSpace.from_json(p) for p in o["largest"]])


@dataclass
class SpaceReport:
    unit: str  # "disk" or "nar"
    roots: list[RootSpace]
    groups: list[Group]  # shared groups (two or more holders), largest first
    live_bytes: int
    live_paths: int
    largest: list[PathSpace]
    #: holder mask -> (bytes, paths), and each root entry's bit: what ``by_owner`` regroups
    masks: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)
    bits: list[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {"unit": self.unit, "liveBytes": self.live_bytes, "livePaths": self.live_paths,
                "exclusiveBytes": sum(r.exclusive_bytes for r in self._distinct()),
                "sharedBytes": sum(g.bytes for g in self.groups),
                "roots": [r.to_json() for r in self.roots],
                "shared": [g.to_json() for g in self.groups],
                "largest": [p.to_json() for p in self.largest]}

    def to_wire(self) -> dict:
        """What a daemon sends (ExtOp.SpaceReport): the JSON and what ``by_owner`` needs."""
        obj = self.to_json()
        obj["masks"] = [[m, b, p] for m, (b, p) in self.masks.items()]
        obj["bits"] = self.bits
        return obj

    @classmethod
    def from_wire(cls, o: dict) -> SpaceReport:
        return cls(o["unit"], [RootSpace.from_json(r) for r in o["roots"]],
                   [Group.from_json(g) for g in o["shared"]], o["liveBytes"], o["livePaths"],
                   [PathSpace.from_json(p) for p in o["largest"]],
                   {m: (b, p) for m, b, p in o["masks"]}, o["bits"])

    def _distinct(self) -> list[RootSpace]:
        seen: set[str] = set()
        out = []
        for r in self.roots:
            if r.target not in seen:
                seen.add(r.target)
                out.append(r)
        return out


def holder_masks(graph: Graph, targets: list[int], keep_outputs: bool,
                 keep_derivations: bool) -> dict[int, int]:
    """Every path reachable from ``targets`` → the bit set of the targets whose closure has it."""
    def succ(i: int) -> list[int]:
        nxt = [j for j in graph.refs.get(i, ()) if j != i]
        if keep_derivations and i in graph.deriver:
            nxt.append(graph.deriver[i])
        if keep_outputs:
            nxt.extend(graph.outputs.get(i, ()))
        return nxt

    # iterative DFS: post-order, and whether any edge closes a cycle
    state: dict[int, int] = {}  # 1 on the stack, 2 done
    post: list[int] = []
    cyclic = False
    for t in targets:
        if t in state:
            continue
        state[t] = 1
        stack = [(t, iter(succ(t)))]
        while stack:
            i, it = stack[-1]
            for j in it:
                s = state.get(j)
                if s is None:
                    state[j] = 1
                    stack.append((j, iter(succ(j))))
                    break
                if s == 1:
                    cyclic = True
            else:
                state[i] = 2
                post.append(i)
                stack.pop()
    mask = dict.fromkeys(post, 0)
    for bit, t in enumerate(targets):
        mask[t] |= 1 << bit
    order = post[::-1]
    edges = {i: succ(i) for i in order}
    while True:
        changed = False
        for i in order:
            m = mask[i]
            for j in edges[i]:
                mj = mask[j]
                if mj | m != mj:
                    mask[j] = mj | m
                    changed = True
        if not cyclic or not changed:
            return mask


#: processes measuring the store's files (at most; fewer for a small store)
WALKERS = 2


def measure(real_store_dir: str, bases: list[str]) -> list[fs.Usage]:
    """Disk usage of the store paths ``bases`` (names in the store dir), in order: one
    fd-relative, no-follow walk each, spread over :data:`WALKERS` processes."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    dfd = fs.open_dir(real_store_dir)
    try:
        return fs.usages(bases, dfd, max(1, min(WALKERS, cpus)))
    finally:
        os.close(dfd)


def _bits(m: int) -> Iterable[int]:
    while m:
        low = m & -m
        yield low.bit_length() - 1
        m ^= low


def compute(store, nar: bool = False, top: int = TOP,
            progress: Callable[[int, int], None] | None = None,
            use_cache: bool = True, hide: Callable[[Any], bool] | None = None) -> SpaceReport:
    """The space report of ``store`` (a LocalStore) now; read-only but for the measurement
    cache (:mod:`.cache`).  ``hide(root)``: roots whose link the asker may not see (a
    daemon's untrusted client) are listed as ``{censored}``, their bytes still counted."""
    cfg = store.settings
    graph = Graph(store.db)
    nar_size = dict(store.db.conn.execute("select id, coalesce(narSize, 0) from ValidPaths"))
    roots = all_roots(store)
    unique = sorted({(r, r.uid): r for r in roots}.values(),
                    key=lambda r: (r.kind, r.link, r.path, r.uid or 0))
    bit_of: dict[int, int] = {}
    targets: list[int] = []
    entries = []
    for r in unique:
        i = graph.id_of.get(store.print_path(r.path))
        if i is None:
            continue
        if i not in bit_of:
            bit_of[i] = len(targets)
            targets.append(i)
        entries.append((r, i))
    mask = holder_masks(graph, targets, cfg.keep_outputs, cfg.keep_derivations)

    size: dict[int, int] = {}  # a path's bytes, its hard-linked inodes included
    own_of: dict[int, int] = {}  # its singly-linked entries only (the inodes count apart)
    inode_bytes: dict[tuple[int, int], int] = {}
    inode_mask: dict[tuple[int, int], int] = {}
    linked_of: dict[int, list[tuple[int, int]]] = {}
    if nar:
        size = {i: nar_size.get(i, 0) for i in mask}
    else:
        cache = DiskCache(store.state_dir, store.real_store_dir) if use_cache else None
        measured: dict[int, fs.Usage] = {}
        walk: list[int] = []
        for i in mask:
            entry = cache.get(i, graph.path_of[i]) if cache is not None else None
            if entry is None:
                walk.append(i)
            else:
                measured[i] = (entry[1], entry[2])
        if walk:
            if progress is not None:
                progress(len(measured), len(mask))
            got = measure(store.real_store_dir, [os.path.basename(graph.path_of[i]) for i in walk])
            for i, u in zip(walk, got):
                measured[i] = u
                if cache is not None:
                    cache.put(i, (graph.path_of[i], u[0], u[1]))
        for i, m in mask.items():
            own, inodes = measured[i]
            b = own
            if inodes:
                linked = []
                for dev, ino, nb in inodes:
                    key = (dev, ino)
                    inode_bytes[key] = nb
                    inode_mask[key] = inode_mask.get(key, 0) | m
                    linked.append(key)
                    b += nb
                linked_of[i] = linked
            size[i] = b
            own_of[i] = own
        if progress is not None:
            progress(len(mask), len(mask))
        if cache is not None:
            cache.save(set(graph.path_of))

    # group by holder mask: bytes counted once (paths' own bytes + each inode once)
    g_bytes: dict[int, int] = {}
    g_paths: dict[int, int] = {}
    g_top: dict[int, list[tuple[int, int]]] = {}
    for i, m in mask.items():
        counted = nar_size.get(i, 0) if nar else own_of[i]
        g_bytes[m] = g_bytes.get(m, 0) + counted
        g_paths[m] = g_paths.get(m, 0) + 1
        h = g_top.setdefault(m, [])
        item = (size[i], -i)
        if len(h) < top:
            heapq.heappush(h, item)
        elif item > h[0]:
            heapq.heapreplace(h, item)
    for key, m in inode_mask.items():
        g_bytes[m] = g_bytes.get(m, 0) + inode_bytes[key]
        g_paths.setdefault(m, 0)
        g_top.setdefault(m, [])

    def space(i: int) -> PathSpace:  # (only for the few paths listed)
        m = mask[i]
        in_group = (nar_size.get(i, 0) if nar else own_of[i]) + sum(
            inode_bytes[k] for k in linked_of.get(i, ()) if inode_mask[k] == m)
        return PathSpace(graph.path_of[i], size[i], nar_size.get(i, 0), bin(m).count("1"), in_group)

    n = len(targets)
    closure_b = [0] * n
    closure_p = [0] * n
    tops: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for m, b in g_bytes.items():
        for bit in _bits(m):
            closure_b[bit] += b
            closure_p[bit] += g_paths[m]
            h = tops[bit]
            for item in g_top[m]:
                if len(h) < top:
                    heapq.heappush(h, item)
                elif item > h[0]:
                    heapq.heapreplace(h, item)

    def ranked(h: list[tuple[int, int]]) -> list[PathSpace]:
        return [space(-neg) for _, neg in sorted(h, reverse=True)]

    links_per_target: dict[int, int] = {}
    for _, i in entries:
        links_per_target[i] = links_per_target.get(i, 0) + 1
    out_roots = []
    names: dict[int, str] = {}
    for r, i in entries:
        bit = bit_of[i]
        owner, _age = owner_and_age(r, store.state_dir, names)
        link = "{censored}" if hide is not None and hide(r) else r.link
        out_roots.append(RootSpace(
            r.kind, link, graph.path_of[i], owner, closure_b[bit], g_bytes.get(1 << bit, 0),
            closure_p[bit], g_paths.get(1 << bit, 0), ranked(tops[bit]),
            ranked(g_top.get(1 << bit, [])), links_per_target[i]))
    # a group's holders name the first root entry of each target
    first_entry: dict[int, int] = {}
    for k, (_, i) in enumerate(entries):
        first_entry.setdefault(bit_of[i], k)
    groups = [Group([first_entry[b] for b in _bits(m)], g_bytes[m], g_paths[m], ranked(g_top[m]))
              for m in g_bytes if m & (m - 1)]
    groups.sort(key=lambda g: (-g.bytes, g.holders))
    every: list[tuple[int, int]] = []
    for h in g_top.values():
        for item in h:
            if len(every) < top:
                heapq.heappush(every, item)
            elif item > every[0]:
                heapq.heapreplace(every, item)
    return SpaceReport("nar" if nar else "disk", out_roots, groups, sum(g_bytes.values()),
                       len(mask), ranked(every), {m: (b, g_paths[m]) for m, b in g_bytes.items()},
                       [bit_of[i] for _, i in entries])


def by_owner(report: SpaceReport) -> list[dict]:
    """Per owner of roots: the bytes their roots hold together, and the bytes only their
    roots hold (freed if all of that owner's roots went)."""
    owner_mask: dict[str, int] = {}
    for r, bit in zip(report.roots, report.bits):
        o = r.owner or "-"
        owner_mask[o] = owner_mask.get(o, 0) | 1 << bit
    out: list[dict[str, Any]] = []
    for o, um in sorted(owner_mask.items()):
        held = [v for m, v in report.masks.items() if m & um]
        only = [v for m, v in report.masks.items() if m & um and not m & ~um]
        out.append({"owner": o, "roots": sum(1 for r in report.roots if (r.owner or "-") == o),
                    "closureBytes": sum(b for b, _ in held), "closurePaths": sum(p for _, p in held),
                    "exclusiveBytes": sum(b for b, _ in only),
                    "exclusivePaths": sum(p for _, p in only)})
    out.sort(key=lambda d: -d["closureBytes"])
    return out
