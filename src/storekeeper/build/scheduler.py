"""The scheduler: a :class:`Builder` realises a set of targets (store paths, or
derivation outputs ``drv!out``) for one client.

It realises the inputs of each derivation first, runs up to ``max-jobs``
builders at once (one ``select`` loop), and reports one
:class:`~storekeeper.build.results.BuildResult` per target.  The goals are
:mod:`.goals`', the processes :mod:`.process`', the environment
:mod:`.environment`'s, the checks and registration :mod:`.outputs`'.

Invariant, **one builder per output path, store-wide**: a derivation is built
only while its output paths' ``.lock`` files are held (Nix's PathLocks, taken
without blocking; a busy lock means another process, ours or Nix's, is
building: we wait and then usually find the outputs valid).  Validity is
re-checked once the locks are ours; leftovers at an output path are removed
under the lock.  Whatever way a request ends, no builder outlives it, and every
run gives back its locks, build user and build dir.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Callable, Sequence

from ..errors import StoreError
from ..formats.derivation import Derivation, DerivationType, derivation_type
from ..formats.errors import FormatError
from ..formats.storepath import StorePath
from ..formats.wire import ActivityType, DerivedPath, ResultType, Verbosity
from ..fs import remove_tree
from ..store.locks import PathLocks
from ..store.reserve import naming
from . import process, sandbox
from .attrs import AttrError
from .environment import GraphSource, builder_environment, impure_sources
from .forkserver import LauncherServer
from .goals import DrvGoal, Goal, GoalGraph
from .hooks import run_post_build_hook
from .jsonlog import BuilderJSONLog
from .logger import Activities, BuildLogger, GuardedLogger, NullLogger, format_error
from .logs import BuildLogFile, LineSplitter
from .outputs import register_outputs
from .process import Run
from .refgraph import InputRejected
from .results import BuildError, BuildMode, BuildResult, BuildStatus, Failure
from .rewrite import input_rewrites, rewrite_str, scratch_path
from .settings import BuildSettings, build_refusal
from .substitute import Substituters
from .users import BuildUser, BuildUserError, UserPool


class Builder:
    """Realises targets on one :class:`LocalStore` for one client (module docstring)."""

    POLL = 0.2

    def __init__(self, store, settings: BuildSettings | None = None,
                 logger: BuildLogger | None = None,
                 interrupted: Callable[[], bool] | None = None,
                 substituters: Substituters | None = None) -> None:
        """``interrupted()`` is asked about once a second: True (the client hung up,
        the daemon is stopping) kills the builds and fails the request."""
        self.interrupted = interrupted or (lambda: False)
        self.store = store
        self.sd = store.store_dir
        self.settings = settings or BuildSettings()
        self.logger = GuardedLogger(logger or NullLogger())
        self.goals = GoalGraph(store, substituters)
        self.substituters = substituters
        self._running: list[Run] = []
        self._cancelled = False
        self._expected = self._done = self._failed = 0
        self._acts = Activities(self.logger)
        #: the sandbox launcher's fork server, started by the first sandboxed build
        #: and stopped when the request ends (:mod:`.forkserver`)
        self._launcher = LauncherServer()
        self._spawner = process.Spawner()  # (started by the first confined builder)
        self._trash = process.Trash()

    # --- public entry points --------------------------------------------------

    def build(self, targets: Sequence[DerivedPath], mode: BuildMode = BuildMode.NORMAL) -> list[BuildResult]:
        """Realise ``targets``; one result per target, in order."""
        mode = BuildMode(mode)
        if mode == BuildMode.REPAIR:
            raise BuildError("repairing builds is not supported by storekeeper; "
                             "delete the path and build it again")
        tops: list[Goal] = []
        with self._acts:
            for dp in targets:
                if dp.is_built:
                    g = self.goals.drv_goal(dp.path)
                    g.top = True
                    g.want(None if dp.all_outputs else dp.outputs)
                    if mode == BuildMode.CHECK:
                        g.mode = BuildMode.CHECK
                    tops.append(g)
                else:
                    pg = self.goals.path_goal(dp.path)
                    pg.top = True
                    tops.append(pg)
            try:
                self._plan()
                self._execute(tops)
            finally:
                self._launcher.close()
        return [g.result for g in tops]  # type: ignore[misc]

    def build_basic(self, drv_path: StorePath, drv: Derivation,
                    mode: BuildMode = BuildMode.NORMAL) -> BuildResult:
        """BuildDerivation: build ``drv`` as given (its inputs must already be valid)."""
        mode = BuildMode(mode)
        if mode == BuildMode.REPAIR:
            raise BuildError("repairing builds is not supported by storekeeper")
        g = DrvGoal(top=True, drv_path=drv_path, drv=drv, basic=True, wanted=None, mode=mode)
        self.goals.drvs[drv_path] = g
        with self._acts:
            try:
                self._plan()
                self._execute([g])
            finally:
                self._launcher.close()
        return g.result  # type: ignore[return-value]

    def close(self) -> None:
        """Let go of the caches (their connections, the narinfo disk cache)."""
        if self.substituters is not None:
            self.substituters.close()

    def _progress(self) -> None:
        self._acts.progress(self._done, self._expected, len(self._running), self._failed)

    # --- planning ---------------------------------------------------------------

    def _plan(self) -> None:
        """Decide, for every derivation reachable from the targets, whether it
        must be built; repeated until no goal's wanted outputs grow."""
        drvs = self.goals.drvs
        queue = deque(g for g in drvs.values() if not g.done)
        while queue:
            g = queue.popleft()
            if g.done:
                continue
            try:
                queue.extend(self.goals.evaluate(g))
            except Failure as f:
                self._finish(g, BuildResult(f.status, str(f)))
        self._expected = sum(1 for g in drvs.values() if g.need_build and not g.done)
        if self._expected:
            self._progress()
        # (shown at debug level only; the real daemon sends it at this point)
        self.logger.stop_activity(self.logger.start_activity(
            Verbosity.DEBUG, ActivityType.UNKNOWN, "querying info about missing paths"))

    # --- running ----------------------------------------------------------------

    def _execute(self, tops: list[Goal]) -> None:
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
                self._trash.empty()  # (while the new builders run)
                if self._running:
                    self._wait(self.POLL if self._has_waiters()
                               else process.next_deadline(self._running, self.settings))
                elif not changed:
                    if not self._has_waiters():
                        # nothing runs, changes or waits: a cycle, which the
                        # .drv checks make impossible
                        for g in self.goals.drvs.values():
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
                run.kill()
            for run in list(self._running):
                try:
                    self._reap(run, cancelled=True)
                except Exception:  # noqa: BLE001 -- the first error is already on its way up
                    pass
            self._spawner.close()
            self._trash.empty()

    def _has_waiters(self) -> bool:
        return any(g.ready and not g.done and g.waiting_note for g in self.goals.drvs.values())

    def _settle(self) -> None:
        changed = True
        while changed:
            changed = False
            for g in self.goals.drvs.values():
                if g.done or g.ready:
                    continue
                failed = [d for d in g.deps if d.failed]
                # Without keep-going a failed input fails its dependents at once (as in
                # Nix: they stop waiting for the others, which are then cancelled).
                if not all(d.done for d in g.deps) and not (failed and not self.settings.keep_going):
                    continue
                if failed:
                    self._finish(g, BuildResult(
                        BuildStatus.DEPENDENCY_FAILED,
                        f"{len(failed)} dependencies of derivation '{self.sd.print(g.drv_path)}' "
                        "failed to build"))
                elif not g.need_build:
                    status = BuildStatus.SUBSTITUTED if g.substituted else BuildStatus.ALREADY_VALID
                    self._finish(g, self.goals.valid_result(g, status))
                else:
                    g.ready = True
                changed = True

    def _cancel_rest(self) -> None:
        for run in list(self._running):
            run.kill()
            self._reap(run, cancelled=True)
        for g in self.goals.drvs.values():
            if not g.done:
                self._finish(g, BuildResult(
                    BuildStatus.MISC_FAILURE,
                    f"build of '{self.sd.print(g.drv_path)}' was cancelled because another "
                    "build failed (use --keep-going to go on)", own_error=False), quiet=True)

    def _finish(self, g: DrvGoal, result: BuildResult, quiet: bool = False) -> None:
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
            if self._acts.open:
                self._progress()
        if not result.success:
            if not g.top and not quiet and result.status != BuildStatus.DEPENDENCY_FAILED:
                # a dependency's error is only logged; its parent reports the failure
                self.logger.log(Verbosity.ERROR, format_error(result.error_msg))
            if not self.settings.keep_going:
                self._cancelled = True

    def _start_ready(self) -> bool:
        """Start what may start; True if anything changed (started, or finished without a build)."""
        started = False
        drvs = self.goals.drvs
        done_before = sum(1 for g in drvs.values() if g.done)
        # in Nix's order: by derivation name, then path (its goals' keys)
        for g in sorted((g for g in drvs.values() if g.ready and not g.done),
                        key=lambda g: (g.drv_path.name, g.drv_path.base)):
            if any(r.goal is g for r in self._running):
                continue
            if len(self._running) >= max(self.settings.max_jobs, 1):
                break
            try:
                if self._try_start(g):
                    started = True
            except Failure as f:
                self._finish(g, BuildResult(f.status, str(f)))
        return started or sum(1 for g in drvs.values() if g.done) != done_before

    def _wait_note(self, g: DrvGoal, note: str) -> None:
        if g.waiting_note != note:
            if g.wait_act is not None:
                self.logger.stop_activity(g.wait_act)
            g.wait_act = self.logger.start_activity(Verbosity.WARN, ActivityType.BUILD_WAITING, note)
            g.waiting_note = note

    def _try_start(self, g: DrvGoal) -> bool:
        store, sd, st = self.store, self.sd, self.settings
        drv = g.drv
        assert drv is not None
        printed = sd.print(g.drv_path)
        if st.max_jobs <= 0:
            raise Failure(BuildStatus.MISC_FAILURE, "unable to start any build; either increase "
                          "'--max-jobs' or enable remote builds")
        self._check_platform(g)
        refusal = build_refusal(store, st)
        if refusal:
            raise Failure(BuildStatus.MISC_FAILURE, f"cannot build '{printed}': {refusal}")
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
                self._finish(g, self.goals.valid_result(g, BuildStatus.ALREADY_VALID))
                return False
            user = None
            group = st.group
            if group and os.geteuid() == 0:
                try:
                    user = UserPool(group, store.state_dir).try_acquire()
                except BuildUserError as e:
                    raise Failure(BuildStatus.MISC_FAILURE, str(e)) from None
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

    def _check_platform(self, g: DrvGoal) -> None:
        drv, st = g.drv, self.settings
        assert drv is not None
        try:
            required = sorted(set(g.parsed_attrs(self.sd).get_strings("requiredSystemFeatures") or ()))
        except AttrError as e:
            raise Failure(BuildStatus.MISC_FAILURE, str(e)) from None
        platform_ok = drv.platform in {st.system, *st.extra_platforms} or \
            (drv.platform == "builtin" and drv.builder.startswith("builtin:"))
        if not platform_ok or not set(required) <= set(st.system_features):
            # Nix throws this past its worker: the whole request fails
            raise BuildError(f"a '{drv.platform}' with features {{{', '.join(required)}}} is required "
                             f"to build '{self.sd.print(g.drv_path)}', but I am a '{st.system}' "
                             f"with features {{{', '.join(sorted(st.system_features))}}}")

    def _spawn(self, g: DrvGoal, locks: PathLocks, user: BuildUser | None,
               valid: dict[str, bool]) -> None:
        store, sd, st = self.store, self.sd, self.settings
        drv = g.drv
        assert drv is not None
        printed = sd.print(g.drv_path)
        scratch: dict[str, StorePath] = {}
        for name, path in g.outputs.items():
            if valid[name]:
                scratch[name] = scratch_path(sd, g.drv_path, name, path)
                store.pin(scratch[name])  # an invalid path name the GC must leave alone
            else:
                scratch[name] = path
        for path in set(scratch.values()) | {p for o, p in g.outputs.items() if not valid[o]}:
            # leftovers of an interrupted build (we hold its lock: nothing else makes it now)
            remove_tree(store.real_path(path))
        tmpdir = process.make_build_dir(st, drv_name=g.drv_path.name)
        run: Run | None = None
        sb: sandbox.Sandbox | None = None
        try:
            rewrites = input_rewrites(sd, g.outputs, scratch)
            env = self._environment(g, tmpdir, scratch, rewrites, user)
            args = [rewrite_str(a, rewrites) for a in drv.args]
            if user is not None:
                process.prepare_user(store, user, tmpdir, {*scratch.values(), *g.outputs.values()})
            if sandbox.wanted(store, st, drv, printed,
                              lambda line: self.logger.log(Verbosity.ERROR, line)):
                fixed = derivation_type(drv) is DerivationType.CA_FIXED
                sb = sandbox.prepare(store, g.drv_path, tmpdir, user,
                                     self.goals.input_closure(g), st, fixed,
                                     builtin=drv.builder.startswith("builtin:"))
                env = sb.inside_env(env, tmpdir)
            check = g.mode == BuildMode.CHECK
            text = f"{'checking outputs of' if check else 'building'} '{printed}'"
            act = self.logger.start_activity(Verbosity.INFO, ActivityType.BUILD, text,
                                             [printed, "", 1, 1])
            log_file = None
            if st.keep_build_log:
                log_file = BuildLogFile(store.layout.log_dir, g.drv_path.base, st.compress_build_log)

            json_log = BuilderJSONLog(self.logger, act)

            def on_line(line: bytes, act: int = act) -> bool:
                if json_log.handle(line):
                    return False  # (an @nix message: not a log line)
                self.logger.result(act, ResultType.BUILD_LOG_LINE, [line.decode("utf-8", "surrogateescape")])
                return True

            now = time.monotonic()
            run = Run(g, None, None, locks, user, tmpdir, scratch, log_file,
                      LineSplitter(on_line, st.log_lines), act, now, now)
            run.start_wall = int(time.time())
            run.sandbox = sb
            run.json_log = json_log
            self._running.append(run)
            self._progress()
            process.start_builder(run, drv.builder, args, env, st.filter_syscalls, self._launcher,
                                  self._spawner)
        except BaseException:
            if run is None:
                remove_tree(tmpdir)
                if sb is not None:
                    sb.remove()
            raise

    def _environment(self, g: DrvGoal, tmpdir: str, scratch: dict[str, StorePath],
                     rewrites: dict[str, str], user: BuildUser | None) -> dict[str, str]:
        """The builder's variables; its files written into the (fresh, 0700) build dir."""
        store, drv = self.store, g.drv
        assert drv is not None

        def outputs_of(d: StorePath) -> list[StorePath]:
            # the paths the .drv names (their closures must then be valid, as in Nix)
            outs = store.read_derivation(d).outputs.values()
            if not all(o.path for o in outs):
                raise AttrError("exportReferences on CA derivations is not yet implemented")
            return [self.sd.parse(o.path, lax=True) for o in outs]

        def graphs() -> GraphSource:
            return GraphSource(self.goals.input_closure(g), store.path_info, outputs_of)

        try:
            built = builder_environment(
                self.sd, g.parsed_attrs(self.sd), tmpdir, self.settings.cores, scratch, rewrites,
                derivation_type(drv) is DerivationType.CA_FIXED,
                impure_sources(self.settings.impure_env), graphs)
        except InputRejected as e:
            raise Failure(BuildStatus.INPUT_REJECTED, str(e)) from None
        except (AttrError, StoreError) as e:
            # (StoreError: an exported derivation's outputs are not valid, say)
            raise Failure(BuildStatus.MISC_FAILURE, str(e)) from None
        for name, data in built.files.items():
            # nothing but us can have put a link here: the dir is new and ours
            with open(os.path.join(tmpdir, name), "xb") as f:
                f.write(data)
                if user is not None and name in built.owned:
                    os.fchown(f.fileno(), user.uid, user.gid)
        return built.env

    # --- waiting for builders -----------------------------------------------------

    def _wait(self, timeout: float) -> None:
        ready = process.wait_readable(self._running, timeout)
        now = time.monotonic()
        limit = self.settings.max_build_log_size
        for run in ready:
            data = run.read()
            if data is None:
                continue
            if data:
                run.feed(data, now, limit, self.sd)
            else:
                self._reap(run)
        for run in [r for r in self._running if r.fd is None]:
            self._reap(run)  # the builder could not be started
        for run in list(self._running):
            if run.check_time(now, self.settings, self.sd):
                run.kill()
                self._reap(run)

    def _reap(self, run: Run, cancelled: bool = False) -> None:
        """The builder's output ended (or it is being killed): collect it and its outcome."""
        if run not in self._running:
            return
        self._running.remove(run)
        g = run.goal
        succeeded = False
        try:
            status, cpu = run.collect(self.settings.max_build_log_size, self.sd)
            if run.sandbox is not None:
                run.sandbox.move_outputs(self.store, run.scratch.values())
            start, stop = run.start_wall, int(time.time())
            try:
                if cancelled:
                    raise Failure(BuildStatus.MISC_FAILURE,
                                  f"build of '{self.sd.print(g.drv_path)}' was interrupted")
                if run.killed_for is not None:
                    raise run.killed_for
                if status != 0:
                    raise Failure(run.failure_status(), run.failure_message(status, self.sd))
                with naming(self.store.real_store_dir):  # (an fd's write names nothing)
                    result = register_outputs(self.store, self.goals, run, self.settings, self.logger)
                result.start_time, result.stop_time, result.times_built = start, stop, 1
                result.cpu_user, result.cpu_system = cpu
                succeeded = True
            except Failure as f:
                # (a builder killed for a limit is not counted as built, as in Nix)
                built = 0 if f is run.killed_for else 1
                result = BuildResult(f.status, str(f), times_built=built, start_time=start,
                                     stop_time=stop, cpu_user=cpu[0], cpu_system=cpu[1],
                                     is_non_deterministic=f.status == BuildStatus.NOT_DETERMINISTIC,
                                     own_error=not cancelled)
            except BuildError:
                raise  # fails the whole request (cleaned up below), as in Nix
            except (StoreError, FormatError, OSError) as e:
                msg = str(e) if not isinstance(e, OSError) else \
                    f"{e.strerror}: '{os.fsdecode(e.filename)}'" if e.filename else f"{e.strerror}"
                result = BuildResult(BuildStatus.MISC_FAILURE, msg, times_built=1,
                                     start_time=start, stop_time=stop, own_error=not cancelled)
            if succeeded and self.settings.post_build_hook:
                # (outputs registered, still locked; its failure fails the whole
                # request, as in Nix: a BuildError, past the handlers above)
                run_post_build_hook(self.settings.post_build_hook, self.logger, self.sd,
                                    g.drv_path, g.outputs.values())
            # (the real daemon reports progress before it ends the Build activity)
            self._finish(g, result, quiet=cancelled)
        finally:
            try:
                process.clean_up(run, self.store, succeeded, self.settings.keep_failed, self.logger,
                                 self._trash)
            finally:
                if run.json_log is not None:
                    run.json_log.close()
                self.logger.stop_activity(run.act)
