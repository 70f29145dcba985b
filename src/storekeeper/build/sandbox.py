"""The build sandbox (``sandbox = true | relaxed``), the daemon's side.

When a build is sandboxed (:func:`wanted`): ``sandbox = true`` sandboxes every
build (a derivation with ``__noChroot`` is an error), ``relaxed`` every build
but fixed-output ones and those with ``__noChroot``, ``false`` none -- except
on a store whose store dir is not real on this machine (a chroot store, the
embedded default store), which always builds sandboxed: the bind mounts are
what make its logical store dir exist.  When the kernel refuses the
namespaces, ``sandbox-fallback = true`` builds unsandboxed with one warning
(never for such a store).

Invariants of a sandbox (:class:`Sandbox`; the layout is Nix's, see
``../shared/spec/sandbox.md`` §3):

* **Its dir is ``<real store dir>/<drv base>.chroot``** (0700), made fresh
  for one build by :func:`prepare` and deleted by :meth:`Sandbox.remove`,
  holding four empty dirs: ``root`` (where the launcher mounts the chroot, a
  tmpfs it fills with ``/etc``, ``/dev``, ``/tmp`` and mount points),
  ``lower`` (a tmpfs with one mount point per input), ``upper`` and ``work``
  (the overlay mounted at the logical store dir inside: ``upper`` is where
  the outputs land, in the store's file system, so they are *renamed* into
  the real store, :meth:`Sandbox.move_outputs`).  Only those few entries
  touch the disk: thousands of mount points there cost seconds on some file
  systems.  The ``.drv`` is pinned, so the GC leaves the dir alone.
* **Inside, the logical store dir holds exactly the input closure** (plus the
  closure of store paths named in ``sandbox-paths``), each bound read-only,
  and whatever the builder makes there.  The host's other files exist only as
  the ``sandbox-paths`` binds, the ``/dev`` nodes (``full null random tty
  urandom zero``), and, for fixed-output builds, ``/etc/resolv.conf``,
  ``/etc/services`` and ``/etc/hosts``.
* **The mounts never exist on the host**: they are made by the launcher in
  the build's own mount namespace after making every mount private, so the
  host only ever sees the four empty dirs, and deleting them cannot reach
  into an input.  (Unlike Nix, ``/tmp`` is in the chroot's tmpfs, not on
  disk: a real store dir may lie below ``/tmp``.)
* **The builder runs as uid 1000 / gid 100 of a user namespace** that maps
  those to the build user (root daemon with ``build-users-group``) or to the
  daemon's own ids, and nothing else; it is PID 1 of its pid namespace, so
  nothing it starts outlives it.  The launcher (:mod:`.launcher`) says how.
"""

from __future__ import annotations

import functools
import marshal
import os
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Iterable

from .. import fs
from ..formats.derivation import Derivation, DerivationType, derivation_type
from ..formats.storepath import StorePath
from ..fs.crash import crash_point
from .confine import python_for_builders
from .results import BuildStatus, Failure
from .users import BuildUser

INSIDE_UID, INSIDE_GID = 1000, 100
DEV_NODES = ("full", "null", "random", "tty", "urandom", "zero")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))
NETWORK_FILES = ("/etc/resolv.conf", "/etc/services", "/etc/hosts")
BUILD_DIR_VARS = ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD")

_PROBE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x20000 | 0x20000000 | 0x8000000 | 0x4000000 | 0x40000000):
    sys.stdout.write(os.strerror(ctypes.get_errno()))
"""


@functools.lru_cache(maxsize=None)
def unavailable() -> str | None:
    """Why this machine cannot sandbox builds for this process's user (None: it can).
    Asked once per process, of a fresh interpreter (``unshare`` as the launcher does it)."""
    if os.uname().sysname != "Linux" or os.uname().machine not in ("x86_64", "aarch64"):
        return f"no sandbox for {os.uname().sysname} on {os.uname().machine}"
    try:
        out = subprocess.run([python_for_builders(), "-I", "-S", "-c", _PROBE],
                             capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run the sandbox probe: {e}"
    if out.returncode != 0 or out.stdout:
        why = out.stdout.decode(errors="replace").strip() or f"exit status {out.returncode}"
        return f"the kernel refuses user, mount, pid and network namespaces here ({why})"
    return None


def diverted(store) -> bool:
    """Whether ``store``'s logical store dir is not where its files are (chroot store)."""
    return store.store_dir.path != os.path.normpath(store.real_store_dir)


