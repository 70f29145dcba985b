"""The build operations: BuildPaths (9), BuildPathsWithResults (46), BuildDerivation (36),
QueryMissing (40).  Spec §5 (BuildResult, BasicDerivation, DerivedPath), §7.

The work is :class:`~storekeeper.build.Builder`'s; this module reads
requests, decides what the client may ask (repair needs trust; untrusted
clients may only BuildDerivation fixed-output derivations, whose outputs are
checked by hash), applies the client's build options, and answers in the
shape the real daemon answers:

* BuildPaths: ``1`` on success; a failure is ``STDERR_ERROR`` with the one
  failed build's message, or "build of '…', '…' failed" after logging each
  error when several failed (or the failure has no message of its own).
* BuildPathsWithResults / BuildDerivation: a BuildResult per target, failures
  included (no ``STDERR_ERROR``); ``builtOutputs`` names each output by its
  ``DrvOutput`` (``sha256:<hashModulo hex>!<output>``) with a Realisation
  JSON whose ``outPath`` is the output's basename.
"""

from __future__ import annotations

import json
import os
import select
import socket
from dataclasses import replace

from ...build import (
    Builder,
    BuildError,
    BuildMode,
    BuildResult,
    BuildSettings,
    what_is_missing,
)
from ...build.logger import format_error
from ...build.settings import build_refusal
from ...errors import StoreError
from ...formats.derivation import Derivation, DerivationOutput, DerivationType, derivation_type
from ...formats.errors import FormatError
from ...formats.wire import (
    CPU_TIMES_MINOR,
    MAX_PATH_LEN,
    ActivityType,
    DerivedPath,
    Op,
    Verbosity,
    WireWriter,
)
from ...store.policy import note_use
from ..errors import OpError
from ..registry import U32, op
from ..session import Session
from .options import build_base
from .substitute import substituters


def build_settings(s: Session) -> BuildSettings:
    """The daemon's build settings with what the client set (SetOptions: the fields and
    overrides the settings table lets this client set; a trusted client, anything)."""
    st = build_base(s).with_settings(s.options.overrides.items())
    # Without build users a builder runs as the daemon's own uid: only for a client
    # that could change the store anyway (build.confine, build_refusal).
    own = s.peer is not None and s.peer.uid == os.geteuid()
    return replace(st, client_may_build_as_daemon=s.trusted or own)


def _interrupted(s: Session):
    """True once the client has hung up or the daemon is stopping.

    Like the real daemon (which watches the client's socket for a hang-up),
    a build whose client is gone is stopped rather than run to the end.  Only
    a full close counts (POLLHUP): a client that merely shut down its sending
    side still reads our answers.
    """
    sock = getattr(s._write, "__self__", None)  # the connection, when served over a socket
    poller = None
    if isinstance(sock, socket.socket):
        poller = select.poll()
        poller.register(sock, select.POLLHUP | select.POLLERR)

    def check() -> bool:
        if s.stop_requested:
            return True
        return bool(poller is not None and poller.poll(0))
    return check


def _builder(s: Session, settings: BuildSettings | None = None) -> Builder:
    return Builder(s.store, settings or build_settings(s), s, _interrupted(s), substituters(s))


def _read_targets(s: Session) -> tuple[list[str], list[DerivedPath], BuildMode]:
    texts = s.r.strings("targets", item_limit=MAX_PATH_LEN + 4096)
    targets = [DerivedPath.parse(s.sd, t, lax=True) for t in texts]
    mode = s.r.u64("buildMode", U32)
    try:
        return texts, targets, BuildMode(mode)
    except ValueError:
        raise OpError(f"unknown build mode {mode}") from None


def _check_mode(s: Session, mode: BuildMode) -> None:
    if mode == BuildMode.REPAIR and not s.trusted:
        raise OpError("repairing is not allowed because you are not in 'trusted-users'")


def _built_outputs(s: Session, r: BuildResult) -> dict[str, str]:
    out = {}
    for name, path in sorted(r.built_outputs.items()):
        h = r.output_hashes.get(name)
        if h is None:
            continue
        drv_output = f"sha256:{h.hex()}!{name}"
        out[drv_output] = json.dumps({"dependentRealisations": {}, "id": drv_output,
                                      "outPath": path.base, "signatures": []},
                                     separators=(",", ":"))
    return out


def _write_result(s: Session, w: WireWriter, r: BuildResult) -> None:
    # (timesBuilt .. stopTime are [>= 29], builtOutputs [>= 28]: always, since 1.32)
    w.u64(int(r.status)).string(r.error_msg).u64(r.times_built).boolean(r.is_non_deterministic)
    w.u64(r.start_time).u64(r.stop_time)
    if s.minor >= CPU_TIMES_MINOR:
        for t in (r.cpu_user, r.cpu_system):  # optional microseconds: tag 0 absent, 1 + i64
            if t is None:
                w.u64(0)
            else:
                w.u64(1).u64(t & 0xFFFFFFFFFFFFFFFF)
    w.string_map(_built_outputs(s, r))


