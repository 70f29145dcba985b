"""Read-only inspection over the worker protocol, storekeeper's own operations
(:class:`~storekeeper.formats.wire.ExtOp` 1200–1203): ``storekeeper stats``,
``gc --dry-run``, ``why-alive`` and ``du`` through a daemon (``roots`` is ListRoots,
:mod:`.user_roots`).

Any client may ask (Nix lets any client collect garbage and list the roots).
What an untrusted one sees is what FindRoots shows it: store paths, sizes and
the figures of the ``.links`` pool, never the links of roots it may not see
(:func:`~.user_roots.may_see`: others' registrations and leases, temp and
runtime roots), which are labelled ``{censored}``.
"""

from __future__ import annotations

import json

from ...formats.wire import ExtOp, Verbosity
from ...store.du import compute
from ...store.gc.chain import why_alive
from ...store.gc.inspect import gc_dry_run
from ...store.optimise import pool_stats
from ..registry import invalid, op
from ..session import Session
from .user_roots import may_see


@op(ExtOp.StoreStats)
def store_stats(s: Session) -> None:
    s.start_work()
    stats = pool_stats(s.store)
    s.stop_work()
    s.w.string(json.dumps(stats.to_json()))


@op(ExtOp.GCDryRun)
def dry_run(s: Session) -> None:
    s.start_work()
    # (the collector holds gc.lock while it logs: never wait for the client there)
    with s.output_never_blocks():
        result = gc_dry_run(s.store, log=lambda m: s.log(Verbosity.INFO, m))
    s.stop_work()
    s.w.strings(result.paths)
    s.w.u64(result.bytes_freed)
    s.w.u64(result.apparent_bytes_freed)


@op(ExtOp.WhyAlive)
def why_alive_op(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    if not s.store.is_valid(sp):
        raise invalid(s, sp)
    chain = why_alive(s.store, sp, lambda r: not may_see(s, r.kind, r.uid)) or []
    s.stop_work()
    s.w.u64(len(chain))
    for label, path in chain:
        s.w.string(label)
        s.w.string(path)


@op(ExtOp.SpaceReport)
def space_report(s: Session) -> None:
    nar = bool(s.r.u64("nar"))
    top = min(s.r.u64("top"), 1000)
    s.start_work()
    report = compute(s.store, nar=nar, top=top, hide=lambda r: not may_see(s, r.kind, r.uid))
    s.stop_work()
    s.w.string(json.dumps(report.to_wire()))
