"""Named roots ``gc/roots/<name>`` (docs/CACHE-GC.md, "Objects").

A root counts while it has not expired and, when the newest root of its group (the
name up to its last ``/``) carries ``keep: N``, while it is among the group's N
newest.  Pinning follows the writer's order: the root object is stored first (it
is its own lease), then running collections are waited for, then the closure is
checked, so a collection either sees the root or the pin sees the collection.
"""

from __future__ import annotations

import re
from typing import Iterable

from ...errors import UsageError
from ...formats.narinfo import narinfo_key
from ...formats.storepath import StoreDir, StorePath
from ..backends import Backend, CacheError
from ..binary import BinaryCache
from .leases import wait_collections
from .objects import ROOTS, Clock, Hook, Record, Timings, no_hook, owner_name, read_records

_NAME = re.compile(r"[A-Za-z0-9._+@=-]+(/[A-Za-z0-9._+@=-]+)*")


def root_key(name: str) -> str:
    if not _NAME.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
        raise UsageError(f"invalid root name '{name}' (letters, digits, ._+@=- and '/' "
                         "between parts)")
    return ROOTS + name


def root_name(rec: Record) -> str:
    return rec.key[len(ROOTS):]


def put_root(backend: Backend, name: str, paths: Iterable[str], clock: Clock,
             ttl: float | None = None, keep: int | None = None,
             owner: str | None = None) -> Record:
    now = clock.now()
    rec = Record(root_key(name), sorted(set(paths)), owner=owner or owner_name(), created=now,
                 expires=now + ttl if ttl else None, keep=keep)
    backend.put(rec.key, rec.to_json())
    return rec


def read_roots(backend: Backend) -> list[Record]:
    return read_records(backend, ROOTS)


def live_roots(records: list[Record], now: float, skew: float) -> tuple[list[Record], list[Record]]:
    """(roots that count, roots that do not: expired or beyond their group's keep-last-N).
    Expiry is judged with ``skew`` in the root's favour."""
    live, dead = [], []
    groups: dict[str, list[Record]] = {}
    for r in records:
        if r.expires is not None and r.expires + skew < now:
            dead.append(r)
            continue
        name = root_name(r)
        if "/" in name:
            groups.setdefault(name.rpartition("/")[0], []).append(r)
        else:
            live.append(r)
    for members in groups.values():
        members.sort(key=lambda r: (r.created, r.key), reverse=True)
        keep = members[0].keep
        n = len(members) if keep is None or keep <= 0 else keep
        live.extend(members[:n])
        dead.extend(members[n:])
    return live, dead


def pin(cache: BinaryCache, name: str, paths: list[StorePath], clock: Clock, timings: Timings,
        ttl: float | None = None, keep: int | None = None, hook: Hook = no_hook) -> Record:
    """Root ``paths`` under ``name``; their closures must be in the cache (else the root is
    removed again and CacheError names what is missing)."""
    backend = cache.backend
    info = cache.info()
    if info is None:
        raise CacheError(f"'{cache.url}' does not appear to be a binary cache")
    sd = StoreDir(info.store_dir)
    rec = put_root(backend, name, [p.base for p in paths], clock, ttl, keep)
    hook("pin.stored", rec)
    try:
        seen: set[StorePath] = set()
        wanted = set(paths)
        while wanted:
            wait_collections(backend, clock, timings, narinfos={p.hash_part for p in wanted}, hook=hook)
            got = cache.narinfos(sd, sorted(wanted))
            missing = wanted - set(got)
            if missing:
                p = min(missing)
                raise CacheError(f"cannot pin '{sd.print(p)}': binary cache '{cache.url}' has no "
                                 f"'{narinfo_key(p)}'")
            seen |= wanted
            wanted = {r for ni in got.values() for r in ni.references} - seen
    except BaseException:
        backend.delete_many([rec.key])
        raise
    return rec


def unpin(backend: Backend, name: str) -> bool:
    key = root_key(name)
    if not backend.exists(key):
        return False
    backend.delete_many([key])
    return True