def _run(s: Session, builder: Builder, fn):
    try:
        return fn(builder)
    except BuildError as e:
        raise OpError(str(e)) from None
    finally:
        builder.close()


@op(Op.BuildPaths)
def build_paths(s: Session) -> None:
    _, targets, mode = _read_targets(s)
    s.start_work()
    _check_mode(s, mode)
    results = _run(s, _builder(s), lambda b: b.build(targets, mode))
    note_use(s.store, [s.sd.print(t.path) for t, r in zip(targets, results) if r.success])
    failed = [(t, r) for t, r in zip(targets, results) if not r.success]
    if failed:
        errors = [r.error_msg for _, r in failed if r.own_error]
        if len(failed) == 1 and errors:
            raise OpError(errors[0])
        for message in errors:
            s.log(Verbosity.ERROR, format_error(message))
        names = ", ".join(sorted({f"'{s.sd.print(t.path)}'" for t, _ in failed}))
        raise OpError(f"build of {names} failed")
    s.stop_work()
    s.w.u64(1)


@op(Op.BuildPathsWithResults)
def build_paths_with_results(s: Session) -> None:
    texts, targets, mode = _read_targets(s)
    s.start_work()
    _check_mode(s, mode)
    results = _run(s, _builder(s), lambda b: b.build(targets, mode))
    note_use(s.store, [s.sd.print(t.path) for t, r in zip(targets, results) if r.success])
    s.stop_work()
    s.w.u64(len(results))
    for text, r in zip(texts, results):
        s.w.string(text)
        _write_result(s, s.w, r)


@op(Op.BuildDerivation)
def build_derivation(s: Session) -> None:
    r = s.r
    drv_path = s.read_path("derivation path")
    outputs = {}
    for _ in range(r.count("derivation outputs", 1 << 16)):
        name = r.string("output name", MAX_PATH_LEN)
        outputs[name] = DerivationOutput(r.string("output path", MAX_PATH_LEN),
                                         r.string("output hash algorithm", MAX_PATH_LEN),
                                         r.string("output hash", MAX_PATH_LEN))
    input_srcs = r.store_paths(s.sd, "inputSrcs", lax=True)
    platform = r.string("platform", MAX_PATH_LEN)
    builder = r.string("builder", MAX_PATH_LEN)
    args = r.strings("args")
    env = r.string_map("env")
    mode = r.u64("buildMode", U32)
    s.start_work()
    if not drv_path.is_derivation:
        raise OpError(f"'{s.sd.print(drv_path)}' is not a derivation path")
    drv = Derivation(outputs=outputs, input_srcs=frozenset(s.sd.print(p) for p in input_srcs),
                     platform=platform, builder=builder, args=args, env=env)
    try:
        kind = derivation_type(drv)
    except FormatError as e:
        raise OpError(str(e)) from None
    # An untrusted client could otherwise register any content under an
    # input-addressed path; fixed outputs are checked against their hash.
    if not s.trusted and kind is not DerivationType.CA_FIXED:
        raise OpError("you are not privileged to build input-addressed derivations")
    try:
        build_mode = BuildMode(mode)
    except ValueError:
        raise OpError(f"unknown build mode {mode}") from None
    _check_mode(s, build_mode)
    settings = build_settings(s)
    # A store that cannot run builders is the daemon's problem, not a build result.
    refusal = build_refusal(s.store, settings)
    if refusal:
        raise OpError(f"cannot build '{s.sd.print(drv_path)}': {refusal}")
    result = _run(s, _builder(s, settings),
                  lambda b: b.build_basic(drv_path, drv, build_mode))
    s.stop_work()
    _write_result(s, s.w, result)


@op(Op.QueryMissing)
def query_missing_op(s: Session) -> None:
    targets = [DerivedPath.parse(s.sd, t, lax=True)
               for t in s.r.strings("targets", item_limit=MAX_PATH_LEN + 4096)]
    s.start_work()
    act = s.start_activity(Verbosity.DEBUG, ActivityType.UNKNOWN, "querying info about missing paths")
    subs = substituters(s)
    try:
        m = what_is_missing(s.store, targets, subs)
    except StoreError as e:
        raise OpError(str(e)) from None
    finally:
        subs.close()
    s.stop_activity(act)
    s.stop_work()
    s.w.store_paths(s.sd, m.will_build).store_paths(s.sd, m.will_substitute)
    s.w.store_paths(s.sd, m.unknown).u64(m.download_size).u64(m.nar_size)


__all__ = ["build_settings"]
