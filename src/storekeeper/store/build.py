"""Builds: derivations realised on a local store, outside any sandbox.

A :class:`Builder` realises a set of targets (store paths, or derivation
outputs ``drv!out``) for one client: it realises the inputs of each
derivation first, runs up to ``max-jobs`` builders at once, and reports one
:class:`BuildResult` per target.  Invariants it keeps:

* **Pin, then check** (as :class:`~storekeeper.store.local.LocalStore`):
  every ``.drv``, input and output path is pinned (a temp root that lives as
  long as the store object, i.e. the daemon connection) before its validity is
  looked at.  Inputs therefore survive a concurrent GC for the whole build,
  an output being built (an invalid store-path name in the store) is left
  alone by the GC, and a client is handed outputs that stay valid until it
  has made its own root.
* **One builder per output path, store-wide.**  A derivation is built only
  while its output paths' ``.lock`` files are held (Nix's PathLocks, taken
  without blocking; a busy lock means another process, ours or Nix's, is
  building: we wait and then usually find the outputs valid).  Validity is
  re-checked once the locks are ours; leftovers at an output path are
  removed under the lock.
* **A build runs in a fresh, private build dir** (``<TMPDIR>/nix-build-<drv
  name>-<n>``, 0700, owned by the build user), with Nix's environment, as a
  build user from ``build-users-group`` when there is one (see
  :mod:`~storekeeper.store.buildusers`), in a new session, stdin from
  ``/dev/null``, stdout and stderr into one pipe that becomes the log.
* **Outputs are inspected only when nothing can change them**: the builder
  has exited, its process group and (with build users) every process of its
  uid have been killed.  Then every output must exist; the outputs are
  checked together by ``canonicalise_paths`` (owned by the build user, no
  hard link to an inode outside them, also when building as the daemon's own
  user) before anything in them is changed; references are found by
  scanning each output's NAR for the hash parts of the input closure and of
  the outputs; fixed outputs must have their declared hash.
* **All outputs of a build are registered in one transaction** (deriver =
  the ``.drv``, ``ultimate``, NAR hash and size, references, content address
  for fixed outputs), or none is.  A failed build registers nothing (except,
  as in Nix 2.8, a fixed output with the wrong hash, which becomes valid
  under the path its actual content gives), and its build user is released.
* **Outputs that are already valid are never written to.**  If some outputs
  of a derivation are valid but must be built again (``--check``, or a
  sibling output is missing), the builder writes them to a scratch path of
  the same length and the scratch hash part is rewritten to the real one
  afterwards (Nix's hash rewriting); ``--check`` compares the result with
  the registered NAR hash and keeps a differing copy at ``<out>.check`` with
  ``keep-failed``.
* **Builds need a store whose store dir is real**: a chroot store (logical
  ``/nix/store``, files elsewhere) would hand builders paths that do not
  exist on this machine, and storekeeper has no sandbox to make them exist;
  such builds are refused with a clear error.  Paths that are already valid
  are realised on any store.
"""

from __future__ import annotations

import enum
import hashlib
import os
import select
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from .. import fs
from ..config import settings as settings_table
from ..config.settings import this_system  # noqa: F401 -- re-exported
from ..errors import StoreError
from ..formats.contentaddress import FLAT, RECURSIVE, ContentAddress
from ..formats.derivation import (
    Derivation,
    DerivationType,
    derivation_type,
    hash_derivation_modulo,
)
from ..formats.errors import FormatError
from ..formats.hashes import Hash, new_hasher
from ..formats.pathinfo import ValidPathInfo
from ..formats.refscan import RefScanner
from ..formats.storepath import StorePath, output_path_name
from ..formats.wire import ActivityType, DerivedPath, ResultType, Verbosity
from ..fs import remove_tree
from ..fs.narfs import dump_path, restore_nar
from . import confine
from .buildlog import BuildLogFile, LineSplitter
from .buildusers import BuildUser, BuildUserError, UserPool
from .canonicalise import canonicalise_paths
from .locks import PathLocks
from .optimise import optimise_path
from .settings import apply_settings, environment_settings

_d = settings_table.default_of

# --- results ------------------------------------------------------------------


class BuildStatus(enum.IntEnum):
    """BuildResult.Status on the wire (spec §2)."""

    BUILT = 0
    SUBSTITUTED = 1
    ALREADY_VALID = 2
    PERMANENT_FAILURE = 3
    INPUT_REJECTED = 4
    OUTPUT_REJECTED = 5
    TRANSIENT_FAILURE = 6
    CACHED_FAILURE = 7
    TIMED_OUT = 8
    MISC_FAILURE = 9
    DEPENDENCY_FAILED = 10
    LOG_LIMIT_EXCEEDED = 11
    NOT_DETERMINISTIC = 12
    RESOLVES_TO_ALREADY_VALID = 13
    NO_SUBSTITUTERS = 14


class BuildMode(enum.IntEnum):
    NORMAL = 0
    REPAIR = 1
    CHECK = 2


_SUCCESS = {BuildStatus.BUILT, BuildStatus.SUBSTITUTED, BuildStatus.ALREADY_VALID,
            BuildStatus.RESOLVES_TO_ALREADY_VALID}


@dataclass
class BuildResult:
    """The outcome for one target.

    ``built_outputs`` maps each wanted output of a derivation target to its
    (now valid) path; ``output_hashes`` holds the derivation's hashModulo per
    output, which names those outputs on the wire (``sha256:<hex>!out``).
    """

    status: BuildStatus
    error_msg: str = ""
    times_built: int = 0
    is_non_deterministic: bool = False
    start_time: int = 0
    stop_time: int = 0
    #: CPU time of the build in microseconds (None: not measured; protocol 1.37)
    cpu_user: int | None = None
    cpu_system: int | None = None
    built_outputs: dict[str, StorePath] = field(default_factory=dict)
    output_hashes: dict[str, bytes] = field(default_factory=dict)
    #: False for failures that are only a consequence (cancelled, nothing to
    #: substitute from): Nix reports them as "build of … failed", not by message
    own_error: bool = True

    @property
    def success(self) -> bool:
        return self.status in _SUCCESS


def _wait_with_times(proc) -> tuple[int, tuple[int | None, int | None]]:
    """The builder's exit status and its CPU times in microseconds (user, system; its
    waited-for descendants included), or (None, None) when they cannot be had."""
    if proc is None:
        return 1, (None, None)
    if proc.returncode is None:
        try:
            _, st, ru = os.wait4(proc.pid, 0)
        except ChildProcessError:
            pass
        else:
            proc.returncode = os.waitstatus_to_exitcode(st)
            return proc.returncode, (int(ru.ru_utime * 1e6), int(ru.ru_stime * 1e6))
    return proc.wait(), (None, None)


class BuildError(StoreError):
    """A build request failed as a whole (the message is Nix's)."""


# --- settings -----------------------------------------------------------------


