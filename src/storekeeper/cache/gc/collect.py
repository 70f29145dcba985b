"""A collection of a fleet cache (docs/CACHE-GC.md, "The collector", C1–C6).

:class:`Collector` runs the steps one by one (tests interleave them with writers and
other collectors): :meth:`~Collector.mark`, :meth:`~Collector.publish`,
:meth:`~Collector.settle`, :meth:`~Collector.reread`, :meth:`~Collector.sweep`,
:meth:`~Collector.finish`; :meth:`~Collector.run` does all of them.

What it keeps:

* narinfos are deleted referrers first, so no remaining narinfo ever names a
  deleted one (I1), and only those dead at the mark *and* not reachable from a
  root or lease read after the settle period;
* a NAR is deleted only when no remaining narinfo and no lease names it, and
  (when a narinfo named it) ``nar_grace`` after that narinfo went (I2 for clients
  holding a cached narinfo);
* nothing is deleted after the condemned set's deadline (less the clock skew),
  which is when writers stop waiting for it.
"""

from __future__ import annotations

import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ..backends import Backend, Entry
from .objects import (
    CONDEMNED,
    DEFERRED,
    LEASES,
    ROOTS,
    Clock,
    Hook,
    Record,
    Timings,
    is_temp,
    new_id,
    no_hook,
    owner_name,
    read_records,
)
from .roots import live_roots

_NARINFO = re.compile(r"[0-9a-df-np-sv-z]{32}\.narinfo")
_LISTING = re.compile(r"[0-9a-df-np-sv-z]{32}\.ls")
#: narinfos read (in threads) per chunk of the mark
READ_CHUNK = 1024
#: keys deleted per request (S3 DeleteObjects takes 1000)
DELETE_BATCH = 1000

#: progress(step, done, total)
GcProgress = Callable[[str, int, int], None]


@dataclass(slots=True)
class Node:
    """What the mark needs of one narinfo (held for every narinfo: kept small)."""

    base: str               # store path basename
    refs: tuple[str, ...]   # hash parts of its references (itself excluded)
    url: str                # NAR key


@dataclass
class GcReport:
    narinfos: int = 0            # listed
    nars: int = 0
    live: int = 0
    narinfos_deleted: int = 0
    nars_deleted: int = 0
    others_deleted: int = 0      # .ls listings, temp files
    bytes_freed: int = 0
    nars_deferred: int = 0       # NARs that wait for the grace period
    bytes_deferred: int = 0
    spared: int = 0              # condemned at the mark, spared at the re-read
    unreadable: list[str] = field(default_factory=list)
    stopped: str = ""            # "deadline", "max-freed" or ""
    dry_run: bool = False

    def to_json(self) -> dict:
        return {"narinfos": self.narinfos, "nars": self.nars, "live": self.live,
                "narinfosDeleted": self.narinfos_deleted, "narsDeleted": self.nars_deleted,
                "othersDeleted": self.others_deleted, "bytesFreed": self.bytes_freed,
                "narsDeferred": self.nars_deferred, "bytesDeferred": self.bytes_deferred,
                "spared": self.spared, "unreadable": self.unreadable, "stopped": self.stopped,
                "dryRun": self.dry_run}


def parse_node(data: bytes) -> Node | None:
    """StorePath, URL and References of a narinfo (None when they are not there)."""
    base = url = ""
    refs: list[str] = []
    for line in data.decode("utf-8", "replace").split("\n"):
        name, sep, value = line.partition(": ")
        if not sep:
            continue
        if name == "StorePath":
            base = value.rsplit("/", 1)[-1]
        elif name == "URL":
            url = value.removeprefix("./")
        elif name == "References":
            refs = [r[:32] for r in value.split()]
    if len(base) < 34 or not url:
        return None
    return Node(base, tuple(sys.intern(r) for r in refs if r != base[:32]), sys.intern(url))


