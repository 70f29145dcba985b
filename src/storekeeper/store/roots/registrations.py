"""Roots the daemon keeps for its users: registrations and runtime-root leases.

The daemon never reads a user's home directory (it may not be able to: an
unprivileged daemon, an NFS home, another host).  A user's client tells it
which store paths its roots hold; the daemon records that under the uid the
transport vouches for (``SO_PEERCRED``, or the daemon's own uid for a stdio
session).  Files, in ``<state>/storekeeper/``:

* ``registrations/<uid>``: JSON ``{name: {"path": store path, "time": t}}``,
  the roots user ``uid`` registered.  ``name`` is the client's own name for a
  root (storekeeper's client uses ``<host>:<absolute link path>``); the daemon
  only keeps it, it never looks at it.
* ``leases/<uid>``: JSON ``{lease name: {"paths": [store path…], "expires": t}}``,
  the runtime roots a client of ``uid`` reported (lease name: the client's
  host), alive until ``expires``.  A new report from the same lease name
  replaces the old one.
* ``<kind>/<uid>.lock``: ``flock`` EX while a file is read, changed and
  rewritten (atomically: temp file, fsync, rename).

Invariants:

* A client can change only the files of its own uid: nothing on the wire
  names a uid.
* Every store path in a file was pinned (temp root) by the connection that
  wrote it and found valid *before* the file was written.  So a GC that read
  the old file saw the pin (temp roots are read before these files, and a
  pin taken during a GC reaches it through the gc-socket), and a GC that
  reads the new one sees the entry.
* Files are trusted only if they and their directory are owned by the state
  dir's owner or root and are not writable by group or others; anything else,
  or a file that does not parse, is reported and ignored (never deleted).
* Bounded per uid: ``max-root-registrations`` names (at most :data:`MAX_REGISTRATIONS`), :data:`MAX_LEASES` lease
  names, :data:`MAX_LEASE_PATHS` paths per lease.
"""

from __future__ import annotations

import os
import stat
import time
from contextlib import contextmanager

from ...errors import StoreError
from ...formats.frozen import Frozen
from ...formats.gcroots import indirect_root_name
from ...formats.storepath import StorePathError
from ...fs.atomic import write_file_atomic
from ..locks import lock_fd, open_shared_lock
from ..reserve import with_reserve
from .indirect import IndirectRootMemory, link_owner

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

MAX_REGISTRATIONS = 65536
MAX_LEASES = 64
MAX_LEASE_PATHS = 65536
MAX_NAME = 4096

REGISTRATIONS, LEASES = "registrations", "leases"


class UserRootsError(StoreError):
    """A request about per-user roots that is refused (too many, a bad name)."""


class RegistrationLimit(UserRootsError):
    """A user has as many registered roots as ``max-root-registrations`` allows."""


class Registration(Frozen):
    __slots__ = ("uid", "name", "path", "time")
    _fields = __slots__
    uid: int
    name: str
    path: str
    time: float

    def __init__(self, uid: int, name: str, path: str, time: float) -> None:
        self._init(uid=uid, name=name, path=path, time=time)


class Lease(Frozen):
    __slots__ = ("uid", "name", "paths", "expires")
    _fields = __slots__
    uid: int
    name: str
    paths: tuple[str, ...]
    expires: float

    def __init__(self, uid: int, name: str, paths: tuple[str, ...], expires: float) -> None:
        self._init(uid=uid, name=name, paths=paths, expires=expires)


def check_name(name: str, what: str = "root name") -> None:
    """One printable line: names are shown in root listings."""
    if not name or len(name.encode(errors="surrogateescape")) > MAX_NAME \
            or any(ord(c) < 0x20 or ord(c) == 0x7f for c in name):
        raise UserRootsError(f"invalid {what} {name[:80]!r}: empty, too long or with control characters")


