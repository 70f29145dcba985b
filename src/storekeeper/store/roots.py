"""Finding GC roots: permanent (gcroots/, profiles/), temporary (temproots/) and runtime (/proc).

What counts as a root, as Nix 2.8 counts it (spec §6.2–6.4):

* Under ``<state>/gcroots`` and ``<state>/profiles``, recursively (symlinks to
  directories are not followed): a symlink into the store roots that store
  path; a symlink elsewhere (an *indirect* root, e.g. ``gcroots/auto/X →
  /home/u/result``) roots what its target links to, if that target is itself a
  symlink into the store; a regular file whose base name is a store path
  roots that path.
* In a user's own directory (``gcroots/per-user/<user>``,
  ``profiles/per-user/<user>``), an entry counts only if that user (or root)
  owns it, and a link that does not point into the store is followed only to
  a sibling inside the same directory (profile generations): a user cannot
  make the GC read, or keep alive through, files elsewhere.
* Every ``temproots/<pid>`` file whose owner is alive (it holds the flock).
* Paths that running processes use (exe, cwd, open files, mappings,
  environment), found in ``/proc`` (:func:`scan_proc`), unless
  ``runtime-roots = client``.
* What users registered with the daemon, and the runtime roots their clients
  reported while the lease lasts (unless ``runtime-roots = proc``): see
  :mod:`storekeeper.store.userroots`.

* An indirect root whose target cannot be read at all (an unmounted or
  unreadable NFS home, another host's file system) keeps alive the store path
  it last resolved to, for ``grace`` seconds after it was first missed (see
  :class:`IndirectRootMemory`).  One whose link is definitely gone (see
  :func:`_definitely_gone`: missing in a readable directory, or with its whole
  directory removed from a file system that is still there) is dropped at
  once, as Nix does.

Finding roots never deletes or writes anything unless the caller asks
(``cleanup``, used only by a deleting GC): then stale ``gcroots/auto`` links,
expired unresolvable ones, temp-root files of dead processes and expired
leases are removed, and what each indirect root resolved to is remembered.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import signal
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .. import fs
from ..formats.hashes import Hash
from ..formats.storepath import StoreDir, StorePath, StorePathError
from ..fs.atomic import symlink_atomic, write_file_atomic
from .locks import lock_fd
from .userroots import UserRoots, open_shared_lock

CENSORED = "{censored}"


@dataclass(frozen=True, order=True)
class Root:
    path: StorePath
    link: str  # the file that makes it a root, "{temp:<pid>}", "/proc/<pid>/…", a user's root name
    kind: str  # direct | indirect | indirect-unresolved | profile | temp | runtime | registered | lease
    uid: int | None = field(default=None, compare=False)  # registered, lease: whose
    first_missed: float | None = field(default=None, compare=False)  # indirect-unresolved
    expires: float | None = field(default=None, compare=False)  # lease; indirect-unresolved


class IndirectRootMemory:
    """``<state>/storekeeper/indirect/<auto name>``: what each indirect root last resolved to,
    and who added it.

    A record (JSON: link, store path or null, first-missed time or null,
    ``uids``) is written atomically under ``indirect/.lock``: by a deleting GC
    each time it resolves the root (``first_missed`` is set the first time the
    root cannot be read), and by the daemon's AddIndirectRoot, which adds the
    peer's uid to ``uids``.  Records never count as roots by themselves: they
    only stand in for an unreadable indirect root while its ``gcroots/auto``
    link exists.  A user may remove only their own claim on a root
    (:meth:`release`); the link goes when no claim is left.

    An entry that existed before anyone claimed it (made by real Nix, or before
    the daemon kept claims) gets the claim :data:`UNCLAIMED` when a user first
    claims it, so that a user who claims someone else's link and releases it
    again cannot remove it; only the link's owner (its ``lstat`` owner, read by
    the daemon) or a trusted user may drop that claim.  Records are private to
    the store's owner (0600 in a 0700 directory): they name what other users'
    links point at.
    """

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "storekeeper", "indirect")

    def get(self, name: str) -> dict | None:
        """The record, if any; its ``path`` may be None (never resolved)."""
        try:
            with open(os.path.join(self.dir, name)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), (str, type(None))):
            return None
        return rec

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if os.stat(self.dir).st_mode & 0o077:
            os.chmod(self.dir, 0o700)  # (made 0755 by earlier versions)
        fd = open_shared_lock(os.path.join(self.dir, ".lock"))
        try:
            lock_fd(fd, exclusive=True)
            yield
        finally:
            os.close(fd)

    def _write(self, name: str, rec: dict) -> None:
        if self.get(name) != rec:
            write_file_atomic(os.path.join(self.dir, name), json.dumps(rec).encode(), mode=0o600)

    def put(self, name: str, link: str, path: str | None, first_missed: float | None) -> None:
        with self._locked():
            old = self.get(name) or {}
            rec = {"link": link, "path": path, "first_missed": first_missed}
            for key in ("uids", "dev"):
                if key in old:
                    rec[key] = old[key]
            self._write(name, rec)

    def claim(self, auto: str, link: str, uid: int, path: str | None) -> None:
        """Make ``auto`` (a ``gcroots/auto`` entry) point to ``link`` and record ``uid``'s claim
        (``path``: what the link points at now, if known); one step under the lock, so a
        release racing with it cannot remove the link it just made."""
        name = os.path.basename(auto)
        with self._locked():
            try:
                unclaimed = os.readlink(auto) == link
            except OSError:
                unclaimed = False
            old = self.get(name) or {}
            keep = old.get("link") == link
            if keep and old.get("uids"):
                unclaimed = False
            symlink_atomic(link, auto)
            uids = sorted({*(u for u in (old.get("uids") or ()) if keep and isinstance(u, int)), uid,
                           *((UNCLAIMED,) if unclaimed else ())})
            rec = {"link": link, "path": path or (old.get("path") if keep else None),
                   "first_missed": old.get("first_missed") if keep and path is None else None,
                   "uids": uids}
            try:  # the file system the link's directory is on (see _definitely_gone)
                rec["dev"] = os.stat(os.path.dirname(link)).st_dev
            except OSError:
                if keep and isinstance(old.get("dev"), int):
                    rec["dev"] = old["dev"]
            self._write(name, rec)

    def release(self, auto: str, uid: int, link: str, owner_or_trusted: bool = False) -> bool:
        """Drop ``uid``'s claim on ``auto`` (for ``link``); the entry and its record go with
        the last claim.  With ``owner_or_trusted`` (``uid`` owns the link, or is trusted)
        also the :data:`UNCLAIMED` claim, or an entry without any record.  False if
        ``uid`` had nothing to drop."""
        name = os.path.basename(auto)
        with self._locked():
            rec = self.get(name)
            drop = {uid, UNCLAIMED} if owner_or_trusted else {uid}
            if rec is None or rec.get("link") != link:
                if not owner_or_trusted:
                    return False
                try:
                    if os.readlink(auto) != link:
                        return False
                except OSError:
                    return False
                rec = {"link": link, "uids": [UNCLAIMED]}
            if not drop & set(rec.get("uids") or [UNCLAIMED]):
                return False
            rec["uids"] = [u for u in (rec.get("uids") or [UNCLAIMED]) if u not in drop]
            if rec["uids"]:
                self._write(name, rec)
                return True
            try:
                if os.readlink(auto) == rec.get("link"):
                    os.unlink(auto)
            except OSError:
                pass
            self.forget(name)
            return True

    def forget(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, name))
        except FileNotFoundError:
            pass


DEFAULT_INDIRECT_GRACE = 14 * 86400
#: the claim of an indirect root that existed before anyone claimed it (see IndirectRootMemory)
UNCLAIMED = -1


RUNTIME_MODES = ("proc", "client", "both")


class RootFinder:
    def __init__(self, store_dir: StoreDir, real_store_dir: str, state_dir: str,
                 indirect_grace: float = DEFAULT_INDIRECT_GRACE, now: float | None = None,
                 runtime_mode: str = "both") -> None:
        self.store_dir = store_dir
        self.real_store_dir = real_store_dir
        self.state_dir = state_dir
        self.indirect_grace = indirect_grace
        if runtime_mode not in RUNTIME_MODES:
            raise ValueError(f"runtime-roots must be one of {', '.join(RUNTIME_MODES)}")
        self.runtime_mode = runtime_mode
        self.now = time.time() if now is None else now
        self.memory = IndirectRootMemory(state_dir)
        self.messages: list[str] = []
        #: indirect roots that could not be read and are still kept (see _unresolved)
        self.unresolved: list[dict] = []

    # --- store path of a link target ---------------------------------------------

    def _to_store_path(self, target: str) -> StorePath | None:
        for prefix in {self.store_dir.path, self.real_store_dir}:
            if target.startswith(prefix + "/"):
                base = target[len(prefix) + 1:].split("/", 1)[0]
                try:
                    return StorePath.from_base(base, lax=True)
                except StorePathError:
                    return None
        return None

    # --- permanent roots -------------------------------------------------------------

    def permanent_roots(self, cleanup: bool = False) -> Iterator[Root]:
        gcroots = os.path.join(self.state_dir, "gcroots")
        yield from self._scan(gcroots, cleanup)
        profiles = os.path.join(self.state_dir, "profiles")
        yield from self._scan(profiles, cleanup)

    def _scan(self, top: str, cleanup: bool) -> Iterator[Root]:
        """The roots under ``top`` (``gcroots`` or ``profiles``), walked fd-relative
        (a user's own ``per-user/<name>`` dir can be changed under us: nothing in it
        is followed).  Inside a user's dir only entries that user (or root) owns count."""
        kind = "profile" if top.endswith("/profiles") else "direct"
        owners: dict[str, tuple[str, int]] = {}  # per-user/<name> -> (its path, its owner)

        def unreadable(node: fs.Node, err: OSError) -> None:
            self.messages.append(f"cannot read potential root '{node.show(top)}'")

        try:
            for ev, node in fs.walk(top, sort=True, on_error=unreadable):
                if ev == fs.LEAVE:
                    continue
                path = node.show(top)
                try:
                    st = node.lstat()
                except FileNotFoundError:
                    continue
                parts = node.path.split("/", 2)
                user_dir = None
                if parts[0] == "per-user" and len(parts) >= 2:
                    if len(parts) == 2:  # a user's own directory: confine what it can name
                        owners[parts[1]] = (path, st.st_uid)
                    user_dir = owners.get(parts[1])
                if user_dir is not None and st.st_uid not in (user_dir[1], 0):
                    self.messages.append(f"ignoring root '{path}': not owned by the owner of '{user_dir[0]}'")
                    node.prune = True
                    continue
                if ev == fs.ENTER:
                    continue
                if node.kind == fs.LNK:
                    target = os.readlink(node.name, dir_fd=node.parent_fd)
                    yield from self._link_root(path, target, kind, cleanup, user_dir)
                elif node.kind == fs.REG:
                    try:
                        yield Root(StorePath.from_base(os.path.basename(path), lax=True), path, kind)
                    except StorePathError:
                        pass
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES, errno.ENOTDIR):
                raise
            if e.errno != errno.ENOENT:
                self.messages.append(f"cannot read potential root '{top}'")

    def _link_root(self, path: str, target: str, kind: str, cleanup: bool,
                   user_dir: tuple[str, int] | None) -> Iterator[Root]:
        sp = self._to_store_path(target)
        if sp is not None:
            yield Root(sp, path, kind)
            return
        # Indirect: the target is a link elsewhere (e.g. a `result` symlink).
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        if user_dir is not None:
            if os.path.dirname(resolved) != os.path.dirname(path):
                self.messages.append(f"ignoring root '{path}': it points outside the store")
                return
            return  # a sibling in the same directory: scanned in its own right
        auto = os.path.dirname(path) == os.path.join(self.state_dir, "gcroots", "auto")
        try:
            tst = os.lstat(resolved)
            sp = self._to_store_path(os.readlink(resolved)) if stat.S_ISLNK(tst.st_mode) else None
        except OSError as e:
            if auto:
                yield from self._unresolved(path, resolved, e, cleanup)
            elif e.errno not in (errno.ENOENT, errno.ENOTDIR):
                self.messages.append(f"cannot read potential root '{resolved}'")
            return
        if sp is not None:
            yield Root(sp, resolved, "indirect")
        if auto and cleanup:
            name = os.path.basename(path)
            # (None: its owner pointed it elsewhere; the claims stay)
            self.memory.put(name, resolved, self.store_dir.print(sp) if sp is not None else None, None)

    def _unresolved(self, path: str, resolved: str, err: OSError, cleanup: bool) -> Iterator[Root]:
        """An indirect root whose target could not be read (see the module docstring)."""
        name = os.path.basename(path)
        rec = self.memory.get(name)
        owner_removed_it = _definitely_gone(resolved, err, rec)
        rec = None if owner_removed_it else rec
        if rec is None:
            if owner_removed_it or err.errno == errno.ENOENT:
                if cleanup:
                    self.messages.append(f"removing stale link from '{path}' to '{resolved}'")
                    os.unlink(path)
                    self.memory.forget(name)
            else:
                self.messages.append(f"cannot read potential root '{resolved}'")
            return
        first = rec.get("first_missed") or self.now
        until = first + self.indirect_grace
        if self.now - first < self.indirect_grace:
            if cleanup and rec.get("first_missed") is None:
                self.memory.put(name, rec.get("link") or resolved, rec["path"], first)
            self.unresolved.append({"link": resolved, "auto": path, "path": rec["path"],
                                    "first_missed": first, "kept_until": until,
                                    "uids": rec.get("uids") or []})
            when = time.strftime('%Y-%m-%d %H:%M', time.gmtime(until))
            if rec["path"] is None:
                self.messages.append(
                    f"cannot read indirect root '{resolved}' ({err.strerror}); it never led to a "
                    f"store path we know, so it keeps nothing alive; dropped after {when} UTC "
                    "unless it becomes readable or its owner removes it")
                return
            try:
                sp = self.store_dir.parse(rec["path"], lax=True)
            except StorePathError:
                return
            self.messages.append(f"cannot read indirect root '{resolved}' ({err.strerror}); keeping "
                                 f"'{rec['path']}' until {when} UTC")
            yield Root(sp, resolved, "indirect-unresolved", first_missed=first, expires=until)
        elif cleanup:
            self.messages.append(f"removing indirect root '{resolved}': unreadable since "
                                 f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(first))} UTC")
            os.unlink(path)
            self.memory.forget(name)

    # --- temp roots ------------------------------------------------------------------

    def temp_roots(self, cleanup: bool = False) -> Iterator[Root]:
        """Roots of live processes; with ``cleanup`` the files of dead ones are removed."""
        d = os.path.join(self.state_dir, "temproots")
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith("."):
                continue
            p = os.path.join(d, name)
            try:
                fd = os.open(p, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            except OSError:
                self.messages.append(f"cannot read temporary roots file '{p}'")
                continue
            try:
                if lock_fd(fd, exclusive=True, wait=False):
                    # Its owner is gone: the roots are dead.
                    if cleanup:
                        self.messages.append(f"removing stale temporary roots file '{p}'")
                        try:
                            os.unlink(p)
                        except FileNotFoundError:
                            pass  # its owner removed it as it exited (then unlocked it)
                        os.write(fd, b"d")
                    continue
                data = b""
                while chunk := os.pread(fd, 1 << 20, len(data)):
                    data += chunk
            finally:
                os.close(fd)
            for entry in data.split(b"\0"):
                if not entry:
                    continue
                sp = self._to_store_path(entry.decode(errors="replace"))
                if sp is not None:
                    yield Root(sp, f"{{temp:{name}}}", "temp")

    # --- runtime roots ---------------------------------------------------------------

    def runtime_roots(self) -> Iterator[Root]:
        """Store paths in use by running processes that we can see (our own under hidepid=2);
        nothing with ``runtime-roots = client``."""
        if self.runtime_mode == "client":
            return
        prefixes = {self.store_dir.path, self.real_store_dir}
        found = list(scan_proc(prefixes))
        for kf in ("/proc/sys/kernel/modprobe", "/proc/sys/kernel/fbsplash",
                   "/proc/sys/kernel/poweroff_cmd"):
            try:
                with open(kf) as f:
                    found.append((f.read().strip(), kf))
            except OSError:
                pass
        for target, link in found:
            sp = self._to_store_path(target)
            if sp is not None:
                yield Root(sp, link, "runtime")

    # --- what users told the daemon --------------------------------------------------

    def user_roots(self, cleanup: bool = False) -> Iterator[Root]:
        """Registrations, and live leases unless ``runtime-roots = proc``."""
        ur = UserRoots(self.state_dir)
        for reg in ur.registrations(messages=self.messages):
            sp = self._to_store_path(reg.path)
            if sp is not None:
                yield Root(sp, reg.name, "registered", uid=reg.uid)
        if self.runtime_mode == "proc":
            return
        for lease in ur.leases(now=self.now, messages=self.messages):
            for p in lease.paths:
                sp = self._to_store_path(p)
                if sp is not None:
                    yield Root(sp, f"{{lease:{lease.name}}}", "lease", uid=lease.uid,
                               expires=lease.expires)
        if cleanup:
            ur.prune_expired(self.now)


def scan_proc(prefixes: Iterable[str], uid: int | None = None,
              proc: str = "/proc") -> Iterator[tuple[str, str]]:
    """(path, where) for every path under ``prefixes`` that a visible process uses: its exe,
    cwd, open files, mappings and environment.  With ``uid``, only that user's processes
    (as a client finds its own runtime roots: it needs no privilege, and works under
    ``hidepid=2``, where other users' processes are invisible anyway).
    """
    prefixes = sorted(set(prefixes))
    env_re = re.compile(b"(?:" + b"|".join(re.escape(p.encode()) for p in prefixes) +
                        rb")/[0-9a-z]+[0-9a-zA-Z+\-._?=]*")
    maps_re = re.compile(rb"^\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+(/\S+)$", re.M)

    def wanted(target: str) -> bool:
        return any(target == p or target.startswith(p + "/") for p in prefixes)

    try:
        pids = [n for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return
    for pid in pids:
        base = f"{proc}/{pid}"
        try:
            if uid is not None and os.stat(base).st_uid != uid:
                continue
        except OSError:
            continue
        found: list[tuple[str, str]] = []
        for leaf in ("exe", "cwd"):
            try:
                found.append((os.readlink(f"{base}/{leaf}"), f"{base}/{leaf}"))
            except OSError:
                pass
        try:
            for fd in os.listdir(f"{base}/fd"):
                try:
                    t = os.readlink(f"{base}/fd/{fd}")
                except OSError:
                    continue
                if t.startswith("/"):
                    found.append((t, f"{base}/fd/{fd}"))
        except OSError:
            pass
        for leaf, rx in (("maps", maps_re), ("environ", env_re)):
            try:
                with open(f"{base}/{leaf}", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            for m in rx.finditer(data):
                found.append((os.fsdecode(m.group(m.lastindex or 0)), f"{base}/{leaf}"))
        for target, where in found:
            if target.endswith(" (deleted)"):
                target = target[:-len(" (deleted)")]
            if wanted(target):
                yield target, where


def indirect_root_name(link: str) -> str:
    """``gcroots/auto/<name>`` for a link: nix32 of SHA-1 of the absolute link path."""
    return Hash.of("sha1", os.fsencode(link)).nix32  # (its bytes, as Nix: any file name)


def _definitely_gone(link: str, err: OSError, rec: dict | None) -> bool:
    """Whether an indirect root's link was removed (as opposed to being unreadable).

    Gone: the link is missing (ENOENT/ENOTDIR) in a directory the daemon can
    read; or its directory is missing too (``nix-build --no-out-link`` removes
    its temp dir) and the nearest existing ancestor is readable and on the
    file system the directory was on when the root was added (``dev`` in the
    record): not an unmounted or unreachable home, which keeps its grace.
    """
    if err.errno not in (errno.ENOENT, errno.ENOTDIR):
        return False
    parent = os.path.dirname(link)
    if os.access(parent, os.R_OK | os.X_OK):
        return True
    dev = rec.get("dev") if rec is not None else None
    if not isinstance(dev, int):
        return False
    ancestor = parent
    while ancestor != "/":
        ancestor = os.path.dirname(ancestor)
        try:
            st = os.stat(ancestor)
        except FileNotFoundError:
            continue
        except OSError:
            return False
        return st.st_dev == dev and os.access(ancestor, os.R_OK | os.X_OK)
    return False


def link_owner(path: str) -> int | None:
    """The owner of the symlink ``path`` itself (``O_PATH|O_NOFOLLOW``, then ``fstat`` on
    that fd: never a file it points to), or None if it is not a readable symlink."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_uid if stat.S_ISLNK(st.st_mode) else None


def read_link_as(path: str, uid: int, gid: int, groups: list[int], timeout: float = 5.0) -> str | None:
    """What the symlink ``path`` points at, read with the rights of ``uid``/``gid``/``groups``
    (a short-lived child that drops to them), or None if that user cannot read it.

    A root daemon must not read, on a user's behalf, what the user could not read
    (a link in someone else's private directory).  Not root, or for root: read here.
    """
    if os.geteuid() != 0 or uid == 0:
        try:
            return os.readlink(path)
        except (OSError, ValueError):
            return None
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, read, report, exit
        code = 1
        try:
            os.close(rfd)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            target = os.fsencode(os.readlink(path))
            os.write(wfd, target[:65536])
            code = 0
        except BaseException:  # noqa: BLE001 -- an unreadable link is an answer too
            pass
        finally:
            os._exit(code)
    os.close(wfd)
    data = b""
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)  # (a hung file system)
                break
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        return None
    return os.fsdecode(data)


def add_indirect_root(state_dir: str, link: str, uid: int | None = None,
                      finder: RootFinder | None = None,
                      read_link: Callable[[str], str | None] | None = None) -> str:
    """Register ``link`` (a symlink the client made) as an indirect root; atomic, idempotent.

    With ``uid`` the root is claimed for that user (see :class:`IndirectRootMemory`),
    with what it points at now if ``finder`` can read it (through ``read_link``:
    the daemon passes one that reads with the peer's rights), so that it is kept
    even if it is never readable again (until ``indirect-root-grace`` passes).
    """
    if not link.startswith("/") or "\0" in link:
        raise ValueError(f"indirect root '{link}' is not an absolute path")
    auto = os.path.join(state_dir, "gcroots", "auto")
    os.makedirs(auto, mode=0o755, exist_ok=True)
    name = os.path.join(auto, indirect_root_name(link))
    if uid is None:
        symlink_atomic(link, name)
        return name
    path = None
    if finder is not None:
        if read_link is None:
            try:
                target: str | None = os.readlink(link)
            except OSError:
                target = None
        else:
            target = read_link(link)
        sp = finder._to_store_path(target) if target is not None else None
        path = finder.store_dir.print(sp) if sp is not None else None
    IndirectRootMemory(state_dir).claim(name, link, uid, path)
    return name
