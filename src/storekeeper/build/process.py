"""The builder process: its build dir, starting it, reading its output, its time
limits, and killing and reaping it.

Invariants:

* **A build runs in a fresh, private build dir** (``<TMPDIR>/nix-build-<drv
  name>-<n>``, 0700, owned by the build user), with Nix's environment
  (:mod:`.environment`), as a build user from ``build-users-group`` when there
  is one (see :mod:`~storekeeper.build.users`), confined
  (:mod:`~storekeeper.build.confine`), in a new session, stdin from
  ``/dev/null``, stdout and stderr into one pipe that becomes the log.
* **Nothing of a builder runs once it is reaped**: :meth:`Run.collect` kills its
  process group and (with build users) every process of its uid before the
  status is taken and the outputs are looked at, so nothing can change them
  while they are inspected (:mod:`.outputs`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Iterable

from .. import fs
from ..errors import StoreError
from ..formats.derivation import DerivationType, derivation_type
from ..formats.storepath import StoreDir, StorePath
from ..formats.wire import Verbosity
from ..fs.waiting import readable
from ..store.locks import PathLocks
from . import builtins, confine
from .forkserver import Launched, LauncherError, LauncherServer
from .goals import DrvGoal
from .jsonlog import BuilderJSONLog
from .logger import BuildLogger
from .logs import BuildLogFile, LineSplitter
from .results import BuildStatus, Failure
from .sandbox import Sandbox
from .settings import BuildSettings
from .spawner import SpawnedBuilder, Spawner
from .users import BuildUser


@dataclass(eq=False)
class Run:
    """One builder process and what belongs to it until it is reaped."""

    goal: DrvGoal
    #: the builder: our child, (sandboxed) the launcher server's, or (confined,
    #: unsandboxed) the spawner's
    proc: subprocess.Popen | Launched | SpawnedBuilder | None
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
    killed_for: Failure | None = None
    exec_error: str | None = None
    #: the build's sandbox (:mod:`.sandbox`), None when it runs unsandboxed
    sandbox: Sandbox | None = None
    #: the builder's @nix messages and the activities they opened (ended with the build)
    json_log: BuilderJSONLog | None = None

    def kill(self) -> None:
        """SIGKILL to the builder's session (it is its own process group)."""
        if isinstance(self.proc, Launched):
            self.proc.kill()
        elif self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def read(self) -> bytes | None:
        """Some output (b"": its end), or None if there is none after all."""
        assert self.fd is not None
        try:
            return os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return None

    def feed(self, data: bytes, now: float, max_log_size: int, sd: StoreDir) -> None:
        """Output of the builder: into the log file and the lines; killed past
        ``max-build-log-size``."""
        if self.killed_for is not None:
            return  # (as Nix: once a build is stopped for a limit, its output is dropped)
        self.last_output = now
        self.log_bytes += len(data)
        if max_log_size and self.log_bytes > max_log_size:
            # the chunk that crosses the limit is not logged either (as Nix)
            self.killed_for = Failure(
                BuildStatus.LOG_LIMIT_EXCEEDED,
                f"{self.name(sd)} killed after writing more than {max_log_size} bytes of log output")
            self.kill()
            return
        if self.log_file is not None:
            self.log_file.write(data)
        self.splitter.feed(data)

    def name(self, sd: StoreDir) -> str:
        """The build as Nix's messages about its limits name it."""
        return (f"building of '{sd.print(self.goal.drv_path)}!{','.join(self.goal.wanted_names())}' "
                "from .drv file")

    def check_time(self, now: float, st: BuildSettings, sd: StoreDir) -> bool:
        """``timeout`` / ``max-silent-time``: True if the builder must be killed now."""
        name = self.name(sd)
        if st.max_silent_time and now - self.last_output >= st.max_silent_time:
            self.killed_for = Failure(BuildStatus.TIMED_OUT, f"{name} timed out after "
                                      f"{st.max_silent_time} seconds of silence")
        elif st.timeout and now - self.start >= st.timeout:
            self.killed_for = Failure(BuildStatus.TIMED_OUT,
                                      f"{name} timed out after {st.timeout} seconds")
        return self.killed_for is not None

    def collect(self, max_log_size: int, sd: StoreDir) -> tuple[int, tuple[int | None, int | None]]:
        """Kill what is left of the builder, take its status and CPU times and the rest
        of its output; afterwards nothing of the build runs (module docstring)."""
        # EOF may come from a builder that merely closed its output: like
        # Nix, kill whatever is left of its session, then take the status.
        self.kill()
        status, cpu = wait_with_times(self.proc)
        if self.fd is not None:
            try:
                while data := os.read(self.fd, 1 << 16):
                    self.feed(data, time.monotonic(), max_log_size, sd)
            except OSError:
                pass  # a stray writer outside the session still holds the pipe
            os.close(self.fd)
            self.fd = None
        if self.killed_for is None:
            self.splitter.finish()  # (a stopped build's unfinished line is dropped, as Nix)
        if self.log_file is not None:
            self.log_file.close()
        if self.user is not None:
            self.user.kill_processes()  # nothing of the build may run while we look
        return status, cpu

    def failure_status(self) -> BuildStatus:
        """How a builder's non-zero exit counts (a fixed output may work next time)."""
        g = self.goal
        fixed = g.drv is not None and derivation_type(g.drv) is DerivationType.CA_FIXED
        return BuildStatus.TRANSIENT_FAILURE if fixed else BuildStatus.PERMANENT_FAILURE

    def failure_message(self, status: int, sd: StoreDir) -> str:
        """Nix's message for a builder that exited with ``status``, with the last log lines."""
        printed = sd.print(self.goal.drv_path)
        if status < 0:
            how = f"failed due to signal {-status} ({signal.strsignal(-status)})"
        else:
            how = f"failed with exit code {status}"
        msg = f"builder for '{printed}' {how}"
        tail = list(self.splitter.tail)
        if tail:
            lines = "".join(f"> {line.decode('utf-8', 'surrogateescape')}\n" for line in tail)
            msg += f";\nlast {len(tail)} log lines:\n{lines}For full logs, run 'nix log {printed}'."
        return msg