@dataclass(frozen=True)
class BuildSettings:
    """What builds obey (nix.conf names with '-' for '_'); defaults, parsing and
    meaning are in :mod:`storekeeper.config.settings`."""

    #: None: Nix's default, ``nixbld`` when the daemon runs as root, else none
    build_users_group: str | None = None
    max_jobs: int = field(default_factory=_d("max-jobs"))
    cores: int = field(default_factory=_d("cores"))
    timeout: int = field(default_factory=_d("timeout"))                  # seconds, 0: none
    max_silent_time: int = field(default_factory=_d("max-silent-time"))  # seconds, 0: none
    keep_failed: bool = field(default_factory=_d("keep-failed"))
    keep_going: bool = field(default_factory=_d("keep-going"))
    sandbox: bool = field(default_factory=_d("sandbox"))
    compress_build_log: bool = field(default_factory=_d("compress-build-log"))
    keep_build_log: bool = field(default_factory=_d("keep-build-log"))
    log_lines: int = field(default_factory=_d("log-lines"))
    max_log_size: int = field(default_factory=_d("max-log-size"))        # bytes, 0: unlimited
    system: str = field(default_factory=_d("system"))
    extra_platforms: tuple[str, ...] = field(default_factory=_d("extra-platforms"))
    system_features: tuple[str, ...] = field(default_factory=_d("system-features"))
    #: where build dirs are made; None: ``$TMPDIR`` or ``/tmp``, as Nix 2.8
    build_dir: str | None = field(default_factory=_d("build-dir"))
    #: NO_NEW_PRIVS and a seccomp filter (no setuid/setgid files, no xattrs) for every
    #: builder (:mod:`~storekeeper.store.confine`); false: neither, as Nix 2.8
    filter_syscalls: bool = field(default_factory=_d("filter-syscalls"))
    #: not a nix.conf setting: whether this client may have a builder run as the daemon's
    #: own user (no build users).  The daemon sets it per connection (trusted, or the
    #: daemon's own uid); the local CLI on its own store keeps the default.
    client_may_build_as_daemon: bool = True

    @property
    def group(self) -> str:
        """The effective build users group ("" = build as the daemon's own user)."""
        if self.build_users_group is None:
            return "nixbld" if os.geteuid() == 0 else ""
        return self.build_users_group or ""

    def _replace(self, **changes: Any) -> BuildSettings:
        """``dataclasses.replace``: what :func:`~storekeeper.store.settings.apply_settings` calls."""
        return replace(self, **changes)

    def with_settings(self, pairs: Iterable[tuple[str, str]]) -> "BuildSettings":
        """Apply nix.conf-style settings in order; names builds do not use are ignored."""
        return apply_settings(self, settings_table.BUILD, pairs)

    @classmethod
    def from_nix_conf(cls, env: Mapping[str, str] | None = None) -> "BuildSettings":
        return cls().with_settings(environment_settings(env))


# --- logging ------------------------------------------------------------------


class BuildLogger(Protocol):
    """Where build progress goes (the daemon session implements this)."""

    def log(self, level: int, message: str) -> None: ...

    def start_activity(self, level: int, act_type: int, text: str,
                       fields: Sequence[int | str] = (), parent: int = 0) -> int: ...

    def stop_activity(self, act_id: int) -> None: ...

    def result(self, act_id: int, result_type: int, fields: Sequence[int | str]) -> None: ...


class NullLogger:
    def __init__(self) -> None:
        self._n = 0

    def log(self, level: int, message: str) -> None:
        pass

    def start_activity(self, level: int, act_type: int, text: str,
                       fields: Sequence[int | str] = (), parent: int = 0) -> int:
        self._n += 1
        return self._n

    def stop_activity(self, act_id: int) -> None:
        pass

    def result(self, act_id: int, result_type: int, fields: Sequence[int | str]) -> None:
        pass


class _GuardedLogger:
    """Passes calls on until one fails (the client went away); after that the
    failure has been raised once and everything else is dropped, so that
    cleanup after a lost client never fails on logging."""

    def __init__(self, inner: BuildLogger) -> None:
        self.inner = inner
        self.broken = False

    def _call(self, fn, *args, default=None):
        if self.broken:
            return default
        try:
            return fn(*args)
        except BaseException:
            self.broken = True
            raise

    def log(self, level: int, message: str) -> None:
        self._call(self.inner.log, level, message)

    def start_activity(self, level: int, act_type: int, text: str,
                       fields: Sequence[int | str] = (), parent: int = 0) -> int:
        return self._call(self.inner.start_activity, level, act_type, text, fields, parent, default=0)

    def stop_activity(self, act_id: int) -> None:
        self._call(self.inner.stop_activity, act_id)

    def result(self, act_id: int, result_type: int, fields: Sequence[int | str]) -> None:
        self._call(self.inner.result, act_id, result_type, fields)


def format_error(message: str) -> str:
    """An error as Nix's logger prints it: coloured tag, continuation lines indented."""
    return "\x1b[31;1merror:\x1b[0m " + message.replace("\n", "\n       ")


# --- what is missing ----------------------------------------------------------


def build_refusal(store, settings: BuildSettings) -> str | None:
    """Why ``store`` cannot run builders at all (None if it can)."""
    if settings.sandbox:
        return "storekeeper has no build sandbox (set 'sandbox = false')"
    if store.store_dir.path != os.path.normpath(store.real_store_dir):
        return (f"builds need a store whose store dir is real on this machine, or the sandbox "
                f"(this store's '{store.store_dir.path}' is kept in '{store.real_store_dir}')")
    if store.read_only:
        return "the store is read-only"
    if settings.filter_syscalls and confine.native_arch() is None:
        return (f"storekeeper has no seccomp filter for '{os.uname().machine}' "
                "(set 'filter-syscalls = false' to build without one)")
    # Without build users the builder runs as the daemon's own uid (confine.py says
    # what that allows): only for clients that could change the store anyway.
    as_daemon = not (settings.group and os.geteuid() == 0)
    return confine.self_build_refusal(as_daemon, settings.client_may_build_as_daemon)



def query_missing(store, targets: Iterable[DerivedPath]) -> tuple[set[StorePath], set[StorePath]]:
    """(will build, unknown) for realising ``targets`` on a store without substituters.

    An invalid opaque path or ``.drv`` is unknown.  A derivation with a wanted
    output that is not valid will be built, and so will (recursively) the
    input derivations whose used outputs are not valid; invalid input sources
    are unknown.  Nothing is pinned: this only answers a question.
    """
    will_build: set[StorePath] = set()
    unknown: set[StorePath] = set()
    seen: set[tuple[StorePath, frozenset[str] | None]] = set()
    queue = deque(targets)
    sd = store.store_dir
    while queue:
        dp = queue.popleft()
        wanted = None if dp.all_outputs or not dp.is_built else dp.outputs
        key = (dp.path, wanted if dp.is_built else frozenset({"<opaque>"}))
        if key in seen:
            continue
        seen.add(key)
        if not store.is_valid(dp.path):
            unknown.add(dp.path)
            continue
        if not dp.is_built or not dp.path.is_derivation:
            continue
        drv = store._read_drv_file(dp.path)
        paths = store.query_derivation_outputs(dp.path)
        paths.update({n: sd.parse(o.path, lax=True) for n, o in drv.outputs.items() if o.path})
        names = drv.outputs.keys() if wanted is None else wanted
        if all(n in paths and store.is_valid(paths[n]) for n in names):
            continue
        will_build.add(dp.path)
        for path, outs in drv.input_drvs.items():
            queue.append(DerivedPath(sd.parse(path, lax=True), frozenset(outs)))
        for path in drv.input_srcs:
            queue.append(DerivedPath(sd.parse(path, lax=True)))
    return will_build, unknown


# --- goals --------------------------------------------------------------------