_warned: set[str] = set()


def wanted(store, settings, drv: Derivation, printed: str, warn) -> bool:
    """Whether this build is sandboxed (module docstring); raises
    :class:`~.results.Failure` when it must be and cannot, or may not be at all.
    ``warn(line)`` gets the fallback warning, once per process."""
    no_chroot = drv.env.get("__noChroot") == "1"
    fixed = derivation_type(drv) is DerivationType.CA_FIXED
    mode = settings.sandbox
    forced = diverted(store)
    if mode == "true" and no_chroot:
        raise Failure(BuildStatus.MISC_FAILURE, f"derivation '{printed}' has '__noChroot' set, "
                      "but that's not allowed when 'sandbox' is 'true'")
    if forced:
        want = True
    elif mode == "relaxed":
        want = not (fixed or no_chroot)
    else:
        want = mode == "true"
    if not want:
        return False
    why = unavailable()
    if why is None:
        return True
    if forced:
        raise Failure(BuildStatus.MISC_FAILURE, f"cannot build '{printed}': this store keeps "
                      f"'{store.store_dir.path}' in '{store.real_store_dir}', which needs the "
                      f"build sandbox, but {why}")
    if not settings.sandbox_fallback:
        raise Failure(BuildStatus.MISC_FAILURE, f"cannot build '{printed}' in a sandbox: {why} "
                      "(set 'sandbox = false', or 'sandbox-fallback = true')")
    if why not in _warned:
        _warned.add(why)
        warn(f"warning: building without the sandbox: {why}")
    return False


