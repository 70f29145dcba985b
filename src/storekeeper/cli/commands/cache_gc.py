"""Fleet cache GC: ``cache roots|pin|unpin|gc|audit URL`` (docs/CACHE-GC.md)."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from ..common import UsageError, open_store

if TYPE_CHECKING:
    from ...cache import BinaryCache
    from ...formats.storepath import StorePath


def _open(url: str) -> BinaryCache:
    from ...cache import CacheError, open_cache
    from ...cache.gc import takes_part
    cache = open_cache(url)
    if not takes_part(cache.backend):
        cache.close()
        raise UsageError(f"'{url}': only file:// and s3:// caches can hold roots and be collected")
    if cache.info() is None:
        cache.close()
        raise CacheError(f"'{cache.url}' does not appear to be a binary cache")
    return cache


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def cmd_roots(store: None, args: argparse.Namespace) -> int:
    from ...cache.gc import Timings, live_roots, read_roots
    from ...cache.gc.roots import root_name
    cache = _open(args.url)
    try:
        live, dead = live_roots(read_roots(cache.backend), time.time(), Timings().skew)
    finally:
        cache.close()
    rows = [(r, True) for r in live] + [(r, False) for r in dead]
    rows.sort(key=lambda x: root_name(x[0]))
    if args.json:
        print(json.dumps([{"name": root_name(r), "paths": r.paths, "owner": r.owner,
                           "created": r.created, "expires": r.expires, "keep": r.keep,
                           "live": ok} for r, ok in rows]))
        return 0
    for r, ok in rows:
        state = "live" if ok else "expired"
        print(f"{root_name(r)}\t{state}\t{len(r.paths)} paths\t{r.owner}\tcreated {_when(r.created)}"
              f"\texpires {_when(r.expires)}")
    return 0


def _paths(cache: BinaryCache, args: list[str]) -> list[StorePath]:
    from ...formats.storepath import StoreDir, StorePath
    info = cache.info()
    assert info is not None
    sd = StoreDir(info.store_dir)
    out = []
    for a in args:
        out.append(sd.parse(a) if a.startswith("/") else StorePath.from_base(a))
    return out


def cmd_pin(store: None, args: argparse.Namespace) -> int:
    from ...cache.gc import Clock, Timings, pin
    cache = _open(args.url)
    try:
        pin(cache, args.name, _paths(cache, args.paths), Clock(), Timings(), args.ttl, args.keep)
    finally:
        cache.close()
    return 0


def cmd_unpin(store: None, args: argparse.Namespace) -> int:
    from ...cache.gc import unpin
    from ...errors import InvalidPath
    cache = _open(args.url)
    try:
        if not unpin(cache.backend, args.name):
            raise InvalidPath(f"binary cache '{cache.url}' has no root '{args.name}'")
    finally:
        cache.close()
    return 0


def _size(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.2f} MiB)"


def cmd_gc(store: None, args: argparse.Namespace) -> int:
    from ...cache.gc import Collector, Timings
    from ..progress import Progress
    t = Timings(lease_ttl=args.lease_ttl, settle=args.settle, nar_grace=args.nar_grace,
                temp_grace=args.temp_grace, skew=args.skew, margin=args.margin)
    t.check()
    bar = Progress("cache gc")

    def progress(step: str, done: int, total: int) -> None:
        bar.label = f"{step}ing"
        bar.update(done, total)
    cache = _open(args.url)
    try:
        gc = Collector(cache.backend, t, threads=cache.threads, max_freed=args.max_freed,
                       progress=progress)
        rep = gc.run(dry_run=args.dry_run)
    finally:
        bar.close()
        cache.close()
    if args.json:
        print(json.dumps(rep.to_json()))
        return 0
    verb = "would delete" if rep.dry_run else "deleted"
    print(f"{rep.narinfos} narinfos, {rep.live} live; {verb} {rep.narinfos_deleted} narinfos, "
          f"{rep.nars_deleted} NARs, {rep.others_deleted} other objects: {_size(rep.bytes_freed)}"
          + (" freed" if not rep.dry_run else ""))
    if rep.bytes_deferred:
        print(f"NARs waiting for the grace period: {_size(rep.bytes_deferred)}")
    if rep.spared:
        print(f"spared {rep.spared} narinfos rooted or leased meanwhile")
    if rep.stopped:
        print(f"stopped early: {rep.stopped}")
    return 0


def cmd_audit(store: None, args: argparse.Namespace) -> int:
    from ...cache.gc import audit
    cache = _open(args.url)
    src = open_store(args.store) if args.repair else None
    try:
        rep = audit(cache, src, repair=args.repair)
    finally:
        cache.close()
        if src is not None:
            src.close()
    if args.json:
        print(json.dumps(rep.to_json()))
    else:
        for base, url in rep.missing_nars:
            print(f"{base}: NAR '{url}' missing")
        for base, ref in rep.missing_refs:
            print(f"{base}: reference {ref} has no narinfo")
        for root, base in rep.missing_roots:
            print(f"root '{root}': {base} has no narinfo")
        for key in rep.unreadable:
            print(f"{key}: unreadable")
        for base in rep.repaired:
            print(f"repaired {base}")
        for base in rep.unrepaired:
            print(f"cannot repair {base} (not in the store, or not the same NAR file)")
        print(f"{rep.narinfos} narinfos, {rep.problems} problems")
    fixed = args.repair and not rep.unrepaired
    return 1 if rep.problems and not fixed else 0
