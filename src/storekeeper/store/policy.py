"""Retention policies, applied by every deleting GC before it finds the roots.

Each policy is a setting (``storekeeper.config.settings``; 0 or empty: off):

* ``keep-generations = N``: each profile under ``<state>/profiles`` keeps its last N
  generations (the current one and N-1 before it, and any newer than the current);
* ``delete-generations-older-than = T``: generations created more than T ago go, except
  the one that was live T ago and the current one (nix-env's ``Nd`` rule);
* ``root-ttl = indirect=T``: an indirect root (a ``result`` link registered in
  ``gcroots/auto``) whose link is older than T stops counting: its ``gcroots/auto`` entry is
  removed (the user's link itself is left alone, as Nix leaves stale ones);
* ``user-quota = BYTES``: a warning for each owner whose roots hold more (nothing deleted);
* ``keep-recently-used = T``: paths used within T are kept, whatever their roots say.  Uses
  are recorded in our own table (:class:`UsageTable`, never atime): by
  :func:`record_use` (the daemon, for paths it serves) and for every runtime or lease root a
  GC sees.  They are kept by links in ``gcroots/recently-used/`` (so Nix's own GC keeps
  them too), made and expired here.

A policy only ever removes links that make roots: never the current generation of a
profile, and never a runtime, temp or lease root (their kinds are not in any policy), so
whatever a running process or a build holds stays.  :func:`plan` says what each policy would
drop and the bytes that frees (the roots' exclusive bytes, from :mod:`.du`); :func:`apply`
does it.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .. import fs
from ..errors import UsageError
from .du.space import by_owner, compute
from .gc.rootlist import all_roots
from .generations import Selection, delete_generations, generations, profiles_under, select

RECENT_DIR = "recently-used"
#: the policies' clock (tests put a fake one here)
clock: Callable[[], float] = time.time


@dataclass
class Drop:
    policy: str
    link: str
    target: str
    detail: str
    profile: str = ""  # a generation's profile
    generation: int = 0

    def to_json(self) -> dict:
        return {"policy": self.policy, "link": self.link, "target": self.target,
                "detail": self.detail}


@dataclass
class Plan:
    drops: list[Drop] = field(default_factory=list)
    keep_recent: list[str] = field(default_factory=list)  # store paths kept as recently used
    warnings: list[str] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)  # runtime and lease roots' paths, now
    freed: dict[str, int] = field(default_factory=dict)  # policy -> bytes its drops alone free

    def to_json(self) -> dict:
        return {"drops": [d.to_json() for d in self.drops], "keepRecent": self.keep_recent,
                "warnings": self.warnings, "bytesFreedByPolicy": self.freed}


class UsageTable:
    """``<state>/storekeeper/usage.sqlite``: ``Used(path primary key, lastUsed)``, the last
    time each store path was used (seconds since the epoch); rows older than every policy's
    window are pruned when the table is read for a GC."""

    def __init__(self, state_dir: str) -> None:
        d = os.path.join(state_dir, "storekeeper")
        os.makedirs(d, exist_ok=True)
        self.conn = sqlite3.connect(os.path.join(d, "usage.sqlite"), timeout=60)
        self.conn.execute("create table if not exists Used (path text primary key, "
                          "lastUsed real not null)")

    def record(self, paths: Iterable[str], now: float) -> None:
        with self.conn:
            self.conn.executemany(
                "insert into Used (path, lastUsed) values (?, ?) on conflict(path) do update "
                "set lastUsed = max(lastUsed, excluded.lastUsed)", ((p, now) for p in paths))

    def since(self, t: float) -> list[str]:
        return [p for (p,) in self.conn.execute(
            "select path from Used where lastUsed >= ? order by path", (t,))]

    def prune(self, before: float) -> None:
        with self.conn:
            self.conn.execute("delete from Used where lastUsed < ?", (before,))

    def close(self) -> None:
        self.conn.close()


def record_use(store, paths: Iterable[str], now: float | None = None) -> None:
    """Note that ``paths`` (printed store paths) were used now (for ``keep-recently-used``)."""
    t = UsageTable(store.state_dir)
    try:
        t.record(paths, clock() if now is None else now)
    finally:
        t.close()


def active(cfg) -> bool:
    """Is any policy on (in these StoreSettings)?"""
    return bool(cfg.policies_active())


def note_use(store, paths: Iterable[str]) -> None:
    """:func:`record_use` if ``keep-recently-used`` is on (the daemon calls this for the paths
    a client pins, ensures or downloads; with the policy off it costs nothing)."""
    if store.settings.keep_recently_used > 0:
        try:
            record_use(store, paths)
        except (OSError, sqlite3.Error):
            pass  # best effort: a use not recorded never fails the client's request


def _generation_drops(store, now: float) -> list[Drop]:
    cfg = store.settings
    out = []
    for profile in profiles_under(os.path.join(store.state_dir, "profiles")):
        gens, current = generations(profile)
        seen: set[int] = set()
        rules = []
        if cfg.keep_generations > 0:
            rules.append(("keep-generations", Selection.keep_last(cfg.keep_generations),
                          f"beyond the last {cfg.keep_generations} of {profile}"))
        if cfg.delete_generations_older_than > 0:
            rules.append(("delete-generations-older-than",
                          Selection.older_than(cfg.delete_generations_older_than),
                          f"older than {cfg.delete_generations_older_than} s ({profile})"))
        for name, sel, why in rules:
            for g in select(gens, current, sel, now):
                if g.number not in seen and g.number != current:
                    seen.add(g.number)
                    out.append(Drop(name, g.link, g.target, f"generation {g.number} {why}",
                                    profile, g.number))
    return out


def _auto_entries(store) -> dict[str, str]:
    """``gcroots/auto`` entry → the link it names (absolute, normalised)."""
    auto = os.path.join(store.state_dir, "gcroots", "auto")
    out: dict[str, str] = {}
    try:
        names = os.listdir(auto)
    except FileNotFoundError:
        return out
    for n in names:
        try:
            to = os.readlink(os.path.join(auto, n))
        except OSError:
            continue
        out[os.path.join(auto, n)] = os.path.normpath(os.path.join(auto, to))
    return out


def _ttl_drops(store, roots, now: float) -> list[Drop]:
    ttl = dict(store.settings.root_ttl)
    if not ttl:
        return []
    by_link: dict[str, list[str]] = {}
    for entry, link in _auto_entries(store).items():
        by_link.setdefault(link, []).append(entry)
    out = []
    for r in roots:
        limit = ttl.get(r.kind)
        if limit is None:
            continue
        try:
            age = now - os.lstat(r.link).st_mtime
        except OSError:
            continue
        if age > limit:
            for entry in by_link.get(os.path.normpath(r.link), ()):
                out.append(Drop("root-ttl", entry, store.print_path(r.path),
                                f"{r.kind} root {r.link} is {age / 86400:.1f} days old "
                                f"(ttl {limit / 86400:.1f})"))
    return out


def plan(store, now: float | None = None, with_bytes: bool = False) -> Plan:
    """What the policies would do now (nothing changes)."""
    now = clock() if now is None else now
    cfg = store.settings
    roots = all_roots(store)
    p = Plan(_generation_drops(store, now) + _ttl_drops(store, roots, now))
    if cfg.keep_recently_used > 0:
        table = UsageTable(store.state_dir)
        try:
            p.in_use = sorted({store.print_path(r.path) for r in roots
                               if r.kind in ("runtime", "lease")})
            p.keep_recent = sorted(set(table.since(now - cfg.keep_recently_used)) | set(p.in_use))
        finally:
            table.close()
    if cfg.user_quota > 0 or (with_bytes and p.drops):
        report = compute(store, nar=not with_bytes)
        for o in by_owner(report) if cfg.user_quota > 0 else ():
            if o["closureBytes"] > cfg.user_quota:
                p.warnings.append(f"user '{o['owner']}' has roots holding {o['closureBytes']} "
                                  f"bytes, over the quota of {cfg.user_quota}")
        if with_bytes:
            for name in sorted({d.policy for d in p.drops}):
                p.freed[name] = freed_by(report, store, [d for d in p.drops if d.policy == name])
            p.freed["all"] = freed_by(report, store, p.drops)
    return p


def freed_by(report, store, drops: list[Drop]) -> int:
    """Bytes the GC frees once the roots ``drops`` remove are gone: the groups of paths whose
    every holder is a root target all of whose links go."""
    gone_links = {os.path.normpath(d.link) for d in drops}
    # a gcroots/auto entry stands for the user link it names
    auto = _auto_entries(store)
    gone_links |= {auto[d.link] for d in drops if d.link in auto}
    links_of: dict[int, list[str]] = {}
    for r, bit in zip(report.roots, report.bits):
        links_of.setdefault(bit, []).append(os.path.normpath(r.link))
    gone = 0
    for bit, links in links_of.items():
        if all(link in gone_links for link in links):
            gone |= 1 << bit
    if not gone:
        return 0
    return sum(b for m, (b, _) in report.masks.items() if m & gone and not m & ~gone)


def _sync_recent(store, keep: list[str]) -> None:
    """``gcroots/recently-used/<base>`` for exactly the paths in ``keep`` that are valid."""
    d = os.path.join(store.state_dir, "gcroots", RECENT_DIR)
    os.makedirs(d, exist_ok=True)
    want = {os.path.basename(p): p for p in keep if store.db.is_valid(p)}
    for name in os.listdir(d):
        if name not in want:
            fs.remove_tree(os.path.join(d, name))
    for name, p in want.items():
        link = os.path.join(d, name)
        if not os.path.lexists(link):
            os.symlink(p, link)


def apply(store, now: float | None = None, log: Callable[[str], None] | None = None) -> Plan:
    """Carry out the plan (before a deleting GC finds its roots)."""
    now = clock() if now is None else now
    cfg = store.settings
    if not active(cfg):
        if os.path.isdir(os.path.join(store.state_dir, "gcroots", RECENT_DIR)):
            _sync_recent(store, [])  # the policy was turned off: its links go
        return Plan()
    p = plan(store, now)
    say = log or (lambda m: None)
    by_profile: dict[str, set[int]] = {}
    for d in p.drops:
        if d.policy == "root-ttl":
            say(f"policy root-ttl: removing {d.link} ({d.detail})")
            fs.remove_tree(d.link)
        else:
            by_profile.setdefault(d.profile, set()).add(d.generation)
            say(f"policy {d.policy}: removing {d.detail}")
    for profile, ids in by_profile.items():
        try:
            # (under the profile's lock, which refuses the current generation again)
            delete_generations(profile, Selection("ids", ids=frozenset(ids)), now)
        except UsageError as e:  # it became current since the plan: it stays
            say(f"policy: {profile} left alone: {e}")
        except OSError as e:  # its directory was swapped for a link or removed since
            if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise
            say(f"policy: {profile} left alone: {e.strerror}")
    if cfg.keep_recently_used > 0:
        table = UsageTable(store.state_dir)
        try:
            table.record(p.in_use, now)
            table.prune(now - cfg.keep_recently_used)
        finally:
            table.close()
        _sync_recent(store, p.keep_recent)
    elif os.path.isdir(os.path.join(store.state_dir, "gcroots", RECENT_DIR)):
        _sync_recent(store, [])
    for w in p.warnings:
        say(f"warning: {w}")
    return p