class _Failure(Exception):
    def __init__(self, status: BuildStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class _Goal:
    top: bool = False
    result: BuildResult | None = None
    deps: list["_Goal"] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def failed(self) -> bool:
        return self.result is not None and not self.result.success


@dataclass(eq=False, kw_only=True)
class _PathGoal(_Goal):
    path: StorePath


@dataclass(eq=False, kw_only=True)
class _DrvGoal(_Goal):
    drv_path: StorePath
    drv: Derivation | None = None  # read when the goal is first expanded
    basic: bool = False                       # from BuildDerivation: no input drvs to realise
    wanted: set[str] | None = field(default_factory=set)  # None: all outputs
    mode: BuildMode = BuildMode.NORMAL
    outputs: dict[str, StorePath] = field(default_factory=dict)
    hashes: dict[str, bytes] = field(default_factory=dict)
    need_build: bool = False
    expanded: bool = False
    ready: bool = False
    waiting_note: str = ""                   # what we already told the client we wait for
    wait_act: int | None = None

    def want(self, outputs: Iterable[str] | None) -> bool:
        """Add wanted outputs (None = all); True if that changed anything."""
        if self.wanted is None:
            return False
        if outputs is None:
            self.wanted = None
            return True
        new = set(outputs) - self.wanted
        self.wanted |= new
        return bool(new)

    def wanted_names(self) -> list[str]:
        assert self.drv is not None
        return sorted(self.drv.outputs) if self.wanted is None else sorted(self.wanted)


@dataclass(eq=False)
class _Run:
    """One builder process and what belongs to it until it is reaped."""

    goal: _DrvGoal
    proc: subprocess.Popen | None
    fd: int | None
    locks: PathLocks
    user: BuildUser | None
    tmpdir: str
    scratch: dict[str, StorePath]
    log_file: BuildLogFile | None
    splitter: LineSplitter
    act: int
    start: float
    last_output: float
    start_wall: int = 0
    log_bytes: int = 0
    killed_for: _Failure | None = None
    exec_error: str | None = None


# --- the builder --------------------------------------------------------------


class Builder:
    """Realises targets on one :class:`LocalStore` for one client (module docstring)."""

    POLL = 0.2

    def __init__(self, store, settings: BuildSettings | None = None,
                 logger: BuildLogger | None = None,
                 interrupted: Callable[[], bool] | None = None) -> None:
        """``interrupted()`` is asked about once a second: True (the client hung up,
        the daemon is stopping) kills the builds and fails the request."""
        self.interrupted = interrupted or (lambda: False)
        self.store = store
        self.sd = store.store_dir
        self.settings = settings or BuildSettings()
        self.logger = _GuardedLogger(logger or NullLogger())
        self._drv_goals: dict[StorePath, _DrvGoal] = {}
        self._path_goals: dict[StorePath, _PathGoal] = {}
        self._hash_cache: dict = {}
        self._running: list[_Run] = []
        self._cancelled = False
        self._expected = self._done = self._failed = 0
        self._acts: dict[str, int] = {}

    # --- public entry points --------------------------------------------------

    def build(self, targets: Sequence[DerivedPath], mode: BuildMode = BuildMode.NORMAL) -> list[BuildResult]:
        """Realise ``targets``; one result per target, in order."""
        mode = BuildMode(mode)
        if mode == BuildMode.REPAIR:
            raise BuildError("repairing builds is not supported by storekeeper; "
                             "delete the path and build it again")
        tops: list[_Goal] = []
        with self._activities():
            for dp in targets:
                if dp.is_built:
                    g = self._drv_goal(dp.path)
                    g.top = True
                    g.want(None if dp.all_outputs else dp.outputs)
                    if mode == BuildMode.CHECK:
                        g.mode = BuildMode.CHECK
                    tops.append(g)
                else:
                    pg = self._path_goal(dp.path)
                    pg.top = True
                    tops.append(pg)
            self._plan()
            self._execute(tops)
        return [g.result for g in tops]  # type: ignore[misc]

    def build_basic(self, drv_path: StorePath, drv: Derivation,
                    mode: BuildMode = BuildMode.NORMAL) -> BuildResult:
        """BuildDerivation: build ``drv`` as given (its inputs must already be valid)."""
        mode = BuildMode(mode)
        if mode == BuildMode.REPAIR:
            raise BuildError("repairing builds is not supported by storekeeper")
        g = _DrvGoal(top=True, drv_path=drv_path, drv=drv, basic=True, wanted=None, mode=mode)
        self._drv_goals[drv_path] = g
        with self._activities():
            self._plan()
            self._execute([g])
        return g.result  # type: ignore[return-value]

    # --- activities (the shape the real daemon sends; spec §4) ------------------

    class _Acts:
        def __init__(self, b: "Builder") -> None:
            self.b = b

        def __enter__(self) -> None:
            lg, a = self.b.logger, self.b._acts
            a["realise"] = lg.start_activity(Verbosity.ERROR, ActivityType.REALISE, "")
            a["builds"] = lg.start_activity(Verbosity.ERROR, ActivityType.BUILDS, "")
            a["copy"] = lg.start_activity(Verbosity.ERROR, ActivityType.COPY_PATHS, "")

        def __exit__(self, *exc: object) -> None:
            lg, a = self.b.logger, self.b._acts
            for name in ("copy", "builds", "realise"):
                lg.stop_activity(a.pop(name))

    def _activities(self) -> "_Acts":
        return Builder._Acts(self)

    def _progress(self) -> None:
        lg, a = self.logger, self._acts
        running = len(self._running)
        lg.result(a["builds"], ResultType.PROGRESS, [self._done, self._expected, running, self._failed])
        lg.result(a["copy"], ResultType.PROGRESS, [0, 0, 0, 0])
        lg.result(a["realise"], ResultType.SET_EXPECTED, [ActivityType.FILE_TRANSFER, 0])
        lg.result(a["realise"], ResultType.SET_EXPECTED, [ActivityType.COPY_PATH, 0])

    # --- planning ---------------------------------------------------------------

    def _drv_goal(self, drv_path: StorePath) -> _DrvGoal:
        g = self._drv_goals.get(drv_path)
        if g is None:
            g = self._drv_goals[drv_path] = _DrvGoal(drv_path=drv_path)
        return g

    def _path_goal(self, path: StorePath) -> _PathGoal:
        g = self._path_goals.get(path)
        if g is None:
            g = self._path_goals[path] = _PathGoal(path=path)
            if self.store.pin_valid(path):
                g.result = BuildResult(BuildStatus.ALREADY_VALID)
            else:
                g.result = BuildResult(
                    BuildStatus.NO_SUBSTITUTERS,
                    f"path '{self.sd.print(path)}' is required, but there is no substituter "
                    "that can build it", own_error=False)
        return g

    def _plan(self) -> None:
        """Decide, for every derivation reachable from the targets, whether it
        must be built; repeated until no goal's wanted outputs grow."""
        queue = deque(g for g in self._drv_goals.values() if not g.done)
        while queue:
            g = queue.popleft()
            if g.done:
                continue
            try:
                queue.extend(self._evaluate(g))
            except _Failure as f:
                self._finish(g, BuildResult(f.status, str(f)))
        self._expected = sum(1 for g in self._drv_goals.values() if g.need_build and not g.done)
        if self._expected:
            self._progress()
        # (shown at debug level only; the real daemon sends it at this point)
        self.logger.stop_activity(self.logger.start_activity(
            Verbosity.DEBUG, ActivityType.UNKNOWN, "querying info about missing paths"))

    def _evaluate(self, g: _DrvGoal) -> list[_DrvGoal]:
        store, sd = self.store, self.sd
        printed = sd.print(g.drv_path)
        if g.drv is None:
            if not store.pin_valid(g.drv_path):
                raise _Failure(BuildStatus.MISC_FAILURE, f"cannot build missing derivation '{printed}'")
            g.drv = store._read_drv_file(g.drv_path)
        drv = g.drv
        if not g.outputs:
            g.outputs = self._output_paths(g)
            for p in g.outputs.values():
                store.pin(p)
        missing = [o for o in (g.wanted or ()) if o not in drv.outputs]
        if missing:
            raise _Failure(BuildStatus.MISC_FAILURE, f"derivation '{printed}' does not have wanted "
                           f"outputs {', '.join(repr(m) for m in sorted(missing))}")
        valid = {o: store.is_valid(p) for o, p in g.outputs.items()}
        if g.mode == BuildMode.CHECK:
            if not all(valid.values()):
                raise _Failure(BuildStatus.MISC_FAILURE, f"some outputs of '{printed}' are not "
                               "valid, so checking is not possible")
            g.need_build = True
        else:
            g.need_build = not all(valid[o] for o in g.wanted_names())
        if not g.need_build or g.expanded:
            return []
        g.expanded = True
        more: list[_DrvGoal] = []
        if not g.basic:
            for path, outs in sorted(drv.input_drvs.items()):
                child = self._drv_goal(sd.parse(path, lax=True))
                g.deps.append(child)
                if child.want(outs) or not child.expanded:
                    more.append(child)
        for path in sorted(drv.input_srcs):
            g.deps.append(self._path_goal(sd.parse(path, lax=True)))
        return more

    def _output_paths(self, g: _DrvGoal) -> dict[str, StorePath]:
        """The output paths of a derivation; fixed ones are recomputed from their hash."""
        drv, sd = g.drv, self.sd
        assert drv is not None and g.drv_path is not None
        printed = sd.print(g.drv_path)
        try:
            kind = derivation_type(drv)
        except FormatError as e:
            raise _Failure(BuildStatus.MISC_FAILURE, f"derivation '{printed}': {e}") from None
        if kind not in (DerivationType.INPUT_ADDRESSED, DerivationType.CA_FIXED):
            raise _Failure(BuildStatus.MISC_FAILURE,
                           f"cannot build '{printed}': {kind.value} derivations (experimental "
                           "content-addressed or impure derivations) are not supported")
        out: dict[str, StorePath] = {}
        for name, o in drv.outputs.items():
            p = sd.parse(o.path, lax=True)
            if o.is_fixed:
                should = sd.make_fixed_output_path(output_path_name(g.drv_path.name[:-4], name),
                                                   o.recursive, o.fixed_hash())
                if should != p:
                    raise _Failure(BuildStatus.MISC_FAILURE,
                                   f"derivation '{printed}' has incorrect output '{o.path}', "
                                   f"should be '{sd.print(should)}'")
            out[name] = p
        return out

    def _output_hashes(self, g: _DrvGoal) -> dict[str, bytes]:
        if not g.hashes:
            assert g.drv is not None  # _evaluate read it
            def read(path: str) -> Derivation:
                return self.store.read_derivation(self.sd.parse(path, lax=True))
            g.hashes = hash_derivation_modulo(g.drv, self.sd, read, True, self._hash_cache,
                                              drv_name=g.drv_path.name[:-4])
        return g.hashes

    # --- running ----------------------------------------------------------------

    def _execute(self, tops: list[_Goal]) -> None:
        try:
            while not all(g.done for g in tops):
                if self.interrupted():
                    raise BuildError("build interrupted: the client went away or the daemon "
                                     "is stopping")
                self._settle()
                if all(g.done for g in tops):
                    break
                if self._cancelled:
                    self._cancel_rest()
                    continue
                changed = self._start_ready()
                if self._running:
                    self._wait(self.POLL if self._has_waiters() else self._next_deadline())
                elif not changed:
                    if not self._has_waiters():
                        # nothing runs, changes or waits: a cycle, which the
                        # .drv checks make impossible
                        for g in self._drv_goals.values():
                            if not g.done:
                                self._finish(g, BuildResult(BuildStatus.MISC_FAILURE,
                                                            "derivation graph is stuck (cycle?)"))
                        continue
                    time.sleep(self.POLL)
        finally:
            # Also on the way out of an error (say the client is gone): no
            # builder outlives the request, and every run gives back its
            # locks, build user and build dir.
            for run in list(self._running):
                self._kill(run)
            for run in list(self._running):
                try:
                    self._reap(run, cancelled=True)
                except Exception:  # noqa: BLE001 -- the first error is already on its way up
                    pass

    def _has_waiters(self) -> bool:
        return any(g.ready and not g.done and g.waiting_note for g in self._drv_goals.values())

    def _settle(self) -> None:
        changed = True
        while changed:
            changed = False
            for g in self._drv_goals.values():
                if g.done or g.ready or not all(d.done for d in g.deps):
                    continue
                failed = [d for d in g.deps if d.failed]
                if failed:
                    self._finish(g, BuildResult(
                        BuildStatus.DEPENDENCY_FAILED,
                        f"{len(failed)} dependencies of derivation '{self.sd.print(g.drv_path)}' "
                        "failed to build"))
                elif not g.need_build:
                    self._finish(g, self._valid_result(g, BuildStatus.ALREADY_VALID))
                else:
                    g.ready = True
                changed = True

    def _cancel_rest(self) -> None:
        for run in list(self._running):
            self._kill(run)
            self._reap(run, cancelled=True)
        for g in self._drv_goals.values():
            if not g.done:
                self._finish(g, BuildResult(
                    BuildStatus.MISC_FAILURE,
                    f"build of '{self.sd.print(g.drv_path)}' was cancelled because another "
                    "build failed (use --keep-going to go on)", own_error=False), quiet=True)

    def _finish(self, g: _DrvGoal, result: BuildResult, quiet: bool = False) -> None:
        if g.done:
            return
        g.result = result
        if g.wait_act is not None:
            self.logger.stop_activity(g.wait_act)
            g.wait_act = None
        if g.need_build and g.ready:
            if result.success:
                self._done += 1
            else:
                self._failed += 1
            if self._acts:
                self._progress()
        if not result.success:
            if not g.top and not quiet and result.status != BuildStatus.DEPENDENCY_FAILED:
                # a dependency's error is only logged; its parent reports the failure
                self.logger.log(Verbosity.ERROR, format_error(result.error_msg))
            if not self.settings.keep_going:
                self._cancelled = True

    def _valid_result(self, g: _DrvGoal, status: BuildStatus, **kw) -> BuildResult:
        built = {o: g.outputs[o] for o in g.wanted_names()}
        try:
            hashes = self._output_hashes(g)
        except (FormatError, StoreError):
            hashes = {}
        return BuildResult(status, built_outputs=built, output_hashes=hashes, **kw)

    def _start_ready(self) -> bool:
        """Start what may start; True if anything changed (started, or finished without a build)."""
        started = False
        done_before = sum(1 for g in self._drv_goals.values() if g.done)
        for g in sorted((g for g in self._drv_goals.values() if g.ready and not g.done),
                        key=lambda g: g.drv_path.base):
            if any(r.goal is g for r in self._running):
                continue
            if len(self._running) >= max(self.settings.max_jobs, 1):
                break
            try:
                if self._try_start(g):
                    started = True
            except _Failure as f:
                self._finish(g, BuildResult(f.status, str(f)))
        return started or sum(1 for g in self._drv_goals.values() if g.done) != done_before

    def _wait_note(self, g: _DrvGoal, note: str) -> None:
        if g.waiting_note != note:
            if g.wait_act is not None:
                self.logger.stop_activity(g.wait_act)
            g.wait_act = self.logger.start_activity(Verbosity.WARN, ActivityType.BUILD_WAITING, note)
            g.waiting_note = note

    def _try_start(self, g: _DrvGoal) -> bool:
        store, sd, st = self.store, self.sd, self.settings
        drv = g.drv
        assert drv is not None
        printed = sd.print(g.drv_path)
        if st.max_jobs <= 0:
            raise _Failure(BuildStatus.MISC_FAILURE, "unable to start any build; either increase "
                           "'--max-jobs' or enable remote builds")
        self._check_platform(g)
        refusal = build_refusal(store, st)
        if refusal:
            raise _Failure(BuildStatus.MISC_FAILURE, f"cannot build '{printed}': {refusal}")
        if drv.builder.startswith("builtin:"):
            raise _Failure(BuildStatus.MISC_FAILURE,
                           f"unsupported builtin builder '{drv.builder[len('builtin:'):]}'")
        locks = PathLocks()
        reals = [store.real_path(p) for p in g.outputs.values()]
        if not locks.lock(reals, wait=False):
            self._wait_note(g, "waiting for lock on " + ", ".join(
                f"'{r}'" for r in sorted(reals)))
            return False
        try:
            valid = {o: store.is_valid(p) for o, p in g.outputs.items()}
            if g.mode == BuildMode.NORMAL and all(valid[o] for o in g.wanted_names()):
                # someone else built it while we waited for the locks
                locks.delete_on_release = True
                locks.release()
                g.need_build = False
                self._finish(g, self._valid_result(g, BuildStatus.ALREADY_VALID))
                return False
            user = None
            group = st.group
            if group and os.geteuid() == 0:
                try:
                    user = UserPool(group, store.state_dir).try_acquire()
                except BuildUserError as e:
                    raise _Failure(BuildStatus.MISC_FAILURE, str(e)) from None
                if user is None:
                    locks.release()
                    self._wait_note(g, f"waiting for UID to build '{printed}'")
                    return False
            g.waiting_note = ""
            if g.wait_act is not None:
                self.logger.stop_activity(g.wait_act)
                g.wait_act = None
            store.auto_gc()
            try:
                self._spawn(g, locks, user, valid)
            except BaseException:
                if user is not None and not any(r.goal is g for r in self._running):
                    user.release()
                raise
            return True
        except BaseException:
            if not any(r.goal is g for r in self._running):
                locks.release()
            raise

    def _check_platform(self, g: _DrvGoal) -> None:
        drv, st = g.drv, self.settings
        assert drv is not None
        required = sorted(set(drv.env.get("requiredSystemFeatures", "").split()))
        platform_ok = drv.platform in {st.system, *st.extra_platforms} or \
            (drv.platform == "builtin" and drv.builder.startswith("builtin:"))
        if not platform_ok or not set(required) <= set(st.system_features):
            raise _Failure(BuildStatus.INPUT_REJECTED,
                           f"a '{drv.platform}' with features {{{', '.join(required)}}} is required "
                           f"to build '{self.sd.print(g.drv_path)}', but I am a '{st.system}' with "
                           f"features {{{', '.join(sorted(st.system_features))}}}")

    def _scratch_path(self, g: _DrvGoal, name: str) -> StorePath:
        # Same name, so same length: the hash part can be rewritten in place.
        inner = Hash("sha256", bytes(32))
        return self.sd.make_path(f"rewrite:{self.sd.print(g.drv_path)}:name:{name}", inner,
                                 g.outputs[name].name)

    def _spawn(self, g: _DrvGoal, locks: PathLocks, user: BuildUser | None,
               valid: dict[str, bool]) -> None:
        store, sd, st = self.store, self.sd, self.settings
        drv = g.drv
        assert drv is not None
        printed = sd.print(g.drv_path)
        scratch: dict[str, StorePath] = {}
        for name, path in g.outputs.items():
            if valid[name]:
                scratch[name] = self._scratch_path(g, name)
                store.pin(scratch[name])  # an invalid path name the GC must leave alone
            else:
                scratch[name] = path
        for path in set(scratch.values()) | {p for o, p in g.outputs.items() if not valid[o]}:
            remove_tree(store.real_path(path))  # leftovers of an interrupted build
        tmpdir = self._make_build_dir(drv_name=g.drv_path.name)
        run: _Run | None = None
        try:
            env = self._environment(g, tmpdir, scratch)
            args = [_rewrite_str(a, self._input_rewrites(g, scratch)) for a in drv.args]
            if user is not None:
                user.kill_processes()
                # (confine.py) what the build user left in shared places goes: now,
                # and after the build, once its processes are killed again
                real_sd = store.real_store_dir
                dirs = confine.sweep_dirs(real_sd, os.path.dirname(tmpdir))
                confine.sweep(user.uid, dirs, keep=lambda d, n, s: confine.kept_by_keep_failed(
                    d, n, s, real_sd))
                keep = confine.keep_paths([tmpdir, *(store.real_path(p) for p in
                                                     {*scratch.values(), *g.outputs.values()})])
                user.before_release.append(lambda: confine.sweep(user.uid, dirs, keep=keep))
                fd = fs.open_dir(tmpdir)  # ours (0700) until this chown
                try:
                    os.fchown(fd, user.uid, user.gid)
                finally:
                    os.close(fd)
                self._store_dir_for(user)
            check = g.mode == BuildMode.CHECK
            text = f"{'checking outputs of' if check else 'building'} '{printed}'"
            act = self.logger.start_activity(Verbosity.INFO, ActivityType.BUILD, text,
                                             [printed, "", 1, 1])
            log_file = None
            if st.keep_build_log:
                log_file = BuildLogFile(store.layout.log_dir, g.drv_path.base, st.compress_build_log)

            def on_line(line: bytes, act: int = act) -> None:
                self.logger.result(act, ResultType.BUILD_LOG_LINE, [line.decode("utf-8", "surrogateescape")])

            now = time.monotonic()
            run = _Run(g, None, None, locks, user, tmpdir, scratch, log_file,
                       LineSplitter(on_line, st.log_lines), act, now, now)
            run.start_wall = int(time.time())
            self._running.append(run)
            self._progress()
            rfd, wfd = os.pipe()
            run.fd = rfd
            os.set_blocking(rfd, False)
            spec_fd = None
            try:
                # (None, (): Popen's defaults, as when not given)
                uid, gid, groups = (user.uid, user.gid, list(user.groups)) if user is not None \
                    else (None, None, None)
                argv = [os.path.basename(drv.builder), *args]
                executable: str | None = drv.builder
                child_env = env
                pass_fds: tuple[int, ...] = ()
                if st.filter_syscalls:
                    # NO_NEW_PRIVS + seccomp, set by a trampoline that then exec's the
                    # builder (confine.py says why not preexec_fn, and what it costs)
                    argv, spec_fd = confine.confined_argv(drv.builder, argv, env,
                                                          confine.host_filter())
                    executable, child_env, pass_fds = None, {}, (spec_fd,)
                run.proc = subprocess.Popen(
                    argv, executable=executable, env=child_env, pass_fds=pass_fds,
                    user=uid, group=gid, extra_groups=groups,
                    cwd=tmpdir, stdin=subprocess.DEVNULL, stdout=wfd, stderr=wfd, close_fds=True,
                    start_new_session=True, umask=0o022)
            except OSError as e:
                # Nix's child reports this in the log and exits 1
                run.exec_error = f"executing '{drv.builder}': {e.strerror}"
                run.splitter.feed(run.exec_error.encode() + b"\n")
                if log_file is not None:
                    log_file.write(run.exec_error.encode() + b"\n")
            finally:
                os.close(wfd)
                if spec_fd is not None:
                    os.close(spec_fd)
        except BaseException:
            if run is None:
                remove_tree(tmpdir)
            raise

    def _keep_build_dir(self, run: _Run) -> None:
        """keep-failed: leave the build dir readable.  The builder owned it and
        could have replaced it (its entry in sticky /tmp is the build user's):
        change only a directory of the builder's, through the fd we checked."""
        try:
            fd = fs.open_dir(run.tmpdir)
        except OSError:
            self.logger.log(Verbosity.ERROR, f"note: build directory '{run.tmpdir}' was replaced "
                                             "by the builder; not kept")
            return
        try:
            st = os.fstat(fd)
            if st.st_uid not in (os.geteuid(), run.user.uid if run.user is not None else -1):
                self.logger.log(Verbosity.ERROR, f"note: build directory '{run.tmpdir}' was "
                                                 "replaced by the builder; not kept")
                return
            os.fchmod(fd, 0o755)
        finally:
            os.close(fd)
        self.logger.log(Verbosity.ERROR, f"note: keeping build directory '{run.tmpdir}'")

    def _make_build_dir(self, drv_name: str) -> str:
        base = self.settings.build_dir or os.environ.get("TMPDIR") or "/tmp"
        for n in range(1 << 20):
            path = os.path.join(base, f"nix-build-{drv_name}-{n}")
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            return path
        raise StoreError(f"cannot create a build directory in '{base}'")

    def _store_dir_for(self, user: BuildUser) -> None:
        """Builders create their outputs in the store: it must be ``root:<group>`` 01775."""
        fd = fs.open_dir(self.store.real_store_dir)
        try:
            st = os.fstat(fd)
            if st.st_gid != user.gid or (st.st_mode & 0o7777) != 0o1775:
                os.fchown(fd, -1, user.gid)
                os.fchmod(fd, 0o1775)
        finally:
            os.close(fd)

    def _input_rewrites(self, g: _DrvGoal, scratch: dict[str, StorePath]) -> dict[str, str]:
        return {g.outputs[o].hash_part: p.hash_part for o, p in scratch.items() if p != g.outputs[o]}

    def _environment(self, g: _DrvGoal, tmpdir: str, scratch: dict[str, StorePath]) -> dict[str, str]:
        """Nix's builder environment (the derivation's variables come first, then these)."""
        drv, st = g.drv, self.settings
        assert drv is not None
        rewrites = self._input_rewrites(g, scratch)
        env: dict[str, str] = {
            "PATH": "/path-not-set",
            "HOME": "/homeless-shelter",
            "NIX_STORE": self.sd.path,
            "NIX_BUILD_CORES": str(st.cores),
        }
        if "__json" in drv.env:
            raise _Failure(BuildStatus.MISC_FAILURE, "structured attributes (__structuredAttrs) "
                           "are not supported by storekeeper's builder")
        pass_as_file = set(drv.env.get("passAsFile", "").split())
        n = 0
        for key, value in drv.env.items():
            value = _rewrite_str(value, rewrites)
            if key in pass_as_file:
                fn = f".attr-{n}"
                n += 1
                path = os.path.join(tmpdir, fn)
                with open(path, "wb") as f:
                    f.write(value.encode("utf-8", "surrogateescape"))
                env[key + "Path"] = path
            else:
                env[key] = value
        for var in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
            env[var] = tmpdir
        if derivation_type(drv) is DerivationType.CA_FIXED:
            # Fixed outputs are checked by hash, so they may see the network
            # settings of the daemon (impureEnvVars).
            for var in drv.env.get("impureEnvVars", "").split():
                env[var] = os.environ.get(var, "")
        env["NIX_LOG_FD"] = "2"
        env["TERM"] = "xterm-256color"
        for key in list(env):
            if "\0" in key or "=" in key or "\0" in env[key]:
                raise _Failure(BuildStatus.MISC_FAILURE,
                               f"environment variable '{key}' cannot be passed to the builder")
        return env

    # --- waiting for builders -----------------------------------------------------

    def _next_deadline(self) -> float:
        st, now, wait = self.settings, time.monotonic(), 1.0
        for run in self._running:
            if st.timeout:
                wait = min(wait, run.start + st.timeout - now)
            if st.max_silent_time:
                wait = min(wait, run.last_output + st.max_silent_time - now)
        return max(wait, 0.0)

    def _wait(self, timeout: float) -> None:
        fds = {run.fd: run for run in self._running if run.fd is not None}
        if fds:
            try:
                ready, _, _ = select.select(list(fds), [], [], timeout)
            except InterruptedError:
                ready = []
        else:
            ready = []
            time.sleep(min(timeout, 0.05))
        now = time.monotonic()
        for fd in ready:
            run = fds[fd]
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if data:
                self._feed(run, data, now)
            else:
                self._reap(run)
        for run in [r for r in self._running if r.fd is None]:
            self._reap(run)  # the builder could not be started
        st = self.settings
        for run in list(self._running):
            name = f"building of '{self.sd.print(run.goal.drv_path)}"
            name += f"!{','.join(run.goal.wanted_names())}' from .drv file"
            if st.max_silent_time and now - run.last_output >= st.max_silent_time:
                run.killed_for = _Failure(BuildStatus.TIMED_OUT, f"{name} timed out after "
                                          f"{st.max_silent_time} seconds of silence")
            elif st.timeout and now - run.start >= st.timeout:
                run.killed_for = _Failure(BuildStatus.TIMED_OUT,
                                          f"{name} timed out after {st.timeout} seconds")
            if run.killed_for is not None:
                self._kill(run)
                self._reap(run)

    def _feed(self, run: _Run, data: bytes, now: float) -> None:
        run.last_output = now
        run.log_bytes += len(data)
        if run.log_file is not None:
            run.log_file.write(data)
        run.splitter.feed(data)
        limit = self.settings.max_log_size
        if limit and run.log_bytes > limit and run.killed_for is None:
            run.killed_for = _Failure(
                BuildStatus.LOG_LIMIT_EXCEEDED,
                f"building of '{self.sd.print(run.goal.drv_path)}' killed after writing more than "
                f"{limit} bytes of log output")
            self._kill(run)

    def _kill(self, run: _Run) -> None:
        if run.proc is not None and run.proc.returncode is None:
            try:
                os.killpg(run.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _reap(self, run: _Run, cancelled: bool = False) -> None:
        """The builder's output ended (or it is being killed): collect it and its outcome."""
        if run not in self._running:
            return
        self._running.remove(run)
        g = run.goal
        succeeded = False
        try:
            # EOF may come from a builder that merely closed its output: like
            # Nix, kill whatever is left of its session, then take the status.
            self._kill(run)
            status, cpu = _wait_with_times(run.proc)
            if run.fd is not None:
                try:
                    while data := os.read(run.fd, 1 << 16):
                        self._feed(run, data, time.monotonic())
                except OSError:
                    pass  # a stray writer outside the session still holds the pipe
                os.close(run.fd)
                run.fd = None
            run.splitter.finish()
            if run.log_file is not None:
                run.log_file.close()
            if run.user is not None:
                run.user.kill_processes()  # nothing of the build may run while we look
            start, stop = run.start_wall, int(time.time())
            try:
                if cancelled:
                    raise _Failure(BuildStatus.MISC_FAILURE,
                                   f"build of '{self.sd.print(g.drv_path)}' was interrupted")
                if run.killed_for is not None:
                    raise run.killed_for
                if status != 0:
                    raise _Failure(self._failure_status(g), self._builder_failed(run, status))
                result = self._register_outputs(run)
                result.start_time, result.stop_time, result.times_built = start, stop, 1
                result.cpu_user, result.cpu_system = cpu
                succeeded = True
            except _Failure as f:
                result = BuildResult(f.status, str(f), times_built=1, start_time=start,
                                     stop_time=stop, cpu_user=cpu[0], cpu_system=cpu[1],
                                     is_non_deterministic=f.status == BuildStatus.NOT_DETERMINISTIC,
                                     own_error=not cancelled)
            except (StoreError, FormatError, OSError) as e:
                msg = str(e) if not isinstance(e, OSError) else f"{e.strerror}: '{e.filename}'"
                result = BuildResult(BuildStatus.MISC_FAILURE, msg, times_built=1,
                                     start_time=start, stop_time=stop, own_error=not cancelled)
            # (the real daemon reports progress before it ends the Build activity)
            self._finish(g, result, quiet=cancelled)
        finally:
            try:
                self._cleanup(run, succeeded)
            finally:
                self.logger.stop_activity(run.act)

    def _failure_status(self, g: _DrvGoal) -> BuildStatus:
        fixed = g.drv is not None and derivation_type(g.drv) is DerivationType.CA_FIXED
        return BuildStatus.TRANSIENT_FAILURE if fixed else BuildStatus.PERMANENT_FAILURE

    def _builder_failed(self, run: _Run, status: int) -> str:
        printed = self.sd.print(run.goal.drv_path)
        if status < 0:
            how = f"failed due to signal {-status} ({signal.strsignal(-status)})"
        else:
            how = f"failed with exit code {status}"
        msg = f"builder for '{printed}' {how}"
        tail = list(run.splitter.tail)
        if tail:
            lines = "".join(f"> {line.decode('utf-8', 'surrogateescape')}\n" for line in tail)
            msg += f";\nlast {len(tail)} log lines:\n{lines}For full logs, run 'nix log {printed}'."
        return msg

    def _cleanup(self, run: _Run, succeeded: bool) -> None:
        store, g = self.store, run.goal
        try:
            for name, path in run.scratch.items():
                if path != g.outputs[name]:
                    remove_tree(store.real_path(path))
            if not succeeded:
                for path in g.outputs.values():
                    if not store.is_valid(path) and not self.settings.keep_failed:
                        remove_tree(store.real_path(path))
            if succeeded or not self.settings.keep_failed:
                remove_tree(run.tmpdir)
            else:
                self._keep_build_dir(run)
        finally:
            if run.user is not None:
                run.user.release()
            run.locks.delete_on_release = True
            run.locks.release()

    # --- after the builder ----------------------------------------------------------

    def _register_outputs(self, run: _Run) -> BuildResult:
        store, sd, g = self.store, self.sd, run.goal
        drv = g.drv
        assert drv is not None
        printed = sd.print(g.drv_path)
        if os.path.lexists("/homeless-shelter"):
            raise _Failure(BuildStatus.MISC_FAILURE, "home directory '/homeless-shelter' exists; "
                           "please remove it to assure purity of builds without sandboxing")
        scratch_reals = {}
        for name in sorted(g.outputs):
            real = store.real_path(run.scratch[name])
            try:
                st = os.lstat(real)
            except FileNotFoundError:
                raise _Failure(BuildStatus.OUTPUT_REJECTED,
                               f"builder for '{printed}' failed to produce output path for output "
                               f"'{name}' at '{sd.print(run.scratch[name])}'") from None
            if (not os.path.islink(real) and st.st_mode & 0o022) or \
                    (run.user is not None and st.st_uid != run.user.uid):
                raise _Failure(BuildStatus.OUTPUT_REJECTED,
                               f"suspicious ownership or permission on '{sd.print(run.scratch[name])}' "
                               f"for output '{name}'; rejecting this build output")
            scratch_reals[name] = real
        try:
            canonicalise_paths(list(scratch_reals.values()),
                               from_uid=run.user.uid if run.user is not None else None,
                               check_links=True)
        except StoreError as e:
            raise _Failure(BuildStatus.OUTPUT_REJECTED, str(e)) from None

        # scratch hash part -> real one, in every output's bytes
        rewrites = {run.scratch[o].hash_part.encode(): g.outputs[o].hash_part.encode()
                    for o in g.outputs if run.scratch[o] != g.outputs[o]}
        if g.mode == BuildMode.CHECK:
            self._check_outputs(run, rewrites)
            return self._valid_result(g, BuildStatus.BUILT)

        new = {o: p for o, p in g.outputs.items() if not store.is_valid(p)}
        for name, path in new.items():
            if run.scratch[name] != path or rewrites:
                # Produce the final content: rewritten from the scratch copy
                # (or in place, through a temp sibling), then made canonical.
                src = scratch_reals[name]
                dest = store.real_path(path)
                tmp = dest + ".rewrite" if src == dest else dest
                _copy_rewritten(src, tmp, rewrites)
                if tmp != dest:
                    remove_tree(dest)
                    os.rename(tmp, dest)
                canonicalise_paths([dest])

        candidates: dict[str, StorePath] = {p.hash_part: p for p in self._input_closure(g)}
        candidates.update({p.hash_part: p for p in g.outputs.values()})
        infos: dict[str, ValidPathInfo] = {}
        refs_by_out: dict[str, set[StorePath]] = {}
        now = int(time.time())
        mismatch: str | None = None
        for name, path in sorted(new.items()):
            real = store.real_path(path)
            nar_hash, nar_size, found = _scan(real, candidates)
            refs = {candidates[h] for h in found}
            refs_by_out[name] = refs
            info = ValidPathInfo(path, nar_hash, nar_size, frozenset(refs), g.drv_path,
                                 registration_time=now, ultimate=True)
            o = drv.outputs[name]
            if o.is_fixed:
                info, mismatch = self._check_fixed(g, name, info, real)
            infos[name] = info
        self._check_cycles(g, refs_by_out)
        self._check_reference_rules(g, infos)
        self._auto_optimise([i.path for i in infos.values()])
        store.register_valid_paths(infos.values())
        if mismatch:
            raise _Failure(BuildStatus.OUTPUT_REJECTED, mismatch)
        return self._valid_result(g, BuildStatus.BUILT)

    def _input_closure(self, g: _DrvGoal) -> set[StorePath]:
        store, sd, drv = self.store, self.sd, g.drv
        assert drv is not None
        start: set[StorePath] = {sd.parse(p, lax=True) for p in drv.input_srcs}
        for path, outs in drv.input_drvs.items():
            dep = self._drv_goals.get(sd.parse(path, lax=True))
            if dep is not None and dep.outputs:
                start.update(dep.outputs[o] for o in outs if o in dep.outputs)
            else:
                paths = store.query_derivation_outputs(sd.parse(path, lax=True))
                start.update(paths[o] for o in outs if o in paths)
        return store.query_closure(start)

    def _check_fixed(self, g: _DrvGoal, name: str, info: ValidPathInfo,
                     real: str) -> tuple[ValidPathInfo, str | None]:
        """Fixed output: no references, content hash as declared.  On a mismatch the
        content is registered where its real hash puts it (Nix 2.8 does that too)."""
        store, sd = self.store, self.sd
        o = g.drv.outputs[name]  # type: ignore[union-attr]
        printed = sd.print(g.drv_path)
        if info.references - {info.path}:
            raise _Failure(BuildStatus.OUTPUT_REJECTED,
                           f"illegal path references in fixed-output derivation '{printed}'")
        wanted = o.fixed_hash()
        if o.recursive:
            got = _nar_hash(real, wanted.algo)
            method = RECURSIVE
        else:
            if os.path.islink(real) or not os.path.isfile(real) or os.stat(real).st_mode & 0o100:
                raise _Failure(BuildStatus.OUTPUT_REJECTED,
                               f"output path '{sd.print(info.path)}' should be a non-executable "
                               "regular file since recursive hashing is not enabled "
                               "(outputHashMode=flat)")
            got = _file_hash(real, wanted.algo)
            method = FLAT
        ca = ContentAddress(method, got)
        info = info.with_(references=frozenset(), ca=ca.render())
        if got == wanted:
            return info, None
        msg = (f"hash mismatch in fixed-output derivation '{printed}':\n"
               f"  specified: {wanted.sri}\n     got:    {got.sri}")
        actual = ca.store_path(sd, info.path.name)
        store.pin(actual)
        if store.is_valid(actual):
            remove_tree(real)
            return info.with_(path=actual), msg  # re-registering it changes nothing
        with PathLocks() as locks:
            locks.lock([store.real_path(actual)])
            remove_tree(store.real_path(actual))
            os.rename(real, store.real_path(actual))
            locks.delete_on_release = True
        return info.with_(path=actual), msg

    def _check_cycles(self, g: _DrvGoal, refs_by_out: dict[str, set[StorePath]]) -> None:
        by_path = {p: o for o, p in g.outputs.items()}
        state: dict[str, int] = {}

        def visit(name: str, parent: str | None) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                raise _Failure(BuildStatus.OUTPUT_REJECTED,
                               f"cycle detected in build of '{self.sd.print(g.drv_path)}' in the "
                               f"references of output '{name}' from output '{parent}'")
            state[name] = 1
            for ref in sorted(refs_by_out.get(name, ())):
                other = by_path.get(ref)
                if other is not None and other != name:
                    visit(other, name)
            state[name] = 2

        for name in sorted(refs_by_out):
            visit(name, None)

    _REFERENCE_RULES = (("allowedReferences", True, False), ("allowedRequisites", True, True),
                        ("disallowedReferences", False, False), ("disallowedRequisites", False, True))

    def _check_reference_rules(self, g: _DrvGoal, infos: dict[str, ValidPathInfo]) -> None:
        """``allowedReferences`` & co.: paths or output names, checked against each
        output's references (or its closure, for the ``*Requisites`` forms)."""
        drv, sd = g.drv, self.sd
        assert drv is not None
        new_refs = {i.path: i.references for i in infos.values()}

        def closure(start: StorePath) -> set[StorePath]:
            seen, todo = set(), [start]
            while todo:
                p = todo.pop()
                if p in seen:
                    continue
                seen.add(p)
                todo.extend(new_refs[p] if p in new_refs else self.store.path_info(p).references)
            return seen

        for _name, info in sorted(infos.items()):
            for attr, allowed, requisites in self._REFERENCE_RULES:
                if attr not in drv.env:
                    continue
                spec: set[StorePath] = set()
                for item in drv.env[attr].split():
                    if item in g.outputs:
                        spec.add(g.outputs[item])
                    else:
                        try:
                            spec.add(sd.parse(item, lax=True))
                        except FormatError:
                            raise _Failure(BuildStatus.OUTPUT_REJECTED, "derivation contains an "
                                           f"illegal reference specifier '{item}'") from None
                used = closure(info.path) - {info.path} if requisites else set(info.references)
                bad = used - spec if allowed else used & spec
                if bad:
                    paths = "".join(f"\n  {sd.print(p)}" for p in sorted(bad))
                    raise _Failure(BuildStatus.OUTPUT_REJECTED, f"output '{sd.print(info.path)}' is "
                                   f"not allowed to refer to the following paths:{paths}")

    def _check_outputs(self, run: _Run, rewrites: dict[bytes, bytes]) -> None:
        """--check: the rebuilt outputs must have the registered NAR hashes."""
        store, sd, g = self.store, self.sd, run.goal
        printed = sd.print(g.drv_path)
        for name in sorted(g.outputs):
            path = g.outputs[name]
            info = store.path_info(path)
            src = store.real_path(run.scratch[name])
            h = new_hasher(info.nar_hash.algo)
            for chunk in _rewritten(dump_path(src), rewrites):
                h.update(chunk)
            if h.digest() == info.nar_hash.digest:
                continue
            msg = f"derivation '{printed}' may not be deterministic: output '{sd.print(path)}' differs"
            if self.settings.keep_failed:
                check = store.real_path(path) + ".check"
                remove_tree(check)
                _copy_rewritten(src, check, rewrites)
                canonicalise_paths([check])
                msg += f" from '{sd.print(path)}.check'"
            raise _Failure(BuildStatus.NOT_DETERMINISTIC, msg)

    def _auto_optimise(self, paths: list[StorePath]) -> None:
        """``auto-optimise-store``: new outputs join the ``.links`` pool before registration."""
        if not getattr(self.store.settings, "auto_optimise_store", False):
            return
        hook = getattr(self.store, "_auto_optimise", None)
        if hook is None:
            hook = lambda sp: optimise_path(self.store, sp)  # noqa: E731
        for sp in paths:
            hook(sp)


# --- helpers ------------------------------------------------------------------


def _rewrite_str(value: str, rewrites: Mapping[str, str]) -> str:
    for old, new in rewrites.items():
        value = value.replace(old, new)
    return value


def _rewritten(chunks: Iterable[bytes], rewrites: Mapping[bytes, bytes]) -> Iterator[bytes]:
    """The byte stream with every (32-byte) key replaced by its value, across chunk bounds."""
    if not rewrites:
        yield from chunks
        return
    keep = max(len(k) for k in rewrites) - 1
    buf = b""
    for chunk in chunks:
        buf += chunk
        for old, new in rewrites.items():
            buf = buf.replace(old, new)
        if len(buf) > keep:
            yield buf[:-keep] if keep else buf
            buf = buf[-keep:] if keep else b""
    if buf:
        yield buf


class _ChunkReader:
    """``read(n)`` over an iterator of chunks (what ``restore_nar`` consumes)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            chunk = next(self._it, None)
            if chunk is None:
                break
            self._buf += chunk
        if n < 0:
            data, self._buf = self._buf, b""
        else:
            data, self._buf = self._buf[:n], self._buf[n:]
        return data


def _copy_rewritten(src: str, dest: str, rewrites: Mapping[bytes, bytes]) -> None:
    """A copy of the tree at ``src`` at ``dest`` with hash parts rewritten (through its NAR)."""
    try:
        restore_nar(_ChunkReader(_rewritten(dump_path(src), rewrites)), dest)
    except BaseException:
        remove_tree(dest)
        raise


def _scan(real: str, candidates: Mapping[str, StorePath]) -> tuple[Hash, int, set[str]]:
    """NAR hash, NAR size and the candidate hash parts found, in one pass."""
    h = hashlib.sha256()
    scanner = RefScanner(candidates.keys())
    size = 0
    for chunk in dump_path(real):
        h.update(chunk)
        scanner.feed(chunk)
        size += len(chunk)
    return Hash("sha256", h.digest()), size, scanner.found


def _nar_hash(real: str, algo: str) -> Hash:
    h = new_hasher(algo)
    for chunk in dump_path(real):
        h.update(chunk)
    return Hash(algo, h.digest())


def _file_hash(real: str, algo: str) -> Hash:
    h = new_hasher(algo)
    with open(real, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return Hash(algo, h.digest())


__all__ = ["BuildError", "build_refusal", "BuildLogger", "BuildMode", "BuildResult", "BuildSettings", "BuildStatus",
           "Builder", "NullLogger", "format_error", "query_missing", "this_system"]
