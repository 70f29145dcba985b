"""Build users: the unprivileged accounts builders run as (spec §9).

Invariants (shared with Nix 2.8 processes on the same state dir):

* **One build per user at a time.**  A user is taken from the members of the
  ``build-users-group`` group, in ``/etc/group`` order, by ``flock``-ing
  ``<state>/userpool/<uid>`` (``O_RDWR|O_CREAT``, 0600) exclusively and
  without blocking; the lock is held until the build is over and released by
  closing the fd.  Nix uses the same files and the same lock, so a Nix daemon
  and ours never hand one uid to two builds.
* **A build user owns nothing that outlives its build.**  Every process of the
  uid is killed before the builder starts (leftovers of a build that crashed)
  and again when it has exited, before its outputs are inspected: nothing can
  change an output while it is checked and canonicalised.
* **The daemon's own identity is never lent out.**  A group member whose uid
  is the daemon's euid is refused: killing "all processes of the build user"
  would kill the daemon.

Killing is done as Nix does it: a forked child drops to the uid and sends
``kill(-1, SIGKILL)``, which reaches exactly the processes that uid may
signal (its own), including ones that left the builder's session.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import StoreError
from ..store.locks import lock_fd, open_lock_file


class BuildUserError(StoreError):
    """The build users group cannot supply a user (misconfiguration)."""


@dataclass
class BuildUser:
    """A build user held for one build; :meth:`release` gives it back."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    lock_path: str
    _fd: int | None = field(default=None, repr=False)
    #: run when the build is over, after every process of the uid has been killed
    #: and before the uid is unlocked (the sweep of :mod:`~storekeeper.build.confine`)
    before_release: list[Callable[[], object]] = field(default_factory=list, repr=False)

    def kill_processes(self) -> None:
        kill_user(self.uid)

    def release(self) -> None:
        """Give the user back; never raises (it runs in cleanup paths).  A failed
        ``before_release`` step is left for the sweep before the uid's next build."""
        if self._fd is None:
            return
        try:
            if self.before_release:
                self.kill_processes()
                for step in self.before_release:
                    step()
                self.kill_processes()  # anything started from a file the sweep removed
        except Exception:  # noqa: BLE001 -- best effort, see above
            pass
        finally:
            self.before_release = []
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self) -> "BuildUser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class UserPool:
    """The members of one group, handed out one build at a time (module docstring)."""

    def __init__(self, group: str, state_dir: str) -> None:
        self.group = group
        self.dir = os.path.join(state_dir, "userpool")

    def _members(self) -> tuple[int, list[pwd.struct_passwd]]:
        try:
            gr = grp.getgrnam(self.group)
        except KeyError:
            raise BuildUserError(f"the group '{self.group}' specified in 'build-users-group' "
                                 "does not exist") from None
        if not gr.gr_mem:
            raise BuildUserError(f"the build users group '{self.group}' has no members")
        users = []
        for name in gr.gr_mem:
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                raise BuildUserError(f"the user '{name}' in the group '{self.group}' does "
                                     "not exist") from None
            if pw.pw_uid == os.geteuid():
                raise BuildUserError(f"the Nix user should not be a member of '{self.group}'")
            users.append(pw)
        return gr.gr_gid, users

    def try_acquire(self) -> BuildUser | None:
        """A free build user, locked for us; None when all are busy."""
        gid, users = self._members()
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        for pw in users:
            path = os.path.join(self.dir, str(pw.pw_uid))
            fd = open_lock_file(path)
            try:
                got = lock_fd(fd, exclusive=True, wait=False)
            except BaseException:
                os.close(fd)
                raise
            if not got:
                os.close(fd)
                continue
            groups = tuple(g for g in os.getgrouplist(pw.pw_name, gid) if g != gid)
            return BuildUser(pw.pw_name, pw.pw_uid, gid, groups, path, fd)
        return None

    def acquire(self, on_wait: Callable[[], None] | None = None, poll: float = 0.2,
                give_up: Callable[[], bool] | None = None) -> BuildUser | None:
        """Wait for a free build user (``on_wait`` is called once if we have to)."""
        waited = False
        while True:
            user = self.try_acquire()
            if user is not None:
                return user
            if give_up is not None and give_up():
                return None
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(poll)


def kill_user(uid: int) -> None:
    """SIGKILL every process of ``uid`` (never root's, never our own uid's)."""
    if uid == 0 or uid == os.geteuid():
        raise BuildUserError(f"refusing to kill all processes of uid {uid}")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(uid, uid, uid)
            # kill(-1) reaches every process we may signal, except ourselves.
            # Linux answers 0 whenever some other process exists at all, so
            # success says nothing about what was hit; a few sweeps also
            # catch children forked while the first one ran.
            for _ in range(3):
                try:
                    os.kill(-1, signal.SIGKILL)
                except OSError as e:
                    if e.errno not in (errno.ESRCH, errno.EPERM, errno.EINTR):
                        raise
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise BuildUserError(f"cannot kill the processes of uid {uid}")
