"""The worker operations: request fields, work, response (spec §6, §7).

Each handler reads its request fields from ``s.r``, calls ``s.start_work()``,
does the work, calls ``s.stop_work()`` and writes the response fields into
``s.w``.  Everything about errors, draining and closing is the session's job
(see :class:`~storekeeper.daemon.session.Session`); a handler just raises.

Operations that storekeeper cannot do yet still read their request in full,
so the client gets a clear error and the connection stays usable.  The build
operations live in :mod:`.build_ops`, imported at the end of this module so
that they register in :data:`OPS` too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable

from ..config.nixconf import SettingError
from ..config.settings import client_may_set, lookup

from ..formats.contentaddress import FLAT, RECURSIVE, TEXT
from ..formats.hashes import ALGO_SIZES, NIX32_ALPHABET
from ..formats.storepath import StorePath
from ..formats.wire import (
    EXPORT_MAGIC,
    MAX_PATH_LEN,
    Op,
    Verbosity,
    WireReader,
    WireWriter,
    read_path_info,
    write_path_info,
)
from ..errors import InvalidPath, StoreError
from ..store.build import BuildSettings
from ..store.gc import DEAD, DELETE_DEAD, DELETE_SPECIFIC, LIVE, GCOptions, PathInUse
from ..store.inspect import all_roots
from ..store.roots import CENSORED, RootFinder, read_link_as
from ..store.roots import add_indirect_root as add_indirect_root_file
from .session import NotSupported, OpError, Session

_U32 = 0xFFFFFFFF  # fields the real daemon reads with readInt
NIX32_CHARS = frozenset(NIX32_ALPHABET)


@dataclass(frozen=True)
class OpEntry:
    name: str
    handler: Callable[[Session], None]


OPS: dict[int, OpEntry] = {}


def _op(op: Op):
    def register(fn: Callable[[Session], None]) -> Callable[[Session], None]:
        OPS[int(op)] = OpEntry(op.name, fn)
        return fn
    return register


def _not_supported(op: Op, detail: str = "") -> None:
    raise NotSupported(f"operation {int(op)} ({op.name}) is not supported yet"
                       + (f": {detail}" if detail else ""))


def _invalid(s: Session, sp: StorePath) -> InvalidPath:
    return InvalidPath(f"path '{s.sd.print(sp)}' is not valid")


def _info_or_fail(s: Session, sp: StorePath):
    info = s.store.query_path_info(sp)
    if info is None:
        raise _invalid(s, sp)
    return info


# --- options ------------------------------------------------------------------

@_op(Op.SetOptions)
def set_options(s: Session) -> None:
    """The fixed fields and the overrides go through one rule, the settings table's
    (``config.settings.client_may_set``): a trusted client may set anything; an
    untrusted one only what the table allows, e.g. ``timeout`` only lower than the
    daemon's.  What is refused is ignored, as by the real daemon (which only logs it at
    debug level), with a warning when the client asked for a real change."""
    r = s.r
    keep_failed = r.u64("keepFailed", _U32)
    keep_going = r.u64("keepGoing", _U32)
    try_fallback = r.u64("tryFallback", _U32)
    verbosity = r.u64("verbosity", _U32)
    max_build_jobs = r.u64("maxBuildJobs", _U32)
    max_silent_time = r.u64("maxSilentTime", _U32)
    r.u64("useBuildHook", _U32)  # obsolete
    verbose_build = r.u64("verboseBuild", _U32)
    r.u64("logType", _U32)  # obsolete
    r.u64("printBuildTrace", _U32)  # obsolete
    build_cores = r.u64("buildCores", _U32)
    use_substitutes = r.u64("useSubstitutes", _U32)
    overrides = r.string_map("overrides", limit=1 << 16)
    s.start_work()
    o = s.options
    o.try_fallback = bool(try_fallback)
    o.verbosity = min(verbosity, Verbosity.VOMIT)
    o.verbose_build = verbose_build == Verbosity.ERROR  # 0 means "verbose"
    o.use_substitutes = bool(use_substitutes)
    fixed = [("keep-failed", "true" if keep_failed else "false"),
             ("keep-going", "true" if keep_going else "false"),
             ("max-jobs", str(max_build_jobs)), ("max-silent-time", str(max_silent_time)),
             ("cores", str(build_cores))]
    base = build_base(s)
    o.overrides = {}
    for name, value in [*fixed, *overrides.items()]:
        setting, _ = lookup(name)
        accepted = client_may_set(name, value, s.trusted, lambda n: s.config.value_of(n, base),
                                  s.warn)
        if accepted is None:
            if setting is not None and name not in _FIXED_DEFAULTS_QUIET \
                    and _differs(setting, value, s.config.value_of(setting.name, base)):
                s.warn(f"ignoring setting '{name}': only trusted users may set it "
                       f"(to this value) on this daemon")
            continue
        o.overrides[name] = accepted
    try:
        applied = base.with_settings(o.overrides.items())
    except StoreError as e:
        o.overrides = {}
        raise OpError(str(e)) from None
    o.keep_failed, o.keep_going = applied.keep_failed, applied.keep_going
    o.max_build_jobs, o.max_silent_time = applied.max_jobs, applied.max_silent_time
    o.build_cores = applied.cores
    s.stop_work()


#: fixed fields every Nix client sends with its own defaults: no warning when refused
_FIXED_DEFAULTS_QUIET = {"max-jobs", "max-silent-time", "cores", "keep-going"}


def _differs(setting, value: str, current) -> bool:
    try:
        return setting.parse(setting.name, value) != current
    except SettingError:
        return True


def build_base(s: Session) -> BuildSettings:
    """The daemon's own build settings: given at start, else nix.conf (read once per
    connection), with the daemon's build-users-group."""
    base = s.build_base
    if base is None:
        base = BuildSettings.from_nix_conf()
        if s.config.build_users_group is not None:
            base = replace(base, build_users_group=s.config.build_users_group)
        s.build_base = base
    return base


