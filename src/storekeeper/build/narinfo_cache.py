"""The narinfo disk cache (spec binary-cache.md §8): what http(s):// and s3:// caches
answered, so that the next request asks them again only when the answer is old.

A found narinfo is believed for ``narinfo-cache-positive-ttl`` seconds (30 days),
"no such narinfo" for ``narinfo-cache-negative-ttl`` (1 hour), as Nix 2.8.
``file://`` caches are never recorded (their edits are seen at once, as in Nix).

The file is ``$XDG_CACHE_HOME/storekeeper/binary-cache-v6.sqlite`` (``~/.cache/…``)
of the user substituting (for a daemon, the daemon's user), with the tables of
Nix's ``binary-cache-v6.sqlite`` (``BinaryCaches``, ``NARs``), but a file of our
own: Nix's is left alone.

Invariant: a row is written only from a complete answer of the cache (a parsed
narinfo, or a definite 404); errors (unreachable, malformed) are never recorded,
so they are asked again next time.  Rows are written in one statement each
(upsert), so a reader never sees half a row.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from ..formats.errors import FormatError
from ..formats.narinfo import NarInfo
from ..formats.storepath import StoreDir

_SCHEMA = """
create table if not exists BinaryCaches (
    id        integer primary key autoincrement not null,
    url       text unique not null,
    timestamp integer not null,
    storeDir  text not null,
    wantMassQuery integer not null,
    priority  integer not null
);
create table if not exists NARs (
    cache            integer not null,
    hashPart         text not null,
    namePart         text,
    url              text,
    compression      text,
    fileHash         text,
    fileSize         integer,
    narHash          text,
    narSize          integer,
    refs             text,
    deriver          text,
    sigs             text,
    ca               text,
    timestamp        integer not null,
    present          integer not null,
    primary key (cache, hashPart),
    foreign key (cache) references BinaryCaches(id) on delete cascade
);
"""


def default_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "storekeeper", "binary-cache-v6.sqlite")


def disk_cached(url: str) -> bool:
    """Whether answers of the cache at ``url`` are kept (http, https, s3; not file)."""
    return url.split("://", 1)[0] in ("http", "https", "s3")


class NarInfoDiskCache:
    """One SQLite file of narinfo answers (module docstring); safe to share between
    threads and processes."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_path()
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("pragma journal_mode = wal")
            # a cache: losing the last answers in a crash only costs a look-up again
            self._db.execute("pragma synchronous = off")
            self._db.executescript(_SCHEMA)
        self._ids: dict[str, int] = {}

    def close(self) -> None:
        self._db.close()

    def _cache_id(self, url: str, store_dir: str) -> int:
        cid = self._ids.get(url)
        if cid is None:
            self._db.execute(
                "insert into BinaryCaches(url, timestamp, storeDir, wantMassQuery, priority) "
                "values (?, ?, ?, 0, 0) on conflict(url) do update set timestamp = excluded.timestamp",
                (url, int(time.time()), store_dir))
            cid = self._db.execute("select id from BinaryCaches where url = ?", (url,)).fetchone()[0]
            self._ids[url] = cid
        return cid

    def lookup(self, url: str, sd: StoreDir, hash_part: str, positive_ttl: int,
               negative_ttl: int) -> tuple[bool, NarInfo | None] | None:
        """(True, narinfo) or (False, None) for "absent" when a fresh answer is
        recorded; None when the cache must be asked."""
        with self._lock:
            cid = self._cache_id(url, sd.path)
            row = self._db.execute(
                "select present, timestamp, namePart, url, compression, fileHash, fileSize, "
                "narHash, narSize, refs, deriver, sigs, ca from NARs "
                "where cache = ? and hashPart = ?", (cid, hash_part)).fetchone()
        if row is None:
            return None
        present, stamp = row[0], row[1]
        age = time.time() - stamp
        if not present:
            return (False, None) if age < negative_ttl else None
        if age >= positive_ttl:
            return None
        name, nar_url, comp, fhash, fsize, nhash, nsize, refs, deriver, sigs, ca = row[2:]
        lines = [f"StorePath: {sd.path}/{hash_part}-{name}", f"URL: {nar_url}",
                 f"Compression: {comp}"]
        if fhash:
            lines.append(f"FileHash: {fhash}")
        if fsize is not None:
            lines.append(f"FileSize: {fsize}")
        lines += [f"NarHash: {nhash}", f"NarSize: {nsize}", f"References: {refs}"]
        if deriver:
            lines.append(f"Deriver: {deriver}")
        lines += [f"Sig: {s}" for s in sigs.split()]
        if ca:
            lines.append(f"CA: {ca}")
        try:
            return True, NarInfo.parse("".join(line + "\n" for line in lines), sd,
                                       f"the narinfo disk cache's entry for '{hash_part}'")
        except FormatError:
            return None  # a damaged row: ask the cache

    def record(self, url: str, sd: StoreDir, hash_part: str, ni: NarInfo | None) -> None:
        now = int(time.time())
        with self._lock:
            cid = self._cache_id(url, sd.path)
            if ni is None:
                self._db.execute(
                    "insert or replace into NARs(cache, hashPart, timestamp, present) "
                    "values (?, ?, ?, 0)", (cid, hash_part, now))
                return
            self._db.execute(
                "insert or replace into NARs(cache, hashPart, namePart, url, compression, "
                "fileHash, fileSize, narHash, narSize, refs, deriver, sigs, ca, timestamp, "
                "present) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (cid, hash_part, ni.path.name, ni.url, ni.compression,
                 ni.file_hash.typed("nix32") if ni.file_hash else None, ni.file_size,
                 ni.nar_hash.typed("nix32"), ni.nar_size,
                 " ".join(sorted(r.base for r in ni.references)),
                 ni.deriver.base if ni.deriver else None, " ".join(sorted(ni.sigs)), ni.ca, now))


__all__ = ["NarInfoDiskCache", "default_path", "disk_cached"]