class UserRoots:
    """The registration and lease files of a state dir (see the module docstring)."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.base = os.path.join(state_dir, "storekeeper")

    # --- reading ------------------------------------------------------------------

    def _dir(self, kind: str) -> str:
        return os.path.join(self.base, kind)

    def _trusted_owners(self) -> set[int]:
        try:
            return {0, os.stat(self.state_dir).st_uid}
        except OSError:
            return {0}

    def _load(self, kind: str, uid: int, messages: list[str] | None = None,
              owners: set[int] | None = None) -> dict:
        path = os.path.join(self._dir(kind), str(uid))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as e:
            if messages is not None:
                messages.append(f"cannot read '{path}': {e.strerror}")
            return {}
        try:
            st = os.fstat(fd)
            owners = owners if owners is not None else self._trusted_owners()
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners or st.st_mode & 0o022:
                if messages is not None:
                    messages.append(f"ignoring '{path}': not a file written by the daemon")
                return {}
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
        finally:
            os.close(fd)
        import json  # noqa: PLC0415 -- only when there is a file: kept off `roots`' start-up
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            if messages is not None:
                messages.append(f"ignoring '{path}': it does not parse")
            return {}
        return obj

    def _uids(self, kind: str, messages: list[str] | None, owners: set[int]) -> list[int]:
        d = self._dir(kind)
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            return []
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners or st.st_mode & 0o022:
            if messages is not None:
                messages.append(f"ignoring '{d}': not a directory kept by the daemon")
            return []
        return sorted(int(n) for n in os.listdir(d) if n.isdigit())

    def registrations(self, uid: int | None = None,
                      messages: list[str] | None = None) -> list[Registration]:
        """Every registration (of ``uid`` only, if given)."""
        owners = self._trusted_owners()
        uids = [uid] if uid is not None else self._uids(REGISTRATIONS, messages, owners)
        out = []
        for u in uids:
            for name, rec in self._load(REGISTRATIONS, u, messages, owners).items():
                if isinstance(rec, dict) and isinstance(rec.get("path"), str):
                    out.append(Registration(u, name, rec["path"], float(rec.get("time") or 0)))
        return out

    def leases(self, now: float | None = None, uid: int | None = None,
               messages: list[str] | None = None) -> list[Lease]:
        """Leases not yet expired at ``now`` (all of them with ``now=None``)."""
        owners = self._trusted_owners()
        uids = [uid] if uid is not None else self._uids(LEASES, messages, owners)
        out = []
        for u in uids:
            for name, rec in self._load(LEASES, u, messages, owners).items():
                lease = _lease(u, name, rec)
                if lease is not None and (now is None or lease.expires > now):
                    out.append(lease)
        return out

    # --- writing (the daemon, for the uid of its peer) ----------------------------

    @contextmanager
    def _update(self, kind: str, uid: int) -> Iterator[dict]:
        import json  # noqa: PLC0415 -- (as in _load)
        d = self._dir(kind)
        os.makedirs(d, mode=0o755, exist_ok=True)
        lock = open_shared_lock(os.path.join(d, f"{uid}.lock"))
        try:
            lock_fd(lock, exclusive=True)
            data = self._load(kind, uid, owners={os.geteuid(), *self._trusted_owners()})
            before = json.dumps(data, sort_keys=True)
            yield data
            after = json.dumps(data, sort_keys=True)
            if after != before:
                path = os.path.join(d, str(uid))
                if data:
                    # (a full disk: the reserve lets the GC's client record its roots)
                    with_reserve(os.path.join(self.state_dir, "db"),
                                 lambda: write_file_atomic(path, after.encode(), mode=0o600))
                else:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
        finally:
            os.close(lock)

    def register(self, uid: int, entries: dict[str, str], now: float | None = None,
                 limit: int = MAX_REGISTRATIONS) -> None:
        """Record ``entries`` (name -> printed store path) for ``uid``; the caller pinned
        and checked every path first.  ``limit``: names per uid (the setting
        ``max-root-registrations``; never more than :data:`MAX_REGISTRATIONS`)."""
        for name in entries:
            check_name(name)
        now = time.time() if now is None else now
        limit = min(limit or MAX_REGISTRATIONS, MAX_REGISTRATIONS)
        with self._update(REGISTRATIONS, uid) as data:
            new = sum(1 for n in entries if n not in data)
            if len(data) + new > limit:
                raise RegistrationLimit(f"too many registered roots: you have {len(data)}, this "
                                        f"adds {new}, and the daemon keeps at most {limit} per "
                                        f"user (max-root-registrations)")
            for name, path in entries.items():
                old = data.get(name)
                if not (isinstance(old, dict) and old.get("path") == path):
                    data[name] = {"path": path, "time": round(now, 3)}

    def unregister(self, uid: int, names: Iterable[str]) -> list[str]:
        """Forget ``names`` of ``uid``; returns those that were registered."""
        removed = []
        with self._update(REGISTRATIONS, uid) as data:
            for name in names:
                if data.pop(name, None) is not None:
                    removed.append(name)
        return removed

    def set_lease(self, uid: int, name: str, paths: Iterable[str], seconds: float,
                  now: float | None = None) -> Lease:
        """Replace lease ``name`` of ``uid`` by ``paths`` until now + ``seconds``; expired
        leases of ``uid`` are dropped on the way.  No paths: the lease is ended."""
        check_name(name, "lease name")
        now = time.time() if now is None else now
        paths = sorted(set(paths))
        if len(paths) > MAX_LEASE_PATHS:
            raise UserRootsError(f"too many runtime roots in one report (limit {MAX_LEASE_PATHS})")
        expires = round(now + seconds, 3)
        with self._update(LEASES, uid) as data:
            for other in list(data):
                lease = _lease(uid, other, data[other])
                if lease is None or lease.expires <= now:
                    del data[other]
            if paths:
                if name not in data and len(data) >= MAX_LEASES:
                    raise UserRootsError(f"too many leases (limit {MAX_LEASES} per user)")
                data[name] = {"paths": paths, "expires": expires}
            else:
                data.pop(name, None)
        return Lease(uid, name, tuple(paths), expires)

    def prune_expired(self, now: float) -> None:
        """Drop expired leases (a deleting GC does this; readers ignore them anyway).

        Only the files' owner does it: a file rewritten by another user (root)
        would be unreadable to the daemon.
        """
        try:
            if os.stat(self._dir(LEASES)).st_uid != os.geteuid():
                return
        except FileNotFoundError:
            return
        owners = self._trusted_owners()
        for uid in self._uids(LEASES, None, owners):
            with self._update(LEASES, uid) as data:
                for name in list(data):
                    lease = _lease(uid, name, data[name])
                    if lease is None or lease.expires <= now:
                        del data[name]


def _lease(uid: int, name: str, rec: object) -> Lease | None:
    if not isinstance(rec, dict):
        return None
    paths, expires = rec.get("paths"), rec.get("expires")
    if not isinstance(paths, list) or not isinstance(expires, (int, float)):
        return None
    return Lease(uid, name, tuple(p for p in paths if isinstance(p, str)), float(expires))


# --- what the daemon (or a local store's own user) does for a uid ---------------------

def register_roots(store, uid: int, entries: Iterable[tuple[str, object]]) -> list[str]:
    """Pin, check and record ``(name, StorePath)`` pairs for ``uid``; returns the names
    refused because their path is not valid."""
    ok: dict[str, str] = {}
    refused = []
    for name, sp in entries:
        check_name(name)
        if store.pin_valid(sp):  # pinned first: a running GC learns of it now
            ok[name] = store.print_path(sp)
        else:
            refused.append(name)
    UserRoots(store.state_dir).register(uid, ok, limit=store.settings.max_root_registrations)
    return refused


def unregister_roots(store, uid: int, names: Iterable[str], trusted: bool = False) -> list[str]:
    """Drop ``uid``'s registrations named ``names``, and its claims on the indirect roots
    (AddIndirectRoot) whose link is one of ``names``; an indirect root goes with its last
    claim, readable or not.  A claim nobody made (an entry older than the claims) is
    dropped only for the link's owner or a ``trusted`` peer (see
    :class:`~storekeeper.store.roots.IndirectRootMemory`).  Returns what was removed."""
    names = list(names)
    removed = UserRoots(store.state_dir).unregister(uid, names)
    memory = IndirectRootMemory(store.state_dir)
    auto = os.path.join(store.state_dir, "gcroots", "auto")
    for name in names:
        if not name.startswith("/") or name in removed:
            continue
        owner = trusted or uid == 0 or link_owner(name) == uid
        if memory.release(os.path.join(auto, indirect_root_name(name)), uid, name, owner):
            removed.append(name)
    return removed


def report_runtime_roots(store, uid: int, lease_name: str, paths: Iterable[str]) -> tuple[int, int]:
    """Hold the valid ``paths`` (printed) for ``uid``: pinned for the life of this process
    (a daemon connection), and under lease ``lease_name`` for ``runtime-root-lease``
    seconds unless ``runtime-roots = proc``.  Returns (lease seconds, paths held)."""
    check_name(lease_name, "lease name")
    held = []
    for text in paths:
        try:
            sp = store.store_dir.parse(text, lax=True)
        except StorePathError:
            continue  # not a store path: nothing to hold
        if store.pin_valid(sp):
            held.append(store.print_path(sp))
    cfg = store.settings
    seconds = 0 if cfg.runtime_roots == "proc" else cfg.runtime_root_lease
    if seconds:
        UserRoots(store.state_dir).set_lease(uid, lease_name, held, seconds)
    return seconds, len(held)
