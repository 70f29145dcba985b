"""A user's own GC roots, kept by the user and told to the daemon (seed 000).

Files, all the user's own (the daemon never reads them):

* ``$XDG_STATE_HOME/storekeeper/roots/`` (default ``~/.local/state/…``, mode
  0700): one symlink per root, either *direct* (to a store path) or
  *indirect* (to the absolute path of a symlink elsewhere, e.g. a build's
  ``result``, that points to a store path; named ``nix32(sha1(link))`` as in
  ``gcroots/auto``).  ``storekeeper add-root LINK PATH`` makes both.
* ``$XDG_STATE_HOME/storekeeper/registered.json``: ``{"version": 1,
  "daemons": {store url: {name: store path}}}``, the roots this user's
  clients registered with each daemon; ``name`` is ``<host>:<link>`` (the
  link whose presence makes the root), so hosts sharing a home keep their
  own.  Changed under ``registered.lock`` (flock) and written atomically,
  always *before* the daemon is told: an entry the daemon lacks is harmless,
  a registration the file lacks would never be dropped.

Reading a link: the roots dir is opened ``O_NOFOLLOW`` and must be the
user's and not writable by others; each entry (and an indirect entry's
target) is opened ``O_PATH | O_NOFOLLOW``, its owner and target read from
that one inode.  An entry is

* ``ok``: the user's, leading into the store;
* ``broken``: dangling (its target link is gone, or the store path it names
  is gone from a store dir visible here): removed by step 1;
* ``refused``: leads outside the store, or is not the user's: never
  registered, never removed, reported;
* ``unknown``: cannot be read now (an unreadable or unmounted directory): its
  registration is left as it is.

A root is registered only if its link, read again after the daemon recorded
it, is the same inode with the same target; otherwise (swapped between check
and use) the registration is withdrawn and the root refused for this run.

The flow (:func:`sync_roots`, run by ``storekeeper gc`` before collecting):

1. remove broken links in the roots dir;
2. find runtime roots as this user (own processes' exe, cwd, fds, maps,
   environ: :func:`~storekeeper.fs.proc.scan_proc`; works under
   ``hidepid=2``);
3. register the roots present (again: the daemon may have lost its state;
   it is idempotent); unregister registered roots that
   are gone, except those whose path is a runtime root now; report the
   runtime roots, which the daemon holds for its ``runtime-root-lease``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

from ..errors import InvalidPath, StoreError
from ..formats.gcroots import indirect_root_name
from ..formats.storepath import StoreDir, StorePath, StorePathError
from ..fs.atomic import open_private_dir, symlink_atomic, write_file_atomic
from ..fs.proc import scan_proc

STEPS = ("clean", "runtime", "sync")
OK, BROKEN, REFUSED, UNKNOWN = "ok", "broken", "refused", "unknown"


class RootRefused(StoreError):
    """A root that may not be registered (outside the store, not the user's, changed)."""


@dataclass(frozen=True)
class ClientPaths:
    """Where a user's client keeps its roots and its record of registrations."""

    base: str  # $XDG_STATE_HOME/storekeeper

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ClientPaths":
        env = os.environ if env is None else env
        state = env.get("XDG_STATE_HOME") or os.path.join(
            env.get("HOME") or os.path.expanduser("~"), ".local", "state")
        return cls(os.path.join(state, "storekeeper"))

    @property
    def roots_dir(self) -> str:
        return os.path.join(self.base, "roots")

    @property
    def state_file(self) -> str:
        return os.path.join(self.base, "registered.json")


@dataclass
class Entry:
    """One entry of the roots dir (see the module docstring for ``state``)."""

    file: str  # its name in the roots dir
    state: str
    link: str = ""  # the link whose presence makes the root (the entry, or its target)
    path: str | None = None  # the store path it holds (printed)
    why: str = ""
    ident: tuple = ()  # what must not change between check and use


@dataclass
class SyncReport:
    removed: list[str] = field(default_factory=list)  # broken links removed (step 1)
    refused: list[str] = field(default_factory=list)  # messages
    runtime: set[str] = field(default_factory=set)  # runtime roots found (step 2)
    registered: list[str] = field(default_factory=list)
    unregistered: list[str] = field(default_factory=list)
    kept_for_runtime: list[str] = field(default_factory=list)  # gone, but in use
    lease: int = 0
    held: int = 0

    def lines(self) -> list[str]:
        out = [f"removed broken root link '{p}'" for p in self.removed] + list(self.refused)
        if self.registered:
            out.append(f"registered {len(self.registered)} root(s)")
        if self.unregistered:
            out.append(f"unregistered {len(self.unregistered)} root(s) that are gone")
        if self.kept_for_runtime:
            out.append(f"kept {len(self.kept_for_runtime)} gone root(s) registered: in use by "
                       "a running process")
        if self.runtime:
            out.append(f"{self.held} runtime root(s) held "
                       + (f"for {self.lease} s" if self.lease else "while connected (the daemon "
                          "scans /proc itself)"))
        return out


def host_name() -> str:
    return socket.gethostname() or "localhost"


def store_url(store) -> str:
    return getattr(store, "url", None) or f"local:{store.state_dir}"


# --- the roots dir -------------------------------------------------------------------------

def open_roots_dir(paths: ClientPaths, create: bool = False) -> int | None:
    """An fd of the user's roots dir (None if there is none); refuses one that is not
    the user's own or that others may write to."""
    if create:
        os.makedirs(paths.base, mode=0o700, exist_ok=True)
    try:
        fd, bad = open_private_dir(paths.roots_dir, create, os.getuid(), 0o022)
    except OSError as e:
        raise StoreError(f"cannot open the roots dir '{paths.roots_dir}': {e.strerror}") from None
    if bad is not None:
        raise StoreError(f"the roots dir '{paths.roots_dir}' is not yours alone (owner uid "
                         f"{bad.st_uid}, mode {stat.S_IMODE(bad.st_mode):o}): refusing to use it")
    return fd


def _open_link(name: str, dir_fd: int | None) -> tuple[int, os.stat_result, str]:
    """(fd, stat, target) of a symlink, from one inode; OSError(EINVAL) if not a symlink."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISLNK(st.st_mode):
            raise OSError(errno.EINVAL, "not a symlink", name)
        return fd, st, os.readlink("", dir_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def _in_store(store_dir: StoreDir, target: str) -> str | None:
    """The printed store path ``target`` lies in, if it is in the store."""
    if not target.startswith(store_dir.path + "/"):
        return None
    try:
        sp = StorePath.from_base(target[len(store_dir.path) + 1:].split("/", 1)[0], lax=True)
    except StorePathError:
        return None
    return store_dir.print(sp)


def _gone_from_store(store_dir: StoreDir, path: str) -> bool:
    """True only when the store dir is visible here and ``path`` is not in it."""
    if not os.path.isdir(store_dir.path):
        return False
    return not os.path.lexists(path)


def read_entry(dir_fd: int, roots_dir: str, file: str, store_dir: StoreDir) -> Entry:
    uid = os.getuid()
    own = os.path.join(roots_dir, file)
    try:
        fd, st, target = _open_link(file, dir_fd)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return Entry(file, REFUSED, own, why=f"ignoring '{own}': not a symlink")
        return Entry(file, UNKNOWN, own, why=f"cannot read '{own}': {e.strerror}")
    os.close(fd)
    if st.st_uid != uid:
        return Entry(file, REFUSED, own, why=f"ignoring root '{own}': it is not yours")
    ident = ((st.st_dev, st.st_ino, target),)
    if not target.startswith("/"):
        target = os.path.normpath(os.path.join(roots_dir, target))
    path = _in_store(store_dir, target)
    if path is not None:
        if _gone_from_store(store_dir, path):
            return Entry(file, BROKEN, own, path, why=f"'{own}' points to '{path}', which is gone")
        return Entry(file, OK, own, path, ident=ident)
    # indirect: the target must be a symlink of the user's into the store
    parent = os.path.dirname(target)
    try:
        tfd, tst, ttarget = _open_link(target, None)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and os.access(parent, os.R_OK | os.X_OK):
            return Entry(file, BROKEN, target, why=f"'{target}' is gone")
        if e.errno == errno.EINVAL:
            return Entry(file, REFUSED, target,
                         why=f"ignoring root '{own}': '{target}' is not a symlink into the store")
        return Entry(file, UNKNOWN, target, why=f"cannot read root '{target}': {e.strerror}")
    os.close(tfd)
    if tst.st_uid != uid:
        return Entry(file, REFUSED, target, why=f"ignoring root '{own}': '{target}' is not yours")
    path = _in_store(store_dir, ttarget if ttarget.startswith("/") else
                     os.path.normpath(os.path.join(parent, ttarget)))
    if path is None:
        return Entry(file, REFUSED, target, why=f"ignoring root '{own}': it points outside the store")
    if _gone_from_store(store_dir, path):
        return Entry(file, BROKEN, target, path, why=f"'{target}' points to '{path}', which is gone")
    return Entry(file, OK, target, path, ident=ident + ((tst.st_dev, tst.st_ino, ttarget),))


def read_entries(paths: ClientPaths, store_dir: StoreDir, dir_fd: int) -> list[Entry]:
    return [read_entry(dir_fd, paths.roots_dir, f, store_dir) for f in sorted(os.listdir(dir_fd))
            if not f.startswith(".")]


def unchanged(entry: Entry, dir_fd: int, roots_dir: str, store_dir: StoreDir) -> bool:
    """Whether the entry still reads as it did when it was checked."""
    again = read_entry(dir_fd, roots_dir, entry.file, store_dir)
    return again.state == OK and again.path == entry.path and again.ident == entry.ident


def _remove_if_same(dir_fd: int, file: str) -> bool:
    """Unlink a broken entry unless it was replaced meanwhile."""
    try:
        fd, st, target = _open_link(file, dir_fd)
    except OSError:
        return False
    os.close(fd)
    try:
        now = os.stat(file, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(file, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


# --- the record of registrations -------------------------------------------------------------

@contextmanager
def registered_record(paths: ClientPaths) -> Iterator[dict]:
    """The whole record, locked; written back (atomically) if changed."""
    os.makedirs(paths.base, mode=0o700, exist_ok=True)
    lock = os.open(paths.state_file + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(paths.state_file, "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            data = {}
        except ValueError:
            raise StoreError(f"'{paths.state_file}' does not parse: move it away (the daemon keeps "
                             "its registrations; 'storekeeper roots' lists them)") from None
        if not isinstance(data.get("daemons"), dict):
            data = {"version": 1, "daemons": {}}
        before = json.dumps(data, sort_keys=True)
        yield data
        data["daemons"] = {u: r for u, r in data["daemons"].items() if r}
        after = json.dumps(data, sort_keys=True)
        if after != before:
            write_file_atomic(paths.state_file, after.encode(), mode=0o600)
    finally:
        os.close(lock)


def _mine(data: dict, url: str) -> dict[str, str]:
    return data["daemons"].setdefault(url, {})


def _known(paths: ClientPaths, url: str) -> dict[str, str]:
    """What the record says is registered with ``url`` (nothing is created to find out)."""
    if not os.path.exists(paths.state_file):
        return {}
    with registered_record(paths) as data:
        return dict(data["daemons"].get(url) or {})


# --- runtime roots (step 2) ----------------------------------------------------------------

def runtime_roots(store_dir: StoreDir, uid: int | None = None) -> set[str]:
    """Store paths this user's processes use now (printed)."""
    uid = os.getuid() if uid is None else uid
    out = set()
    for target, _where in scan_proc({store_dir.path}, uid=uid):
        p = _in_store(store_dir, target)
        if p is not None:
            out.add(p)
    return out


# --- the flow ------------------------------------------------------------------------------

Hook = Callable[[list[Entry]], None]


def sync_roots(store, api, paths: ClientPaths | None = None, *, skip: Iterable[str] = (),
               after_check: Hook | None = None) -> SyncReport:
    """Steps 1–3 of the module docstring; ``skip`` names steps to leave out (tests show
    what each one is for); ``after_check`` runs between reading the links and registering."""
    skip = set(skip)
    unknown = skip - set(STEPS)
    if unknown:
        raise ValueError(f"unknown step(s) {sorted(unknown)}: the steps are {', '.join(STEPS)}")
    paths = paths or ClientPaths.from_env()
    sd = store.store_dir
    host, url = host_name(), store_url(store)
    report = SyncReport()
    dir_fd = open_roots_dir(paths)
    try:
        entries = read_entries(paths, sd, dir_fd) if dir_fd is not None else []
        # 1. broken links
        if "clean" not in skip:
            for e in entries:
                # (entries are only read, and so only broken, when the roots dir opened)
                if e.state == BROKEN and dir_fd is not None and _remove_if_same(dir_fd, e.file):
                    report.removed.append(os.path.join(paths.roots_dir, e.file))
            entries = [e for e in entries if e.state != BROKEN]
        report.refused = [e.why for e in entries if e.state in (REFUSED, UNKNOWN)]
        # 2. runtime roots
        if "runtime" not in skip:
            report.runtime = runtime_roots(sd)
        # 3. tell the daemon
        if "sync" not in skip:
            present = {f"{host}:{e.link}": e for e in entries if e.state == OK}
            unknown_names = {f"{host}:{e.link}" for e in entries if e.state == UNKNOWN}
            known = _known(paths, url)
            # All present roots, not only new ones: the daemon may have lost its state.
            new = dict(present)
            gone = [n for n in known if n.startswith(host + ":") and n not in present
                    and n not in unknown_names]
            report.kept_for_runtime = [n for n in gone if known[n] in report.runtime]
            drop = [n for n in gone if known[n] not in report.runtime]
            if after_check is not None:
                after_check(list(new.values()))
            if new:
                assert dir_fd is not None  # present entries were read from it
                _register(store, api, paths, url, new, dir_fd, report)
                report.registered = [n for n in report.registered if known.get(n) != new[n].path]
            if drop:
                api.unregister(drop)
                with registered_record(paths) as data:
                    for n in drop:
                        _mine(data, url).pop(n, None)
                report.unregistered = drop
        if "runtime" not in skip and "sync" not in skip:
            report.lease, report.held = api.report_runtime(host, report.runtime)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return report


def _register(store, api, paths: ClientPaths, url: str, new: dict[str, Entry], dir_fd: int,
              report: SyncReport) -> None:
    with registered_record(paths) as data:  # first the record (see the module docstring)
        # (OK entries, the only ones in ``new``, always hold a path)
        _mine(data, url).update({n: e.path for n, e in new.items() if e.path is not None})
    refused = set(api.register([(n, store.store_dir.parse(e.path, lax=True)) for n, e in new.items()]))
    changed = [n for n, e in new.items()
               if n not in refused and not unchanged(e, dir_fd, paths.roots_dir, store.store_dir)]
    if changed:
        api.unregister(changed)
    with registered_record(paths) as data:
        for n in refused | set(changed):
            _mine(data, url).pop(n, None)
    for n in sorted(refused):
        report.refused.append(f"not registering '{new[n].link}': '{new[n].path}' is not valid")
    for n in changed:
        report.refused.append(f"refusing root '{new[n].link}': it changed while it was being "
                              "registered")
    report.registered += [n for n in new if n not in refused and n not in changed]


# --- add-root and remove-root ----------------------------------------------------------------

def add_root(store, api, link: str, sp: StorePath, paths: ClientPaths | None = None,
             after_check: Hook | None = None) -> str:
    """Make ``link`` point to ``sp`` and register it (an indirect entry in the roots dir
    names it, when it lies elsewhere); returns the link's absolute path."""
    paths = paths or ClientPaths.from_env()
    link = os.path.abspath(link)
    target = store.print_path(sp)
    api.unregister([])  # nothing, but a daemon that cannot register says so before we link
    if not store.pin_valid(sp):  # pinned by our connection until registered
        raise InvalidPath(f"path '{target}' is not valid")
    try:
        if not stat.S_ISLNK(os.lstat(link).st_mode):
            raise StoreError(f"'{link}' exists and is not a symlink: not replacing it")
    except FileNotFoundError:
        pass
    dir_fd = open_roots_dir(paths, create=True)
    assert dir_fd is not None
    try:
        symlink_atomic(target, link)
        if os.path.dirname(link) == paths.roots_dir:
            file = os.path.basename(link)
        else:
            file = indirect_root_name(link)
            symlink_atomic(link, os.path.join(paths.roots_dir, file))
        entry = read_entry(dir_fd, paths.roots_dir, file, store.store_dir)
        if entry.state != OK or entry.path != target:
            raise RootRefused(entry.why or f"refusing root '{link}': it changed while it was made")
        if after_check is not None:
            after_check([entry])
        report = SyncReport()
        _register(store, api, paths, store_url(store), {f"{host_name()}:{link}": entry}, dir_fd, report)
        if not report.registered:
            raise RootRefused(report.refused[0] if report.refused else f"root '{link}' was refused")
    finally:
        os.close(dir_fd)
    return link


def remove_root(store, api, link: str, paths: ClientPaths | None = None) -> list[str]:
    """Unregister ``link`` (a root registered by this user, or an indirect root this user
    added through a Nix client) and remove it and its roots-dir entry if they are links
    we can reach.  Works when the link can no longer be read (an unmounted home)."""
    paths = paths or ClientPaths.from_env()
    link = os.path.abspath(link)
    name = f"{host_name()}:{link}"
    removed = api.unregister([name, link])
    if name in _known(paths, store_url(store)):
        with registered_record(paths) as data:
            _mine(data, store_url(store)).pop(name, None)
    for p in (os.path.join(paths.roots_dir, indirect_root_name(link)), link):
        try:
            if stat.S_ISLNK(os.lstat(p).st_mode):
                os.unlink(p)
        except OSError:
            pass
    return removed
