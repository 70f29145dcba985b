"""Per-user roots over the worker protocol: storekeeper's own operations (:class:`ExtOp`).

Whose roots an operation touches is the session's peer, never a request
field: the uid the kernel reported for the connection (``SO_PEERCRED``), or,
for a session without a peer (``--stdio``, e.g. ``ssh host storekeeper daemon
--stdio``), the uid the daemon process runs as.  So a user can register,
unregister and lease only under their own uid, over any transport.

The daemon never opens the files that root names stand for: a name is the
client's label, the store path is what counts.  Every path is pinned (temp
root of this connection) and checked valid before it is recorded, so the
runtime roots a client reports are held while its connection lives and
then for the lease (``runtime-root-lease``); see :mod:`storekeeper.store.roots.registrations`.
"""

from __future__ import annotations

import json
import os

from ...formats.wire import MAX_PATH_LEN, ExtOp
from ...store.gc.inspect import roots_overview
from ...store.roots import registrations as userroots
from ...store.roots.registrations import MAX_NAME, MAX_REGISTRATIONS
from ..registry import op
from ..session import Session


def peer_uid(s: Session) -> int:
    """The uid whose roots this session may change (see the module docstring)."""
    return s.peer.uid if s.peer is not None else os.getuid()


def may_see(s: Session, kind: str, uid: int | None) -> bool:
    """Whether the peer may see the link (name) of a root, as FindRoots censors them."""
    if s.trusted:
        return True
    if kind in ("temp", "runtime"):
        return False
    if kind in ("registered", "lease"):
        return uid == peer_uid(s)
    return True


@op(ExtOp.RegisterRoots)
def register_roots(s: Session) -> None:
    entries = []
    for _ in range(s.r.count("roots", MAX_REGISTRATIONS)):
        name = s.r.string("root name", MAX_NAME)
        entries.append((name, s.read_path()))
    s.start_work()
    try:
        refused = userroots.register_roots(s.store, peer_uid(s), entries)
    except userroots.RegistrationLimit as e:
        s.log_once("registrations", str(e))
        raise
    s.stop_work()
    s.w.strings(refused)


@op(ExtOp.UnregisterRoots)
def unregister_roots(s: Session) -> None:
    names = s.r.strings("root names", MAX_REGISTRATIONS, MAX_NAME)
    s.start_work()
    removed = userroots.unregister_roots(s.store, peer_uid(s), names, trusted=s.trusted)
    s.stop_work()
    s.w.strings(removed)


@op(ExtOp.ReportRuntimeRoots)
def report_runtime_roots(s: Session) -> None:
    lease_name = s.r.string("lease name", MAX_NAME)
    paths = s.r.strings("runtime roots", item_limit=MAX_PATH_LEN)
    s.start_work()
    seconds, held = userroots.report_runtime_roots(s.store, peer_uid(s), lease_name, paths)
    s.stop_work()
    s.w.u64(seconds)
    s.w.u64(held)


@op(ExtOp.ListRoots)
def list_roots(s: Session) -> None:
    s.start_work()
    out = roots_overview(s.store, peer_uid(s), lambda r: not may_see(s, r.kind, r.uid))
    s.stop_work()
    s.w.string(json.dumps(out))
