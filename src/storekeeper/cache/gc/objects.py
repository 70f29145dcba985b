"""The coordination objects of the fleet cache GC (docs/CACHE-GC.md, "Objects") and the
clock every party reads.

Each object is one JSON document under ``gc/``, written atomically in one put, so a
reader sees the whole old or the whole new one.  Times are Unix seconds from the
injectable :class:`Clock` (tests advance a :class:`FakeClock` instead of sleeping).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ...formats.errors import FormatError
from ...formats.storepath import StorePath
from ..backends import Backend, CacheError

ROOTS = "gc/roots/"
LEASES = "gc/leases/"
CONDEMNED = "gc/condemned/"
DEFERRED = "gc/deferred/"

#: hook(step name, the acting object): tests interleave parties at named steps
Hook = Callable[[str, Any], None]


def no_hook(step: str, actor: Any) -> None:
    return None


class Clock:
    """Wall-clock time (parties on several machines compare it, with ``skew``)."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock(Clock):
    """A clock tests move: ``sleep`` advances it (and runs ``on_sleep``, so a test can
    let another party act while this one waits)."""

    def __init__(self, start: float | None = None) -> None:
        self.t = time.time() if start is None else start
        self.on_sleep: Callable[[float], None] | None = None

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 0.001)
        if self.on_sleep is not None:
            self.on_sleep(seconds)


@dataclass
class Timings:
    """The protocol's durations in seconds (docs/CACHE-GC.md, "Assumptions")."""

    lease_ttl: float = 600.0
    settle: float = 300.0        # > renewal interval (lease_ttl / 3)
    nar_grace: float = 86400.0   # a dead narinfo's NAR stays this long
    temp_grace: float = 86400.0  # half-finished uploads older than this go
    skew: float = 60.0           # clock disagreement allowed between machines
    margin: float = 60.0         # longest step between a check and the write it guards
    sweep_budget: float = 3600.0  # a collection's deadline: publish + settle + this
    poll: float = 5.0            # how often a writer looks whether a collection ended

    @property
    def renew(self) -> float:
        return self.lease_ttl / 3

    def check(self) -> None:
        if self.settle <= self.renew:
            raise CacheError(f"the settle period ({self.settle:g} s) must be longer than a lease "
                             f"renewal ({self.renew:g} s, a third of the lease TTL)")
        if self.lease_ttl <= self.margin + self.skew:
            raise CacheError("the lease TTL must be longer than margin + skew")


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def new_id(clock: Clock) -> str:
    """Unique and sortable by time: ``<ms since epoch>-<host>-<pid>-<random>``."""
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())
    return f"{int(clock.now() * 1000):015d}-{host}-{os.getpid()}-{os.urandom(4).hex()}"


@dataclass
class Record:
    """A lease, root or condemned set: one JSON object at ``key``."""

    key: str
    paths: list[str] = field(default_factory=list)   # store path basenames
    nars: list[str] = field(default_factory=list)    # NAR keys (``nar/…``)
    narinfos: list[str] = field(default_factory=list)  # hash parts (condemned sets)
    owner: str = ""
    created: float = 0.0
    expires: float | None = None   # leases, roots with a TTL
    deadline: float | None = None  # condemned sets
    keep: int | None = None        # roots: keep-last-N of the name's group

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"owner": self.owner, "created": self.created}
        for name in ("paths", "nars", "narinfos"):
            if getattr(self, name):
                d[name] = getattr(self, name)
        for name in ("expires", "deadline", "keep"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, key: str, data: bytes, where: str) -> "Record":
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            rec = cls(key, [str(p) for p in d.get("paths", [])], [str(n) for n in d.get("nars", [])],
                      [str(h) for h in d.get("narinfos", [])], str(d.get("owner", "")),
                      float(d.get("created", 0.0)))
            for name in ("expires", "deadline"):
                if d.get(name) is not None:
                    setattr(rec, name, float(d[name]))
            if d.get("keep") is not None:
                rec.keep = int(d["keep"])
        except (ValueError, TypeError) as e:
            raise CacheError(f"{where} is not a valid GC object: {e}") from None
        return rec

    def store_paths(self) -> set[StorePath]:
        out = set()
        for p in self.paths:
            try:
                out.add(StorePath.from_base(p))
            except FormatError:
                continue  # not ours to judge: a bad entry protects nothing
        return out


def read_records(backend: Backend, prefix: str, keys: list[str] | None = None) -> list[Record]:
    """Every object under ``prefix`` (listed, unless ``keys`` are given); one that vanished
    between the listing and the read is skipped."""
    if keys is None:
        keys = [e.key for e in backend.list_keys(prefix)]
    out = []
    for key in keys:
        if _is_temp(key):
            continue
        data = backend.get(key)
        if data is not None:
            out.append(Record.parse(key, data, f"'{backend.url}/{key}'"))
    return out


def _is_temp(key: str) -> bool:
    """A file backend's temp file (``.<name>.tmp-<pid>-<rand>``)."""
    base = key.rsplit("/", 1)[-1]
    return base.startswith(".") and ".tmp-" in base


is_temp = _is_temp