def wait_with_times(proc) -> tuple[int, tuple[int | None, int | None]]:
    """The builder's exit status and its CPU times in microseconds (user, system; its
    waited-for descendants included), or (None, None) when they cannot be had."""
    if proc is None:
        return 1, (None, None)
    if isinstance(proc, SpawnedBuilder):
        return proc.wait_with_times()
    if isinstance(proc, Launched):
        return proc.wait(), proc.cpu
    if proc.returncode is None:
        try:
            _, st, ru = os.wait4(proc.pid, 0)
        except ChildProcessError:
            pass
        else:
            proc.returncode = os.waitstatus_to_exitcode(st)
            return proc.returncode, (int(ru.ru_utime * 1e6), int(ru.ru_stime * 1e6))
    return proc.wait(), (None, None)


def make_build_dir(settings: BuildSettings, drv_name: str) -> str:
    """A fresh build dir, 0700, ours (module docstring)."""
    base = settings.build_dir or os.environ.get("TMPDIR") or "/tmp"
    for n in range(1 << 20):
        path = os.path.join(base, f"nix-build-{drv_name}-{n}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise StoreError(f"cannot create a build directory in '{base}'")


def keep_build_dir(run: Run, logger: BuildLogger) -> None:
    """keep-failed: leave the build dir readable.  The builder owned it and
    could have replaced it (its entry in sticky /tmp is the build user's):
    change only a directory of the builder's, through the fd we checked."""
    try:
        fd = fs.open_dir(run.tmpdir)
    except OSError:
        logger.log(Verbosity.ERROR, f"note: build directory '{run.tmpdir}' was replaced "
                                    "by the builder; not kept")
        return
    try:
        st = os.fstat(fd)
        if st.st_uid not in (os.geteuid(), run.user.uid if run.user is not None else -1):
            logger.log(Verbosity.ERROR, f"note: build directory '{run.tmpdir}' was "
                                        "replaced by the builder; not kept")
            return
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)
    logger.log(Verbosity.ERROR, f"note: keeping build directory '{run.tmpdir}'")


