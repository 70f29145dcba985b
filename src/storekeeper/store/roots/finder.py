"""Finding the roots: permanent (gcroots, profiles), temp, runtime (/proc), registered
and leased (the invariants are the package docstring's)."""

from __future__ import annotations

import errno
import functools
import os
import stat
import time

from ... import fs
from ...formats.frozen import Frozen
from ...formats.storepath import StoreDir, StorePath, StorePathError
from ...fs.proc import list_pids, scan_proc
from ..locks import lock_fd
from .indirect import DEFAULT_INDIRECT_GRACE, IndirectRootMemory, _definitely_gone
from .registrations import UserRoots

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


@functools.total_ordering
class Root(Frozen):
    """One root: ``path`` is kept alive because of ``link``.  Equal, hashed and ordered by
    (path, link, kind) only (a frozen class without dataclasses: cold start of ``roots``)."""

    __slots__ = ("path", "link", "kind", "uid", "first_missed", "expires")
    _fields = __slots__
    path: StorePath
    link: str  # the file that makes it a root, "{temp:<pid>}", "/proc/<pid>/…", a user's root name
    kind: str  # direct | indirect | indirect-unresolved | profile | temp | runtime | registered | lease
    uid: int | None  # registered, lease: whose
    first_missed: float | None  # indirect-unresolved
    expires: float | None  # lease; indirect-unresolved

    def __init__(self, path: StorePath, link: str, kind: str, uid: int | None = None,
                 first_missed: float | None = None, expires: float | None = None) -> None:
        self._init(path=path, link=link, kind=kind, uid=uid, first_missed=first_missed, expires=expires)

    def _key(self) -> tuple[StorePath, str, str]:
        return (self.path, self.link, self.kind)

    def __lt__(self, other: Root) -> bool:
        return self._key() < other._key()


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
        for scan in self.runtime_scans(1):
            yield from scan()

    def runtime_scans(self, n: int) -> list[Callable[[], list[Root]]]:
        """:meth:`runtime_roots` cut in ``n`` parts over one listing of the processes, to
        be run at once: reading ``/proc`` of a process in the middle of an exec (or of
        mapping memory) waits until it is done, and on a busy machine that is most of a
        scan's time; in parts, one slow process holds up only its own part."""
        if self.runtime_mode == "client":
            return []
        pids = list_pids()
        return [functools.partial(self._runtime, pids[k::n], k == 0) for k in range(n)]

    def _runtime(self, pids: list[str], kernel: bool) -> list[Root]:
        prefixes = {self.store_dir.path, self.real_store_dir}
        found = list(scan_proc(prefixes, pids=pids))
        for kf in ("/proc/sys/kernel/modprobe", "/proc/sys/kernel/fbsplash",
                   "/proc/sys/kernel/poweroff_cmd") if kernel else ():
            try:
                with open(kf) as f:
                    found.append((f.read().strip(), kf))
            except OSError:
                pass
        roots = []
        for target, link in found:
            sp = self._to_store_path(target)
            if sp is not None:
                roots.append(Root(sp, link, "runtime"))
        return roots

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