@dataclass
class Sandbox:
    """One build's chroot and what the launcher is to do with it (module docstring)."""

    top: str                  #: ``<drv>.chroot``: root/, and the store dir's layers
    root: str                 #: the chroot dir on the host (``top/root``)
    store_dir: str            #: the logical store dir (inside)
    build_dir: str            #: the build dir inside (``sandbox-build-dir``)
    private_net: bool
    shm_size: str
    host_uid: int             #: who the builder is on the host (build user or the daemon)
    host_gid: int
    binds: list[tuple[str, str, bool, bool]] = field(default_factory=list)
    #: the lower layer of the store dir: (name, "d" | "f" | "l", symlink target)
    entries: list[tuple[str, str, str]] = field(default_factory=list)
    #: the chroot's tmpfs: (path, "d" | "f" | "w" | "l", content or target) (:class:`_Skeleton`)
    skeleton: list[tuple[str, str, str]] = field(default_factory=list)

    def inside_env(self, env: dict[str, str], host_build_dir: str) -> dict[str, str]:
        """``env`` with the build dir as the builder sees it (Nix's sandbox values): the
        build dir variables, and every value naming a file in it (``passAsFile``,
        structured attributes' ``NIX_ATTRS_*_FILE``)."""
        out = dict(env)
        host = host_build_dir.rstrip("/")
        for k, v in env.items():
            if v == host or v.startswith(host + "/"):
                out[k] = self.build_dir + v[len(host):]
        for var in BUILD_DIR_VARS:
            out[var] = self.build_dir
        return out

    def spec_fd(self, builder: str, argv: list[str], env: dict[str, str],
                flt: bytes | None) -> int:
        """A memfd holding what the launcher needs to run ``builder`` in this sandbox
        (the caller closes it)."""
        enc = os.fsencode
        spec = {
            "root": enc(self.root), "cwd": enc(self.build_dir),
            "binds": [(enc(s), enc(t), ro, rec) for s, t, ro, rec in self.binds],
            "private_net": self.private_net, "shm_size": self.shm_size.encode(),
            "devpts": True, "uid": INSIDE_UID, "gid": INSIDE_GID, "filter": flt or b"",
            "host_uid": self.host_uid, "host_gid": self.host_gid,
            "store": enc(self.store_dir), "layers": enc(self.top),
            "entries": [(enc(n), k.encode(), enc(t)) for n, k, t in self.entries],
            "skeleton": [(enc(n), k.encode(), enc(t)) for n, k, t in self.skeleton],
            "path": enc(builder), "argv": [enc(a) for a in argv],
            "env": {enc(k): enc(v) for k, v in env.items()},
        }
        fd = os.memfd_create("storekeeper-sandbox", os.MFD_CLOEXEC)
        try:
            view = memoryview(marshal.dumps(spec))
            while view:
                view = view[os.write(fd, view):]
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def move_outputs(self, store, paths: Iterable[StorePath]) -> None:
        """Rename what the builder made at ``paths`` into the real store (once it is dead),
        relative to fds of ``upper`` and of the store dir."""
        ufd = fs.open_dir(os.path.join(self.top, "upper"))
        try:
            sfd = fs.open_dir(store.real_store_dir)
            try:
                for p in paths:
                    try:
                        os.stat(p.base, dir_fd=ufd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # (not made: the output checks say so)
                    fs.remove_tree(p.base, sfd)
                    os.rename(p.base, p.base, src_dir_fd=ufd, dst_dir_fd=sfd)
                    crash_point("build.output")
            finally:
                os.close(sfd)
        finally:
            os.close(ufd)

    def remove(self) -> None:
        fs.remove_tree(self.top)


def parse_sandbox_paths(entries: Iterable[str]) -> list[tuple[str, str, bool]]:
    """``sandbox-paths`` as (target, source, optional)."""
    out = []
    for e in entries:
        optional = e.endswith("?")
        if optional:
            e = e[:-1]
        target, sep, source = e.partition("=")
        out.append((target, source if sep else target, optional))
    return out


def prepare(store, drv_path: StorePath, host_build_dir: str, user: BuildUser | None,
            closure: Iterable[StorePath], settings, fixed: bool, builtin: bool = False) -> Sandbox:
    """Make the chroot dir of a build of ``drv_path`` and say what goes where (module
    docstring).  ``closure`` is the input closure; ``fixed``: a fixed-output build;
    ``builtin``: a builtin builder, which is our own Python (:func:`builtin_paths`)."""
    sd, real_sd = store.store_dir, store.real_store_dir
    store.pin(drv_path)  # (the GC leaves the .chroot entry of a pinned hash alone)
    top = os.path.join(real_sd, drv_path.base + ".chroot")
    fs.remove_tree(top)
    os.mkdir(top, 0o700)
    for d in ("root", "upper", "work", "lower"):
        os.mkdir(os.path.join(top, d), 0o700)
    host = (user.uid, user.gid) if user is not None else (os.geteuid(), os.getegid())
    sb = Sandbox(top, os.path.join(top, "root"), sd.path, settings.sandbox_build_dir, private_net=not fixed,
                 shm_size=settings.sandbox_dev_shm_size, host_uid=host[0], host_gid=host[1])
    try:
        _layout(sb, store, host_build_dir, user, set(closure), settings, fixed,
                builtin_paths() if builtin else [])
    except BaseException:
        sb.remove()
        raise
    return sb


def builtin_paths() -> list[str]:
    """What a builtin builder (``python -I -m storekeeper.build.builtins``) needs of the
    host, bound read-only at the same paths: the interpreter and its libraries, this
    environment (venv) and the directory storekeeper is imported from.  Our code,
    not the derivation's: like Nix's builtins, which run inside its sandbox."""
    out = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc/ssl") if os.path.exists(p)]
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for p in (sys.prefix, package_root):
        p = os.path.realpath(p)
        if not any(p == q or p.startswith(q + "/") for q in out):
            out.append(p)
    return out


class _Skeleton:
    """What the launcher creates in the chroot's tmpfs: ``(path, kind, data)`` with kind
    ``d`` (directory), ``f`` (empty file: a mount point), ``w`` (file with ``data``) or
    ``l`` (symlink to ``data``); parents come before their children."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str]] = []
        self.dirs: set[str] = set()
        self.files: set[str] = set()

    def dir(self, path: str) -> None:
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self.entries.append((d, "d", ""))

    def add(self, path: str, kind: str, data: str = "") -> None:
        path = path.strip("/")
        if kind == "d":
            self.dir(path)
            return
        self.dir(os.path.dirname(path))
        if path not in self.dirs and path not in self.files:
            self.files.add(path)
            self.entries.append((path, kind, data))


def _layout(sb: Sandbox, store, host_build_dir: str, user: BuildUser | None,
            closure: set[StorePath], settings, fixed: bool, host_paths: list[str]) -> None:
    sd = store.store_dir
    gid = user.gid if user is not None else os.getegid()
    sk = _Skeleton()
    for d in ("etc", "proc", "dev/shm", "dev/pts"):
        sk.add(d, "d")
    sk.add("tmp", "d")  # (01777, in the tmpfs: Nix's is on disk; the store dir may be below)
    if sb.build_dir.startswith(sd.path + "/") or not sb.build_dir.startswith("/"):
        raise Failure(BuildStatus.MISC_FAILURE, f"'sandbox-build-dir' ({sb.build_dir}) must be "
                      "an absolute path outside the store dir")
    sb.binds.append((host_build_dir, sb.build_dir, False, False))
    sk.add(sb.build_dir, "d")
    home = sb.build_dir
    sk.add("etc/passwd", "w", f"root:x:0:0:Nix build user:{home}:/noshell\n"
           f"nixbld:x:{INSIDE_UID}:{INSIDE_GID}:Nix build user:{home}:/noshell\n"
           "nobody:x:65534:65534:Nobody:/:/noshell\n")
    sk.add("etc/group", "w", f"root:x:0:\nnixbld:!:{INSIDE_GID}:\nnogroup:x:65534:\n")
    if fixed:
        sk.add("etc/nsswitch.conf", "w", "hosts: files dns\nservices: files\n")
        for f in NETWORK_FILES:
            real = os.path.realpath(f)
            if os.path.isfile(real):
                sk.add(f, "f")
                sb.binds.append((real, f, True, False))
    else:
        sk.add("etc/hosts", "w", "127.0.0.1 localhost\n::1 localhost\n")
    extra = parse_sandbox_paths(settings.sandbox_paths) + [(p, p, True) for p in host_paths]
    if not any(t == "/dev" for t, _, _ in extra):
        for n in DEV_NODES:
            if os.path.exists("/dev/" + n):
                sk.add("dev/" + n, "f")
                sb.binds.append(("/dev/" + n, "/dev/" + n, False, False))
        for name, target in DEV_LINKS:
            sk.add("dev/" + name, "l", target)
    for target, source, optional in extra:
        if source == "/proc" or target == "/proc":
            continue  # (a fresh procfs is mounted anyway)
        if not os.path.exists(source):
            if optional:
                continue
            raise Failure(BuildStatus.MISC_FAILURE, f"path '{source}' in 'sandbox-paths' "
                          "does not exist")
        if ".." in target.split("/") or not target.startswith("/"):
            raise Failure(BuildStatus.MISC_FAILURE, f"bad target '{target}' in 'sandbox-paths'")
        if source.startswith(sd.path + "/"):
            p = sd.parse(sd.path + "/" + source[len(sd.path) + 1:].split("/")[0], lax=True)
            closure |= store.query_closure({p})
            if target == source:
                continue  # (bound with the closure)
            source = store.real_store_dir + source[len(sd.path):]
        sk.add(target, "d" if os.path.isdir(source) else "f")
        sb.binds.append((source, target, True, True))
    sk.add(sd.path, "d")
    sb.skeleton = sk.entries
    # The store dir inside: an overlay of a tmpfs with the inputs' mount points
    # (made by the launcher: thousands of entries on disk would cost more than
    # the mounts) and ``upper``, on the store's file system, where the builder's
    # outputs land (module docstring).
    tfd = fs.open_dir(sb.top)  # (ours, 0700, made by prepare: these are its fresh dirs)
    try:
        ufd = fs.open_dir("upper", tfd)
        try:
            if user is not None:
                os.fchown(ufd, 0, gid)
                os.fchmod(ufd, 0o1775)
                os.chown("work", user.uid, gid, dir_fd=tfd, follow_symlinks=False)  # (overlayfs')
            else:
                os.fchmod(ufd, 0o755)
        finally:
            os.close(ufd)
    finally:
        os.close(tfd)
    # (valid inputs: the store's own, immutable while pinned; one lstat each, by name in
    # the store dir)
    sfd = fs.open_dir(store.real_store_dir)
    try:
        for p in sorted(closure, key=lambda p: p.base):
            st = os.stat(p.base, dir_fd=sfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                sb.entries.append((p.base, "l", os.readlink(p.base, dir_fd=sfd)))
                continue
            sb.entries.append((p.base, "d" if stat.S_ISDIR(st.st_mode) else "f", ""))
            sb.binds.append((store.real_path(p), os.path.join(sd.path, p.base), True, False))
    finally:
        os.close(sfd)
