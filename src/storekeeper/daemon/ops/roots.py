"""Roots and collection: temp roots, indirect roots, FindRoots, CollectGarbage,
OptimiseStore."""

from __future__ import annotations

import os

from ...api import DEAD, DELETE_DEAD, DELETE_SPECIFIC, LIVE, GCOptions
from ...errors import PathInUse
from ...formats.wire import (
    MAX_PATH_LEN,
    Op,
    Verbosity,
)
from ...store.gc.inspect import all_roots
from ...store.optimise import optimise_store as run_optimiser
from ...store.roots import CENSORED, RootFinder, read_link_as
from ...store.roots import add_indirect_root as add_indirect_root_file
from ..errors import OpError
from ..registry import op
from ..session import Session
from .user_roots import (  # (the peer claims an indirect root: it may unregister it)
    may_see,
    peer_uid,
)

# --- roots -------------------------------------------------------------------------

@op(Op.AddTempRoot)
def add_temp_root(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    s.store.pin(sp)  # lives as long as this connection's process
    s.stop_work()
    s.w.u64(1)


@op(Op.EnsurePath)
def ensure_path(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    if not s.store.pin_valid(sp):
        raise OpError(f"path '{s.sd.print(sp)}' does not exist and cannot be created")
    s.stop_work()
    s.w.u64(1)


@op(Op.SyncWithGC)
def sync_with_gc(s: Session) -> None:
    s.start_work()
    s.stop_work()
    s.w.u64(1)


@op(Op.AddIndirectRoot)
def add_indirect_root(s: Session) -> None:
    link = s.r.string("root path", MAX_PATH_LEN)
    s.start_work()
    st = s.store
    peer = s.peer
    read_link = None
    if peer is not None:
        # What the link points at is read with the peer's rights, never the daemon's.
        try:
            groups = os.getgrouplist(peer.user, peer.gid)
        except (KeyError, OSError):
            groups = [peer.gid]
        read_link = lambda p: read_link_as(p, peer.uid, peer.gid, groups)  # noqa: E731
    try:
        add_indirect_root_file(st.state_dir, link, peer_uid(s),
                               RootFinder(st.store_dir, st.real_store_dir, st.state_dir), read_link)
    except ValueError as e:
        raise OpError(str(e)) from None
    s.stop_work()
    s.w.u64(1)


@op(Op.FindRoots)
def find_roots(s: Session) -> None:
    s.start_work()
    roots: dict[str, set[str]] = {}
    for root in all_roots(s.store):
        if not s.store.is_valid(root.path):
            continue
        link = root.link if may_see(s, root.kind, root.uid) else CENSORED
        roots.setdefault(s.sd.print(root.path), set()).add(link)
    s.stop_work()
    pairs = [(link, path) for path in sorted(roots) for link in sorted(roots[path])]
    s.w.u64(len(pairs))
    for link, path in pairs:
        s.w.string(link)
        s.w.string(path)


_GC_ACTIONS = {0: LIVE, 1: DEAD, 2: DELETE_DEAD, 3: DELETE_SPECIFIC}


@op(Op.CollectGarbage)
def collect_garbage(s: Session) -> None:
    r = s.r
    action = r.u64("action")
    paths = r.store_paths(s.sd, "pathsToDelete", lax=True)
    ignore_liveness = r.boolean("ignoreLiveness")
    max_freed = r.u64("maxFreed")
    for _ in range(3):
        r.u64("obsolete field")
    s.start_work()
    if ignore_liveness:
        raise OpError("you are not allowed to ignore liveness")
    if action not in _GC_ACTIONS:
        raise OpError(f"unknown garbage collector action {action}")
    cfg = s.store.settings
    opts = GCOptions(action=_GC_ACTIONS[action], paths=frozenset(paths), max_freed=max_freed,
                     keep_outputs=cfg.keep_outputs, keep_derivations=cfg.keep_derivations)
    try:
        # The collector holds gc.lock (and a pending batch) while it logs: a client that
        # stops reading must never hold it up, so nothing here waits for the client.
        with s.output_never_blocks():
            result = s.store.collect_garbage(opts, log=lambda m: s.log(Verbosity.INFO, m))
    except PathInUse as e:
        raise OpError(str(e)) from None
    for m in result.messages:
        s.log(Verbosity.INFO, m)
    s.stop_work()
    s.w.strings(result.paths)
    s.w.u64(result.bytes_freed)
    s.w.u64(0)


@op(Op.OptimiseStore)
def optimise_store(s: Session) -> None:
    s.start_work()
    with s.output_never_blocks():  # (the optimiser holds path locks while it logs)
        stats = run_optimiser(s.store, log=lambda m: s.log(Verbosity.ERROR, m))
    s.log(Verbosity.INFO, stats.summary())  # Nix: "X MiB freed by hard-linking N files"
    s.stop_work()
    s.w.u64(1)
