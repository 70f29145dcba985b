"""``cache audit``: what a non-cooperating writer (a plain ``nix copy --to``) or a crash
can leave behind, found from one listing: narinfos whose NAR is missing (I2), narinfos
with a reference that has no narinfo (I1), roots naming a path the cache lacks.

Repair goes through the writer protocol (:func:`~.writer.copy_with_lease`): a path
the given store has is uploaded again when its narinfo is missing; a missing NAR is
uploaded again only when the store's path compresses to exactly the file the narinfo
names (narinfos are never rewritten, I3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ...api import Store
from ...formats.storepath import StorePath
from ..binary import BinaryCache
from .collect import Collector
from .objects import ROOTS, Clock, Timings, read_records
from .roots import live_roots, root_name
from .writer import copy_with_lease


@dataclass
class AuditReport:
    narinfos: int = 0
    missing_nars: list[tuple[str, str]] = field(default_factory=list)   # (path, NAR key)
    missing_refs: list[tuple[str, str]] = field(default_factory=list)   # (path, reference)
    missing_roots: list[tuple[str, str]] = field(default_factory=list)  # (root, path)
    unreadable: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return (len(self.missing_nars) + len(self.missing_refs) + len(self.missing_roots)
                + len(self.unreadable))

    def to_json(self) -> dict:
        return {"narinfos": self.narinfos, "missingNars": [list(x) for x in self.missing_nars],
                "missingReferences": [list(x) for x in self.missing_refs],
                "missingRootPaths": [list(x) for x in self.missing_roots],
                "unreadable": self.unreadable, "repaired": self.repaired,
                "unrepaired": self.unrepaired}


def audit(cache: BinaryCache, store: Store | None = None, repair: bool = False,
          timings: Timings | None = None, clock: Clock | None = None) -> AuditReport:
    clock = clock or Clock()
    timings = timings or Timings()
    c = Collector(cache.backend, timings, clock, threads=cache.threads)
    c.mark()  # only the listing and the graph: nothing is published or deleted
    rep = AuditReport(narinfos=len(c.graph), unreadable=list(c.report.unreadable))
    for _h, node in sorted(c.graph.items()):
        if node.url not in c.nar_entries:
            rep.missing_nars.append((node.base, node.url))
        for ref in node.refs:
            if ref not in c.graph:
                rep.missing_refs.append((node.base, ref))
    roots, _ = live_roots(read_records(cache.backend, ROOTS), clock.now(), timings.skew)
    for r in roots:
        for p in r.paths:
            if p[:32] not in c.graph:
                rep.missing_roots.append((root_name(r), p))
    if repair and store is not None:
        _repair(cache, store, c, rep, timings, clock)
    return rep


def _repair(cache: BinaryCache, store: Store, c: Collector, rep: AuditReport,
            timings: Timings, clock: Clock) -> None:
    sd = store.store_dir
    by_hash: dict[str, StorePath] = {}
    for base in [b for b, _ in rep.missing_nars] + [p for _, p in rep.missing_roots]:
        by_hash[base[:32]] = StorePath.from_base(base)
    wanted_refs = {ref for _, ref in rep.missing_refs}
    for h in wanted_refs:
        sp = store.query_path_from_hash_part(h)
        if sp is not None:
            by_hash[h] = sp
        else:
            rep.unrepaired.append(h)
    have = store.query_valid_paths(sorted(by_hash.values()))
    for h, sp in sorted(by_hash.items()):
        if sp not in have:
            rep.unrepaired.append(sp.base)
            continue
        if h in c.graph:  # narinfo there, NAR missing: only the identical file will do
            node = c.graph[h]
            prep = cache.prepare(sd, store.path_info(sp), store.dump_path(sp))
            if prep.narinfo.url != node.url:
                rep.unrepaired.append(sp.base)
                os.unlink(prep.tmp)
                continue
            cache.upload(prep)
            rep.repaired.append(sp.base)
        else:
            r = copy_with_lease(store, cache, [sp], timings=timings, clock=clock)
            rep.repaired.extend(p.base for p in r.copied)