# --- queries -------------------------------------------------------------------

@_op(Op.IsValidPath)
def is_valid_path(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    valid = s.store.is_valid(sp)
    s.stop_work()
    s.w.bool(valid)


@_op(Op.QueryValidPaths)
def query_valid_paths(s: Session) -> None:
    paths = s.r.store_paths(s.sd, "paths", lax=True)
    s.r.u64("substitute")  # no substituters: nothing to substitute
    s.start_work()
    valid = s.store.query_valid_paths(paths)
    s.stop_work()
    s.w.store_paths(s.sd, valid)


@_op(Op.QueryPathInfo)
def query_path_info(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    info = s.store.query_path_info(sp)
    s.stop_work()
    # Unknown is an answer (valid = 0), not an error: clients rely on that.
    s.w.bool(info is not None)
    if info is not None:
        write_path_info(s.w, s.sd, info, with_path=False)


@_op(Op.QueryReferrers)
def query_referrers(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    # An invalid path has no referrers (not an error), as in Nix.
    referrers = s.store.query_referrers(sp) if s.store.is_valid(sp) else set()
    s.stop_work()
    s.w.store_paths(s.sd, referrers)


@_op(Op.QueryReferences)
def query_references(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    refs = _info_or_fail(s, sp).references
    s.stop_work()
    s.w.store_paths(s.sd, refs)


@_op(Op.QueryPathHash)
def query_path_hash(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    h = _info_or_fail(s, sp).nar_hash
    s.stop_work()
    s.w.string(h.base16)


@_op(Op.QueryDeriver)
def query_deriver(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    deriver = _info_or_fail(s, sp).deriver
    s.stop_work()
    s.w.opt_store_path(s.sd, deriver)


@_op(Op.QueryValidDerivers)
def query_valid_derivers(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    derivers = s.store.query_valid_derivers(sp)
    s.stop_work()
    s.w.store_paths(s.sd, derivers)


@_op(Op.QueryDerivationOutputMap)
def query_derivation_output_map(s: Session) -> None:
    drv = s.read_path("derivation path")
    s.start_work()
    outputs = s.store.query_derivation_outputs(drv)
    s.stop_work()
    s.w.string_map({name: s.sd.print(p) for name, p in sorted(outputs.items())})


@_op(Op.QueryDerivationOutputs)
def query_derivation_outputs(s: Session) -> None:
    drv = s.read_path("derivation path")
    s.start_work()
    outputs = s.store.query_derivation_outputs(drv)
    s.stop_work()
    s.w.store_paths(s.sd, outputs.values())


@_op(Op.QueryDerivationOutputNames)
def query_derivation_output_names(s: Session) -> None:
    drv = s.read_path("derivation path")
    s.start_work()
    outputs = s.store.query_derivation_outputs(drv)
    s.stop_work()
    s.w.strings(sorted(outputs))


@_op(Op.QueryAllValidPaths)
def query_all_valid_paths(s: Session) -> None:
    s.start_work()
    paths = s.store.query_all_valid_paths()
    s.stop_work()
    s.w.store_paths(s.sd, paths)


@_op(Op.QueryPathFromHashPart)
def query_path_from_hash_part(s: Session) -> None:
    hash_part = s.r.string("hash part", MAX_PATH_LEN)
    s.start_work()
    if len(hash_part) != 32 or not NIX32_CHARS.issuperset(hash_part):
        raise OpError(f"invalid hash part '{hash_part}'")
    sp = s.store.query_path_from_hash_part(hash_part)
    s.stop_work()
    s.w.opt_store_path(s.sd, sp)


# storekeeper has no substituters: every substitution query has an empty answer.

@_op(Op.HasSubstitutes)
def has_substitutes(s: Session) -> None:
    s.read_path()
    s.start_work()
    s.stop_work()
    s.w.bool(False)


@_op(Op.QuerySubstitutablePaths)
def query_substitutable_paths(s: Session) -> None:
    s.r.store_paths(s.sd, "paths", lax=True)
    s.start_work()
    s.stop_work()
    s.w.strings([])


@_op(Op.QuerySubstitutablePathInfo)
def query_substitutable_path_info(s: Session) -> None:
    s.read_path()
    s.start_work()
    s.stop_work()
    s.w.u64(0)


@_op(Op.QuerySubstitutablePathInfos)
def query_substitutable_path_infos(s: Session) -> None:
    for text in s.r.string_map("paths", item_limit=MAX_PATH_LEN):
        s.sd.parse(text, lax=True)
    s.start_work()
    s.stop_work()
    s.w.u64(0)


@_op(Op.QueryRealisation)
def query_realisation(s: Session) -> None:
    s.r.string("DrvOutput", MAX_PATH_LEN)
    s.start_work()
    s.stop_work()
    s.w.strings([])  # no realisations are recorded (no ca-derivations)


# --- reading store contents -----------------------------------------------------

@_op(Op.NarFromPath)
def nar_from_path(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    chunks = iter(s.store.dump_path(sp))
    # The first chunk is taken before STDERR_LAST so that a path whose files
    # are gone is reported as an error, not as a broken NAR.
    first = next(chunks, b"")
    s.stop_work()
    s.send(first)
    for chunk in chunks:
        s.send(chunk)


@_op(Op.ExportPath)
def export_path(s: Session) -> None:
    sp = s.read_path()
    s.r.u64("sign")  # obsolete: signing exports was removed
    s.start_work()
    info = _info_or_fail(s, sp)
    for chunk in s.store.dump_path(sp):
        s.write_data(chunk)
    trailer = WireWriter()
    trailer.u64(EXPORT_MAGIC).store_path(s.sd, sp).store_paths(s.sd, info.references)
    trailer.opt_store_path(s.sd, info.deriver).u64(0)
    s.write_data(trailer.take())
    s.stop_work()
    s.w.u64(1)


# --- adding to the store ---------------------------------------------------------

def _no_untrusted_repair(s: Session, repair: bool) -> None:
    if repair and not s.trusted:
        raise OpError("you are not privileged to repair paths")


def _parse_ca_method(cam: str) -> tuple[str, str]:
    """``text:sha256`` / ``fixed:r:ALGO`` / ``fixed:ALGO`` -> (method, algo)."""
    if cam == "text:sha256":
        return TEXT, "sha256"
    if cam.startswith("fixed:r:"):
        method, algo = RECURSIVE, cam[len("fixed:r:"):]
    elif cam.startswith("fixed:"):
        method, algo = FLAT, cam[len("fixed:"):]
    else:
        raise OpError(f"content-address method '{cam}' is not supported "
                      "(expected text:sha256, fixed:ALGO or fixed:r:ALGO)")
    if algo not in ALGO_SIZES:
        raise OpError(f"unknown hash algorithm '{algo}' in content-address method '{cam}'")
    return method, algo


@_op(Op.AddToStore)
def add_to_store(s: Session) -> None:
    r = s.r
    name = r.string("name", MAX_PATH_LEN)
    cam = r.string("content-address method", 64)
    refs = r.store_paths(s.sd, "references", lax=True)
    repair = r.bool("repair")
    payload = s.framed_payload()
    s.start_work()
    _no_untrusted_repair(s, repair)
    method, algo = _parse_ca_method(cam)
    info = s.store.add_dump(payload, name, method, algo, refs, repair)
    payload.drain()
    s.stop_work()
    write_path_info(s.w, s.sd, info, with_path=True)


@_op(Op.AddTextToStore)
def add_text_to_store(s: Session) -> None:
    name = s.r.string("name", MAX_PATH_LEN)
    text = s.r.bytes("text")
    refs = s.r.store_paths(s.sd, "references", lax=True)
    s.start_work()
    info = s.store.add_text(name, text, refs)
    s.stop_work()
    s.w.store_path(s.sd, info.path)


def _check_sigs(s: Session, dont_check_sigs: bool) -> bool:
    # Only a trusted client may waive signature checks (spec §11).
    if not s.config.require_sigs:
        return False
    return not (dont_check_sigs and s.trusted)


@_op(Op.AddToStoreNar)
def add_to_store_nar(s: Session) -> None:
    r = s.r
    sp = r.store_path(s.sd, "path")
    info = read_path_info(r, s.sd, path=sp)
    repair = r.bool("repair")
    dont_check_sigs = r.bool("dontCheckSigs")
    payload = s.framed_payload()
    s.start_work()
    _no_untrusted_repair(s, repair)
    if not s.trusted:
        info = info.with_(ultimate=False)
    s.store.add_nar(info, payload, repair=repair, check_sigs=_check_sigs(s, dont_check_sigs))
    payload.drain()
    s.stop_work()


@_op(Op.AddMultipleToStore)
def add_multiple_to_store(s: Session) -> None:
    repair = s.r.bool("repair")
    dont_check_sigs = s.r.bool("dontCheckSigs")
    payload = s.framed_payload()
    s.start_work()
    _no_untrusted_repair(s, repair)
    check_sigs = _check_sigs(s, dont_check_sigs)
    inner = WireReader(payload)
    for _ in range(inner.count("paths")):
        info = read_path_info(inner, s.sd).with_(ultimate=False)
        s.store.add_nar(info, payload, repair=repair, check_sigs=check_sigs)
    payload.drain()
    s.stop_work()


@_op(Op.AddSignatures)
def add_signatures(s: Session) -> None:
    sp = s.read_path()
    sigs = s.r.strings("signatures", limit=1 << 16, item_limit=4096)
    s.start_work()
    s.require_trusted("add signatures")
    s.store.add_signatures(sp, sigs)
    s.stop_work()
    s.w.u64(1)


# --- roots -------------------------------------------------------------------------

@_op(Op.AddTempRoot)
def add_temp_root(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    s.store.pin(sp)  # lives as long as this connection's process
    s.stop_work()
    s.w.u64(1)


@_op(Op.EnsurePath)
def ensure_path(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    if not s.store.pin_valid(sp):
        raise OpError(f"path '{s.sd.print(sp)}' does not exist and cannot be created")
    s.stop_work()
    s.w.u64(1)


@_op(Op.SyncWithGC)
def sync_with_gc(s: Session) -> None:
    s.start_work()
    s.stop_work()
    s.w.u64(1)


@_op(Op.AddIndirectRoot)
def add_indirect_root(s: Session) -> None:
    link = s.r.string("root path", MAX_PATH_LEN)
    s.start_work()
    from .user_ops import peer_uid  # (the peer claims the root: it may unregister it)
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


@_op(Op.FindRoots)
def find_roots(s: Session) -> None:
    from .user_ops import may_see
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


@_op(Op.CollectGarbage)
def collect_garbage(s: Session) -> None:
    r = s.r
    action = r.u64("action")
    paths = r.store_paths(s.sd, "pathsToDelete", lax=True)
    ignore_liveness = r.bool("ignoreLiveness")
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


@_op(Op.OptimiseStore)
def optimise_store(s: Session) -> None:
    from ..store.optimise import optimise_store as optimise
    s.start_work()
    with s.output_never_blocks():  # (the optimiser holds path locks while it logs)
        stats = optimise(s.store, log=lambda m: s.log(Verbosity.ERROR, m))
    s.log(Verbosity.INFO, stats.summary())  # Nix: "X MiB freed by hard-linking N files"
    s.stop_work()
    s.w.u64(1)


# --- verification ---------------------------------------------------------------------

@_op(Op.VerifyStore)
def verify_store(s: Session) -> None:
    check_contents = s.r.bool("checkContents")
    repair = s.r.bool("repair")
    s.start_work()
    if repair:
        s.require_trusted("repair paths")
    s.log(Verbosity.INFO, "reading the Nix store...")
    s.log(Verbosity.INFO, "checking path existence...")
    if check_contents:
        s.log(Verbosity.INFO, "checking link hashes...")
        s.log(Verbosity.INFO, "checking store hashes...")
    report = s.store.verify(check_contents=check_contents, repair=repair)
    for message in report.repaired:
        s.log(Verbosity.ERROR, message)
    for message in report.errors:
        s.log(Verbosity.ERROR, message)
    s.stop_work()
    s.w.bool(not report.ok)


# --- builds: see build_ops (BuildPaths, BuildPathsWithResults, BuildDerivation, QueryMissing)

@_op(Op.RegisterDrvOutput)
def register_drv_output(s: Session) -> None:
    s.r.string("realisation")
    s.start_work()
    _not_supported(Op.RegisterDrvOutput, "content-addressed derivations are not supported")


@_op(Op.AddBuildLog)
def add_build_log(s: Session) -> None:
    s.r.string("derivation", MAX_PATH_LEN)
    s.framed_payload()
    s.start_work()
    _not_supported(Op.AddBuildLog)


@_op(Op.ImportPaths)
def import_paths(s: Session) -> None:
    # The export stream would be pulled with STDERR_READ; 2.8 clients use
    # AddToStoreNar instead.
    s.start_work()
    _not_supported(Op.ImportPaths, "use a client that sends AddToStoreNar (Nix 2.4 or newer)")


from . import build_ops as _build_ops  # noqa: E402,F401 -- registers the build operations
from . import user_ops as _user_ops  # noqa: E402,F401 -- registers storekeeper's own operations
