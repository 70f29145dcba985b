"""The root listing (``storekeeper roots``): every root with its kind, owner, age and
validity, and the closure sizes when the caller computes them.

Kept apart from :mod:`.inspect` (the reference graph, the dry run) and free of
dataclasses, typing and json: ``roots --no-size`` is Nix's ``--print-roots``, a
command whose time is mostly start-up (issue 20).
"""

from __future__ import annotations

import os
import pwd
import time

from ...formats.frozen import Frozen
from ..roots import Root, RootFinder

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable


class RootInfo(Frozen):
    """One line of the listing (``closure_size``: NAR bytes of the target's closure, None
    when not computed; ``target`` "" for an unreadable indirect root that never resolved)."""

    __slots__ = ("kind", "link", "target", "owner", "age_seconds", "closure_size", "valid", "uid",
                 "first_missed", "expires")
    _fields = __slots__
    kind: str
    link: str
    target: str
    owner: str | None
    age_seconds: float | None
    closure_size: int | None
    valid: bool
    uid: int | None
    first_missed: float | None  # indirect-unresolved: when it was first unreadable
    expires: float | None  # lease: end; indirect-unresolved: when it is dropped

    def __init__(self, kind: str, link: str, target: str, owner: str | None, age_seconds: float | None,
                 closure_size: int | None, valid: bool, uid: int | None = None,
                 first_missed: float | None = None, expires: float | None = None) -> None:
        self._init(kind=kind, link=link, target=target, owner=owner, age_seconds=age_seconds,
                   closure_size=closure_size, valid=valid, uid=uid, first_missed=first_missed,
                   expires=expires)

    def to_json(self) -> dict:
        return {"kind": self.kind, "link": self.link, "target": self.target, "owner": self.owner,
                "ageSeconds": None if self.age_seconds is None else round(self.age_seconds),
                "closureSize": self.closure_size, "valid": self.valid, "uid": self.uid,
                "firstMissed": self.first_missed, "expires": self.expires}

    @classmethod
    def from_json(cls, obj: dict) -> RootInfo:
        return cls(obj["kind"], obj["link"], obj["target"], obj.get("owner"), obj.get("ageSeconds"),
                   obj.get("closureSize", 0), obj.get("valid", False), obj.get("uid"),
                   obj.get("firstMissed"), obj.get("expires"))

    def detail(self) -> str:
        """What the kind alone does not say: when an unreadable root was first missed, when a
        lease ends."""
        def at(t: float) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC"
        if self.kind == "indirect-unresolved" and self.first_missed is not None:
            out = f"unreadable since {at(self.first_missed)}"
            return out + (f", kept until {at(self.expires)}" if self.expires else "")
        if self.kind == "lease" and self.expires is not None:
            return f"lease until {at(self.expires)}"
        return ""


def _user_name(uid: int, names: dict[int, str]) -> str:
    """The user's name (``names``: the ones looked up so far in this listing: each lookup
    reads the password database)."""
    name = names.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        names[uid] = name
    return name


def owner_and_age(root: Root, state_dir: str, names: dict[int, str]) -> tuple[str | None, float | None]:
    """Who made the root and how long ago (None where the root's kind does not say);
    ``names``: the user names of this listing so far (filled in)."""
    if root.uid is not None:
        return _user_name(root.uid, names), None
    if root.kind == "indirect-unresolved":
        return None, None
    if root.kind == "temp":
        probe = os.path.join(state_dir, "temproots", root.link[len("{temp:"):-1])
    elif root.kind == "runtime":
        probe = "/".join(root.link.split("/")[:3])  # /proc/<pid>
    else:
        probe = root.link
    try:
        st = os.lstat(probe)
    except OSError:
        return None, None
    return _user_name(st.st_uid, names), max(0.0, time.time() - st.st_mtime)


def finder(store) -> RootFinder:
    return RootFinder(store.store_dir, store.real_store_dir, store.state_dir,
                      indirect_grace=store.settings.indirect_root_grace,
                      runtime_mode=store.settings.runtime_roots)


def all_roots(store, root_finder: RootFinder | None = None) -> list[Root]:
    f = root_finder or finder(store)
    return (list(f.permanent_roots()) + list(f.user_roots()) + list(f.runtime_roots())
            + list(f.temp_roots()))


class Validity:
    """Ids and names of valid paths from the DB, one row at a time."""

    def __init__(self, db) -> None:
        self.db = db

    def id_of_path(self, path: str) -> int | None:
        row = self.db.conn.execute("select id from ValidPaths where path = ?", (path,)).fetchone()
        return row[0] if row else None

    def path_of_id(self, i: int) -> str:
        return self.db.conn.execute("select path from ValidPaths where id = ?", (i,)).fetchone()[0]


def list_roots(store, closure_sizes: Callable[[list[int]], dict[int, int]] | None = None) -> list[RootInfo]:
    """Every root, and the unreadable indirect roots that hold nothing (never resolved).

    ``closure_sizes`` maps the valid targets' ids to their closure sizes; without it
    every closure size is None and no reference graph is read (what ``nix-store --gc
    --print-roots`` does: on a million paths the graph is most of the time)."""
    ids_of = Validity(store.db)
    out = []
    f = finder(store)
    roots = all_roots(store, f)
    unique = {(r, r.uid): r for r in roots}.values()
    ordered = sorted(unique, key=lambda r: (r.kind, r.link, r.path, r.uid or 0))
    ids = {r: ids_of.id_of_path(store.print_path(r.path)) for r in ordered}
    sizes = closure_sizes(sorted({i for i in ids.values() if i is not None})) if closure_sizes else None
    names: dict[int, str] = {}
    for r in ordered:
        i = ids[r]
        owner, age = owner_and_age(r, store.state_dir, names)
        size = None if sizes is None else (sizes.get(i, 0) if i else 0)
        out.append(RootInfo(r.kind, r.link, store.print_path(r.path), owner, age, size,
                            i is not None, r.uid, r.first_missed, r.expires))
    for u in f.unresolved:
        if u["path"] is None:
            out.append(RootInfo("indirect-unresolved", u["link"], "", None, None, 0, False, None,
                                u["first_missed"], u["kept_until"]))
    return out
