"""Roots and collection: temp roots, indirect roots, FindRoots, CollectGarbage,
OptimiseStore."""

from __future__ import annotations

import os

from ...api import DEAD, DELETE_DEAD, DELETE_SPECIFIC, LIVE, GCOptions
from ...errors import PathInUse, StoreError
from ...formats.wire import (
    ADD_PERM_ROOT_MINOR,
    FEATURE_DELETE_DEAD_SPECIFIC,
    MAX_PATH_LEN,
    Op,
    Verbosity,
    format_version,
)
from ...store.gc.rootlist import all_roots
from ...store.optimise import optimise_store as run_optimiser
from ...store.policy import note_use
from ...store.roots import CENSORED, RootFinder, make_perm_link, make_perm_link_as, read_link_as
from ...store.roots import add_indirect_root as add_indirect_root_file
from ..errors import OpError
from ..registry import invalid, op
from ..session import Session
from .substitute import substituters
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
    note_use(s.store, [s.sd.print(sp)])
    s.stop_work()
    s.w.u64(1)


@op(Op.EnsurePath)
def ensure_path(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    if not s.store.pin_valid(sp):
        subs = substituters(s)
        try:
            ok = subs.realise(sp)
        except StoreError as e:
            raise OpError(str(e)) from None
        finally:
            subs.close()
        if not ok:
            raise OpError(f"path '{s.sd.print(sp)}' does not exist and cannot be created")
    note_use(s.store, [s.sd.print(sp)])
    s.stop_work()
    s.w.u64(1)


@op(Op.SyncWithGC)
def sync_with_gc(s: Session) -> None:
    s.start_work()
    s.stop_work()
    s.w.u64(1)


def _peer_groups(s: Session) -> list[int]:
    peer = s.peer
    assert peer is not None
    try:
        return os.getgrouplist(peer.user, peer.gid)
    except (KeyError, OSError):
        return [peer.gid]


def _claim_indirect_root(s: Session, link: str) -> None:
    """Register ``link`` as an indirect root claimed by the peer; what it points at is
    read with the peer's rights, never the daemon's."""
    st = s.store
    peer = s.peer
    read_link = None
    # root reading as root needs no child process of its own (a fork per root op).
    if peer is not None and not (peer.uid == 0 and os.geteuid() == 0):
        groups = _peer_groups(s)
        read_link = lambda p: read_link_as(p, peer.uid, peer.gid, groups)  # noqa: E731
    try:
        add_indirect_root_file(st.state_dir, link, peer_uid(s),
                               RootFinder(st.store_dir, st.real_store_dir, st.state_dir), read_link)
    except ValueError as e:
        raise OpError(str(e)) from None


@op(Op.AddIndirectRoot)
def add_indirect_root(s: Session) -> None:
    link = s.r.string("root path", MAX_PATH_LEN)
    s.start_work()
    _claim_indirect_root(s, link)
    s.stop_work()
    s.w.u64(1)


@op(Op.AddPermRoot)
def add_perm_root(s: Session) -> None:
    """AddPermRoot (1.36): make ``root`` a symlink to the store path, a permanent root.

    Nix lets only trusted clients do it (it writes as the daemon).  Our roots
    model lets every user make the roots they are allowed to: an untrusted
    peer's link is made with *its* rights (so only where it may write: its
    own directories, its ``gcroots/per-user/<user>``), then, outside
    ``gcroots/``, registered as an indirect root claimed by it, as
    AddIndirectRoot does.  A trusted peer's link is made as the daemon, as Nix
    does.
    """
    sp = s.read_path()
    root = s.r.string("root path", MAX_PATH_LEN)
    s.start_work()
    if s.minor < ADD_PERM_ROOT_MINOR:
        raise OpError(f"operation {int(Op.AddPermRoot)} (AddPermRoot) needs protocol 1.36; "
                      f"this connection speaks {format_version(s.version)}")
    if not root.startswith("/") or "\0" in root:
        raise OpError(f"cannot create a permanent root at '{root}': not an absolute path "
                      "(the daemon has no working directory of yours)")
    root = os.path.normpath(root)
    st = s.store
    if not st.pin_valid(sp):  # (pinned for this connection: no GC in between)
        raise invalid(s, sp)
    target = s.sd.print(sp)
    prefixes = tuple({st.store_dir.path, st.real_store_dir})
    gcroots = os.path.join(st.state_dir, "gcroots")
    inside = root == gcroots or root.startswith(gcroots + "/")
    peer = s.peer
    try:
        if s.trusted or peer is None:
            make_perm_link(root, target, prefixes)
        elif peer.uid == os.geteuid() or os.geteuid() == 0:
            make_perm_link_as(root, target, prefixes, peer.uid, peer.gid, _peer_groups(s))
        else:
            raise OpError("you are not privileged to create perm roots: this daemon cannot act "
                          "with your rights; create the symlink yourself and add it as an "
                          "indirect root (nix-store --add-root --indirect)")
    except OSError as e:
        raise OpError(f"cannot create the permanent root '{root}': "
                      f"{e.strerror or e}") from None
    if not inside:
        _claim_indirect_root(s, root)
    s.stop_work()
    s.w.string(root)


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
    delete_referrers = False
    if s.has_feature(FEATURE_DELETE_DEAD_SPECIFIC):
        # GCPaths: tag 1 = the whole store; tag 0 = a set of paths and deleteReferrers
        tag = r.u64("GCPaths tag", 1)
        specific = tag == 0
        paths = r.store_paths(s.sd, "pathsToDelete", lax=True) if specific else []
        if specific:
            delete_referrers = r.boolean("deleteReferrers")
    else:
        paths = r.store_paths(s.sd, "pathsToDelete", lax=True)
        # (before the feature, a set given with another action than deleteSpecific is
        # refused below for deleteDead and means the whole store for the others)
        specific = action == 3
    ignore_liveness = r.boolean("ignoreLiveness")
    max_freed = r.u64("maxFreed")
    for _ in range(3):
        r.u64("obsolete field")
    s.start_work()
    if ignore_liveness:
        raise OpError("you are not allowed to ignore liveness")
    if action not in _GC_ACTIONS:
        raise OpError(f"unknown garbage collector action {action}")
    if action == 2 and paths and not s.has_feature(FEATURE_DELETE_DEAD_SPECIFIC):
        raise OpError("deleting the dead paths of a specific set is not supported by the "
                      f"negotiated protocol (it needs the feature '{FEATURE_DELETE_DEAD_SPECIFIC}')")
    cfg = s.store.settings
    opts = GCOptions(action=_GC_ACTIONS[action], paths=frozenset(paths), max_freed=max_freed,
                     specific=specific, delete_referrers=delete_referrers,
                     keep_outputs=cfg.keep_outputs, keep_derivations=cfg.keep_derivations)
    try:
        # The collector holds gc.lock (and a pending batch) while it logs: a client that
        # stops reading must never hold it up, so nothing here waits for the client.
        with s.output_never_blocks():
            result = s.store.collect_garbage(opts, log=lambda m: s.log(Verbosity.INFO, m))
    except PathInUse as e:
        raise OpError(str(e)) from None
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