def prepare_user(store, user: BuildUser, tmpdir: str, paths: Iterable[StorePath]) -> None:
    """Make ``user`` ready to build in ``tmpdir`` the store paths ``paths``: its old
    processes killed, what it left in shared places swept (now, and after the build,
    once its processes are killed again), the build dir and store dir open to it."""
    user.kill_processes()
    # (confine.py) what the build user left in shared places goes: now,
    # and after the build, once its processes are killed again
    real_sd = store.real_store_dir
    dirs = confine.sweep_dirs(real_sd, os.path.dirname(tmpdir))
    confine.sweep(user.uid, dirs, keep=lambda d, n, s: confine.kept_by_keep_failed(
        d, n, s, real_sd))
    keep = confine.keep_paths([tmpdir, *(store.real_path(p) for p in paths)])
    user.before_release.append(lambda: confine.sweep(user.uid, dirs, keep=keep))
    fd = fs.open_dir(tmpdir)  # ours (0700) until this chown
    try:
        os.fchown(fd, user.uid, user.gid)
    finally:
        os.close(fd)
    _store_dir_for(store, user)


def _store_dir_for(store, user: BuildUser) -> None:
    """Builders create their outputs in the store: it must be ``root:<group>`` 01775."""
    fd = fs.open_dir(store.real_store_dir)
    try:
        st = os.fstat(fd)
        if st.st_gid != user.gid or (st.st_mode & 0o7777) != 0o1775:
            os.fchown(fd, -1, user.gid)
            os.fchmod(fd, 0o1775)
    finally:
        os.close(fd)


def start_builder(run: Run, builder: str, args: list[str], env: dict[str, str],
                  filter_syscalls: bool, launcher: LauncherServer,
                  spawner: Spawner | None = None) -> None:
    """Start ``builder`` for ``run`` (module docstring); a sandboxed one through the
    session's ``launcher``, a confined unsandboxed one through ``spawner`` when it can
    be had (:mod:`.spawner` says why).  A builder that cannot be executed is, as in
    Nix, a log line and exit status 1 (``run.exec_error``)."""
    rfd, wfd = os.pipe()
    run.fd = rfd
    os.set_blocking(rfd, False)
    spec_fd = None
    user = run.user
    try:
        # (None, (): Popen's defaults, as when not given)
        uid, gid, groups = (user.uid, user.gid, list(user.groups)) if user is not None \
            else (None, None, None)
        program, argv = builder, [os.path.basename(builder), *args]
        if builder.startswith("builtin:"):
            # a builtin is a child process like any builder: builtins/__init__ says why
            argv = builtins.command(builder[len("builtin:"):])
            program = argv[0]
        executable: str | None = program
        child_env = env
        pass_fds: tuple[int, ...] = ()
        preexec = None
        if run.sandbox is not None:
            # namespaces, chroot, NO_NEW_PRIVS and seccomp (launcher.py), in a fork
            # of the session's launcher server (which maps the build user's ids)
            spec_fd = run.sandbox.spec_fd(
                program, argv, env, confine.host_filter() if filter_syscalls else None)
            run.proc = launcher.launch(spec_fd, wfd)
            return
        if filter_syscalls:
            # NO_NEW_PRIVS + seccomp: in the forked child when that is safe, else set
            # by a trampoline that then exec's the builder (confine.py says why, and
            # what each costs)
            preexec = confine.preexec_confiner(confine.host_filter())
            if preexec is None:
                argv, spec_fd = confine.confined_argv(program, argv, env, confine.host_filter())
                executable, child_env, pass_fds = None, {}, (spec_fd,)
            elif spawner is not None and spawner.start(preexec):
                run.proc = spawner.spawn(wfd, args=argv, executable=executable, env=child_env,
                                         user=uid, group=gid, extra_groups=groups,
                                         cwd=run.tmpdir, umask=0o022)
                return
        run.proc = subprocess.Popen(
            argv, executable=executable, env=child_env, pass_fds=pass_fds,
            user=uid, group=gid, extra_groups=groups, preexec_fn=preexec,
            cwd=run.tmpdir, stdin=subprocess.DEVNULL, stdout=wfd, stderr=wfd, close_fds=True,
            start_new_session=True, umask=0o022)
    except LauncherError as e:
        run.exec_error = f"error: {e}"
        run.splitter.feed(run.exec_error.encode() + b"\n")
        if run.log_file is not None:
            run.log_file.write(run.exec_error.encode() + b"\n")
    except subprocess.SubprocessError:
        # (the preexec_fn failed in the child: NNP or the filter could not be set)
        run.exec_error = ("cannot set no_new_privs or load the seccomp filter for the builder "
                          "(set 'filter-syscalls = false' to build without it)")
        run.splitter.feed(run.exec_error.encode() + b"\n")
        if run.log_file is not None:
            run.log_file.write(run.exec_error.encode() + b"\n")
    except OSError as e:
        # Nix's child reports this in the log and exits 1
        run.exec_error = f"executing '{builder}': {e.strerror}"
        run.splitter.feed(run.exec_error.encode() + b"\n")
        if run.log_file is not None:
            run.log_file.write(run.exec_error.encode() + b"\n")
    finally:
        os.close(wfd)
        if spec_fd is not None:
            os.close(spec_fd)