class Collector:
    """One collection; see the module docstring for what it keeps."""

    def __init__(self, backend: Backend, timings: Timings | None = None,
                 clock: Clock | None = None, hook: Hook = no_hook, threads: int = 1,
                 max_freed: int | None = None, progress: GcProgress | None = None) -> None:
        self.backend = backend
        self.timings = timings or Timings()
        self.clock = clock or Clock()
        self.hook = hook
        self.threads = max(1, threads)
        self.max_freed = max_freed
        self.progress = progress
        self.id = new_id(self.clock)
        self.report = GcReport()
        self.graph: dict[str, Node] = {}
        self.narinfo_entries: dict[str, Entry] = {}
        self.nar_entries: dict[str, Entry] = {}
        self.listings: dict[str, Entry] = {}
        self.temps: list[Entry] = []
        self.deferred: list[Record] = []
        self.live: set[str] = set()
        self.dead: set[str] = set()            # hash parts of narinfos to delete
        self.dead_nars: set[str] = set()       # NAR keys to delete in this run
        self.defer_nars: set[str] = set()      # NARs of dead narinfos that wait for the grace
        self.deleted: set[str] = set()         # hash parts deleted
        self.condemned_key = CONDEMNED + self.id
        self.deadline = 0.0
        self.published = False
        self.fetched: set[str] = set()         # narinfos read after the listing (not listed)
        self.stale: list[str] = []             # dead writers' leases, dead collections' sets

    # --- C1 ------------------------------------------------------------------------------

    def mark(self) -> GcReport:
        now = self.clock.now()
        t = self.timings
        roots, leases, deferred, condemned = [], [], [], []
        for e in self.backend.list_keys(""):
            k = e.key
            if is_temp(k):
                self.temps.append(e)
            elif _NARINFO.fullmatch(k):
                self.narinfo_entries[k[:32]] = e
            elif _LISTING.fullmatch(k):
                self.listings[k[:32]] = e
            elif k.startswith("nar/"):
                self.nar_entries[k] = e
            elif k.startswith(ROOTS):
                roots.append(k)
            elif k.startswith(LEASES):
                leases.append(k)
            elif k.startswith(DEFERRED):
                deferred.append(k)
            elif k.startswith(CONDEMNED):
                condemned.append(k)
        self.deferred = read_records(self.backend, DEFERRED, deferred)
        lease_recs = read_records(self.backend, LEASES, leases)
        seeds = self._seeds(read_records(self.backend, ROOTS, roots), lease_recs, now)
        # leftovers of writers and collectors that died: a lease past its expiry is never
        # renewed (Lease.renew), a condemned set past its deadline deletes nothing more
        gone = now - t.skew - t.margin
        self.stale = [r.key for r in lease_recs if r.expires is not None and r.expires < gone]
        self.stale += [r.key for r in read_records(self.backend, CONDEMNED, condemned)
                       if r.deadline is not None and r.deadline < gone]
        self._read_graph()
        self.live = self._closure(seeds[0])
        self.dead = set(self.graph) - self.live - self.fetched
        live_urls = {self.graph[h].url for h in self.live} | seeds[1]
        dead_urls = {self.graph[h].url for h in self.dead}
        deferred_at: dict[str, float] = {}
        for rec in self.deferred:
            for key in rec.nars:
                deferred_at[key] = min(deferred_at.get(key, rec.created), rec.created)
        for key, e in self.nar_entries.items():
            if key in live_urls:
                continue
            if key in dead_urls:
                if t.nar_grace > 0:
                    continue  # deferred once its narinfos are gone (sweep)
                self.dead_nars.add(key)
            elif key in deferred_at:
                if deferred_at[key] + t.nar_grace <= now:
                    self.dead_nars.add(key)
            elif e.mtime + t.temp_grace <= now:
                self.dead_nars.add(key)  # never named by a narinfo: a half-finished upload
        self.temps = [e for e in self.temps if e.mtime + t.temp_grace <= now]
        r = self.report
        r.narinfos, r.nars, r.live = len(self.narinfo_entries), len(self.nar_entries), len(self.live)
        self.hook("gc.marked", self)
        return r

    def _seeds(self, roots: list[Record], leases: list[Record], now: float
               ) -> tuple[set[str], set[str]]:
        """(hash parts to keep, NAR keys to keep) from roots and leases that count at ``now``."""
        live, _ = live_roots(roots, now, self.timings.skew)
        live_leases = [r for r in leases
                       if r.expires is not None and r.expires + self.timings.skew > now]
        hashes = {p[:32] for r in live + live_leases for p in r.paths}
        nars = {n for r in live_leases for n in r.nars}
        return hashes, nars

    def _read_graph(self) -> None:
        keys = sorted(self.narinfo_entries)

        def read(h: str) -> tuple[str, bytes | None]:
            return h, self.backend.get(h + ".narinfo")
        total, done = len(keys), 0
        pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        try:
            for i in range(0, total, READ_CHUNK):  # a chunk at a time: bounded memory
                chunk = keys[i:i + READ_CHUNK]
                results = pool.map(read, chunk) if pool is not None else map(read, chunk)
                for h, data in results:
                    done += 1
                    if data is None:
                        del self.narinfo_entries[h]  # deleted since the listing
                        continue
                    node = parse_node(data)
                    if node is None or node.base[:32] != h:
                        self.report.unreadable.append(h + ".narinfo")  # never deleted by us
                        continue
                    self.graph[sys.intern(h)] = node
                if self.progress:
                    self.progress("mark", done, total)
        finally:
            if pool is not None:
                pool.shutdown()
        if self.progress:
            self.progress("mark", total, total)

    def _closure(self, seeds: set[str]) -> set[str]:
        """Hash parts reachable from ``seeds``.  A root names only its top paths; those (and
        what they refer to) may have been written after the listing, so a narinfo the
        graph lacks is read now: a root is stored after its closure's narinfos."""
        out: set[str] = set()
        stack = list(seeds)
        while stack:
            h = stack.pop()
            if h in out:
                continue
            if h not in self.graph:
                data = self.backend.get(h + ".narinfo")
                node = parse_node(data) if data is not None else None
                if node is None or node.base[:32] != h:
                    continue
                self.graph[h] = node
                self.fetched.add(h)
            out.add(h)
            stack.extend(r for r in self.graph[h].refs if r not in out)
        return out

    def would_free(self) -> tuple[int, int]:
        """(bytes this run deletes, bytes of NARs it defers) if nothing is spared."""
        now_b = sum(self.narinfo_entries[h].size + (self.listings[h].size if h in self.listings else 0)
                    for h in self.dead)
        now_b += sum(self.nar_entries[k].size for k in self.dead_nars)
        now_b += sum(e.size for e in self.temps)
        deferred = self._nars_of(self.dead) - self.dead_nars if self.timings.nar_grace > 0 else set()
        return now_b, sum(self.nar_entries[k].size for k in deferred if k in self.nar_entries)

    def _nars_of(self, hashes: set[str]) -> set[str]:
        return {self.graph[h].url for h in hashes} - {self.graph[h].url for h in set(self.graph) - hashes}

    # --- C2, C3, C4 ------------------------------------------------------------------------

    def publish(self) -> None:
        now = self.clock.now()
        self.deadline = now + self.timings.settle + self.timings.sweep_budget
        rec = Record(self.condemned_key, narinfos=sorted(self.dead), nars=sorted(self.dead_nars),
                     owner=owner_name(), created=now, deadline=self.deadline)
        self.backend.put(self.condemned_key, rec.to_json())
        self.published = True
        self.hook("gc.published", self)

    def settle(self) -> None:
        self.clock.sleep(self.timings.settle)

    def reread(self) -> None:
        now = self.clock.now()
        hashes, nars = self._seeds(read_records(self.backend, ROOTS),
                                   read_records(self.backend, LEASES), now)
        reachable = self._closure(hashes)
        spared = reachable & self.dead
        self.report.spared = len(spared)
        self.dead -= spared
        self.live |= reachable
        keep = nars | {self.graph[h].url for h in self.live}
        self.dead_nars -= keep
        self.hook("gc.reread", self)

    # --- C5, C6 --------------------------------------------------------------------------

    def _may_delete(self) -> bool:
        if self.clock.now() >= self.deadline - self.timings.skew - self.timings.margin:
            self.report.stopped = "deadline"
            return False
        if self.max_freed is not None and self.report.bytes_freed >= self.max_freed:
            self.report.stopped = "max-freed"
            return False
        return True

    def _delete(self, keys: list[str], size: int) -> bool:
        if not self._may_delete():
            return False
        self.hook("gc.delete", keys)
        self.backend.delete_many(keys)
        self.report.bytes_freed += size
        return True

    def sweep(self) -> None:
        r = self.report
        referrers: dict[str, int] = {h: 0 for h in self.dead}
        for h in self.dead:
            for ref in self.graph[h].refs:
                if ref in referrers:
                    referrers[ref] += 1
        level = [h for h, n in referrers.items() if n == 0]
        total = len(self.dead)
        while level:                         # referrers first (Kahn's order by levels)
            level.sort()
            nxt: list[str] = []
            for i in range(0, len(level), DELETE_BATCH // 2):
                chunk = level[i:i + DELETE_BATCH // 2]
                keys = [h + ".narinfo" for h in chunk] + [h + ".ls" for h in chunk if h in self.listings]
                size = sum(self.narinfo_entries[h].size for h in chunk)
                size += sum(self.listings[h].size for h in chunk if h in self.listings)
                if not self._delete(keys, size):
                    return
                self.deleted.update(chunk)
                r.narinfos_deleted += len(chunk)
                r.others_deleted += sum(h in self.listings for h in chunk)
                if self.progress:
                    self.progress("sweep", r.narinfos_deleted, total)
                for h in chunk:
                    for ref in self.graph[h].refs:
                        if ref in referrers:
                            referrers[ref] -= 1
                            if referrers[ref] == 0:
                                nxt.append(ref)
            level = nxt
        remaining = {self.graph[h].url for h in set(self.graph) - self.deleted}
        gone = {self.graph[h].url for h in self.deleted} - remaining
        if self.timings.nar_grace > 0:
            self.defer_nars = gone - self.dead_nars
        nars = sorted(k for k in self.dead_nars if k not in remaining)
        for i in range(0, len(nars), DELETE_BATCH):
            chunk = nars[i:i + DELETE_BATCH]
            if not self._delete(chunk, sum(self.nar_entries[k].size for k in chunk)):
                return
            r.nars_deleted += len(chunk)
        temps = [e.key for e in self.temps]
        for i in range(0, len(temps), DELETE_BATCH):
            chunk = temps[i:i + DELETE_BATCH]
            if not self._delete(chunk, sum(e.size for e in self.temps[i:i + DELETE_BATCH])):
                return
            r.others_deleted += len(chunk)

    def finish(self) -> None:
        r = self.report
        now = self.clock.now()
        if self.defer_nars:
            rec = Record(DEFERRED + self.id, nars=sorted(self.defer_nars), owner=owner_name(),
                         created=now)
            self.backend.put(rec.key, rec.to_json())
            r.nars_deferred = len(self.defer_nars)
            r.bytes_deferred = sum(self.nar_entries[k].size for k in self.defer_nars
                                   if k in self.nar_entries)
        # a deferred record is done when none of its NARs still waits
        # (deleted now, named again by a narinfo, or gone)
        live_urls = {self.graph[h].url for h in set(self.graph) - self.deleted}
        done = [rec.key for rec in self.deferred
                if all(k in self.dead_nars or k in live_urls or k not in self.nar_entries
                       for k in rec.nars) and not r.stopped]
        done += [self.condemned_key] if self.published else []
        done += self.stale
        if done:
            self.backend.delete_many(done)
        self.hook("gc.done", self)

    def run(self, dry_run: bool = False) -> GcReport:
        self.mark()
        if dry_run:
            self.report.dry_run = True
            self.report.narinfos_deleted = len(self.dead)
            self.report.nars_deleted = len(self.dead_nars)
            self.report.others_deleted = len(self.temps) + sum(h in self.listings for h in self.dead)
            self.report.bytes_freed, self.report.bytes_deferred = self.would_free()
            return self.report
        if self.dead or self.dead_nars or self.temps:
            self.publish()
            self.settle()
            self.reread()
            self.sweep()
        self.finish()
        return self.report
