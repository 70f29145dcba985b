"""Writers' leases and the wait for running collections (docs/CACHE-GC.md, W1–W7).

:class:`Lease` keeps the writer's side of the protocol: a path or NAR is relied on
(skipped because present, or deduplicated) only once a lease naming it has been
*stored* and the condemned sets were read *after* that (:func:`wait_collections`);
a lease with less than ``margin`` left is never renewed in place, because a
collection may already have ignored it: the writer must start again (re-validate).
"""

from __future__ import annotations

import threading
from typing import Iterable

from ..backends import Backend
from .objects import (
    CONDEMNED,
    LEASES,
    Clock,
    Hook,
    Record,
    Timings,
    new_id,
    no_hook,
    owner_name,
    read_records,
)


class Lease:
    """One writer's lease object ``gc/leases/<id>``."""

    def __init__(self, backend: Backend, timings: Timings, clock: Clock,
                 hook: Hook = no_hook, owner: str | None = None) -> None:
        self.backend = backend
        self.timings = timings
        self.clock = clock
        self.hook = hook
        self.key = LEASES + new_id(clock)
        self.owner = owner or owner_name()
        self.paths: set[str] = set()
        self.nars: set[str] = set()
        self.expires = 0.0
        self._lock = threading.RLock()  # the renewer thread puts too
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self) -> None:
        # the expiry counts from before the put: the writer never believes in more time
        # than the collectors that read it
        with self._lock:
            now = self.clock.now()
            expires = now + self.timings.lease_ttl
            rec = Record(self.key, sorted(self.paths), sorted(self.nars), owner=self.owner,
                         created=now, expires=expires)
            self.backend.put(self.key, rec.to_json())
            self.expires = expires

    def take(self, paths: Iterable[str]) -> None:
        """W1: the lease names ``paths`` (basenames) once this returns."""
        self.paths = set(paths)
        self._put()
        self.hook("lease.taken", self)

    def add_nars(self, keys: Iterable[str]) -> None:
        """W4: the lease names these NAR keys once this returns."""
        keys = set(keys)
        with self._lock:
            if keys - self.nars:
                self.nars |= keys
                self._put()

    def lapsed(self) -> bool:
        """True when a collection may have ignored this lease (or will before a step of
        ``margin`` ends): the writer must start again under a new lease."""
        return self.clock.now() + self.timings.margin + self.timings.skew > self.expires

    def renew(self) -> bool:
        """Extend the lease, unless it lapsed (then False: renewing would hide the gap)."""
        if self.lapsed():
            return False
        self._put()
        return True

    def start_renewing(self) -> None:
        """Renew every ``lease_ttl / 3`` in a thread, until :meth:`drop` (real time)."""
        def loop() -> None:
            while not self._stop.wait(self.timings.renew):
                try:
                    if not self.renew():
                        return
                except Exception:  # the writer's W5 check notices the lapse
                    return
        self._thread = threading.Thread(target=loop, name="lease-renewer", daemon=True)
        self._thread.start()

    def drop(self) -> None:
        """W7: the writer no longer relies on anything through this lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self.backend.delete_many([self.key])


def running_collections(backend: Backend, clock: Clock, timings: Timings) -> list[Record]:
    """Condemned sets of collections that may still delete (deadline not passed)."""
    now = clock.now()
    return [r for r in read_records(backend, CONDEMNED)
            if r.deadline is not None and now < r.deadline + timings.skew]


def wait_collections(backend: Backend, clock: Clock, timings: Timings,
                     narinfos: Iterable[str] = (), nars: Iterable[str] = (),
                     hook: Hook = no_hook) -> int:
    """W2: return once no running collection condemns any of ``narinfos`` (hash parts) or
    ``nars`` (keys); the number of waits.  Called after the lease naming them is stored."""
    want_h, want_n = set(narinfos), set(nars)
    waits = 0
    while True:
        hits = [r for r in running_collections(backend, clock, timings)
                if want_h.intersection(r.narinfos) or want_n.intersection(r.nars)]
        if not hits:
            return waits
        waits += 1
        hook("writer.waiting", hits)
        clock.sleep(timings.poll)