def next_deadline(runs: Iterable[Run], st: BuildSettings) -> float:
    """Seconds until the first ``timeout`` / ``max-silent-time`` may strike (at most 1)."""
    now, wait = time.monotonic(), 1.0
    for run in runs:
        if st.timeout:
            wait = min(wait, run.start + st.timeout - now)
        if st.max_silent_time:
            wait = min(wait, run.last_output + st.max_silent_time - now)
    return max(wait, 0.0)


def wait_readable(runs: Iterable[Run], timeout: float) -> list[Run]:
    """Waits up to ``timeout`` for output of the builders; those that have some (or
    reached its end)."""
    fds = {run.fd: run for run in runs if run.fd is not None}
    if not fds:
        time.sleep(min(timeout, 0.05))
        return []
    return [fds[fd] for fd in readable(list(fds), timeout)]


class Trash:
    """Build dirs to remove once the next builders are started: off the path from one
    build to the next in a chain (deleting even a tiny dir costs ~1 ms on ext4 with
    ``discard``).  Only dirs of builds without a build user wait here (nothing but
    this daemon can touch them); :meth:`empty` runs before the scheduler waits and
    when the request ends."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def empty(self) -> None:
        paths, self.paths = self.paths, []
        for path in paths:
            fs.remove_tree(path)


def clean_up(run: Run, store, succeeded: bool, keep_failed: bool, logger: BuildLogger,
             trash: Trash | None = None) -> None:
    """Give back what ``run`` held: scratch copies, a failed build's outputs and
    build dir (unless ``keep-failed``; into ``trash`` when there is no build user),
    its build user and its output locks."""
    g = run.goal
    try:
        for name, path in run.scratch.items():
            if path != g.outputs[name]:
                fs.remove_tree(store.real_path(path))
        if not succeeded:
            for path in g.outputs.values():
                if not store.is_valid(path) and not keep_failed:
                    fs.remove_tree(store.real_path(path))
        if run.sandbox is not None:
            run.sandbox.remove()
        if (succeeded or not keep_failed) and trash is not None and run.user is None:
            trash.paths.append(run.tmpdir)
        elif succeeded or not keep_failed:
            fs.remove_tree(run.tmpdir)
        else:
            keep_build_dir(run, logger)
    finally:
        if run.user is not None:
            run.user.release()
        run.locks.delete_on_release = True
        run.locks.release()
