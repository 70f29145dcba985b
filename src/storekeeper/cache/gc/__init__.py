"""Fleet cache GC (issue 18; the protocol and why it is race-free: docs/CACHE-GC.md).

No server, no database: roots, leases and condemned sets are objects in the cache
itself, so writers and collectors on many machines coordinate through any
``file://`` directory or ``s3://`` bucket.

* :mod:`.objects`: the objects' keys and JSON, the injectable clock, the timings;
* :mod:`.roots`: named roots, TTLs, keep-last-N, ``pin``/``unpin``;
* :mod:`.leases`: a writer's lease and the wait for running collections;
* :mod:`.writer`: ``copy --to`` as a lease-holding writer (``--root``);
* :mod:`.collect`: a collection, step by step;
* :mod:`.audit`: broken closures found, and repaired where a store has the paths.
"""

from __future__ import annotations

from .audit import AuditReport, audit
from .collect import Collector, GcReport
from .leases import Lease, wait_collections
from .objects import Clock, FakeClock, Timings
from .roots import live_roots, pin, put_root, read_roots, unpin
from .writer import copy_with_lease, takes_part

__all__ = ["AuditReport", "Clock", "Collector", "FakeClock", "GcReport", "Lease", "Timings",
           "audit", "copy_with_lease", "live_roots", "pin", "put_root", "read_roots",
           "takes_part", "unpin", "wait_collections"]
