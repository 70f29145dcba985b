"""What a build without the sandbox (``sandbox = false``) can and cannot do.

This is the one place that states it.  storekeeper has no build sandbox yet:
a builder runs on the host, in the daemon's mount, network, PID and IPC
namespaces, as a build user from ``build-users-group`` (a root daemon) or
as the daemon's own user (no build users, or an unprivileged daemon).

**What it cannot do** (enforced here and in :mod:`~storekeeper.build.process`):

* **Gain privileges.**  ``PR_SET_NO_NEW_PRIVS`` is set before the builder is
  exec'd: a setuid/setgid program or one with file capabilities runs with
  the builder's own ids (as in Nix 2.8, which sets it with its seccomp filter).
* **Make setuid/setgid files or set extended attributes.**  A seccomp filter
  (:func:`build_filter`, installed by :func:`confined_argv`'s trampoline)
  answers EPERM to ``chmod``, ``fchmod``, ``fchmodat``, ``fchmodat2`` whose
  mode has ``S_ISUID`` or ``S_ISGID``, and ENOTSUP to ``setxattr``,
  ``lsetxattr``, ``fsetxattr`` and ``setxattrat`` (file capabilities and
  ACLs are xattrs).  Nix 2.8 filters the ``chmod`` family and
  ``*setxattr`` the same way, but *not* ``fchmodat2`` (its number did not
  exist yet; Nix 2.22 added it) nor ``setxattrat`` (not even 2.35), and not
  the calls that create a file with a mode: ``open``/``openat``/``creat``
  with ``O_CREAT`` or ``O_TMPFILE`` and ``mknod``/``mknodat`` make a
  setuid file directly (measured: ``open(p, O_CREAT, 0o6755)`` as ``nobody``
  gives ``-rwsr-sr-x``).  We also answer EPERM to those when the mode has
  setuid/setgid, and ENOSYS to ``openat2`` (its mode is in a struct a filter
  cannot read) and to ``io_uring_setup/enter/register`` (io_uring opens
  files without passing through these syscalls; Lix blocks it too).
* **Bypass the filter through another ABI.**  On x86_64 the i386 ABI (an
  ``i686-linux`` builder) gets the same rules with its own numbers; x32 calls
  (bit 30 set in the number) are checked as the x86_64 calls they are.
  Any other audit architecture (ARM compat on aarch64, say) kills the
  process, as libseccomp does for Nix.
* **Leave files behind in shared places** (build users only).  Every process
  of the build user is killed after the build; then :func:`sweep` deletes
  everything the build user owns at the top level of the world-writable
  places it could write to (the store dir, the build dir's parent, ``/tmp``,
  ``/var/tmp``, ``/dev/shm``, ``/dev/mqueue``, ``/run/lock``), except the
  build's own outputs and build dir that ``keep-failed`` keeps; the same
  sweep runs before the next build as that user.  Nix 2.8 has no such sweep.
* **Outlive the build, or touch outputs while they are checked** (build
  users only): all processes of the uid are killed before and after
  (:mod:`~storekeeper.build.users`), and outputs are canonicalised
  (0444/0555, owner the daemon, xattrs removed) before they are registered.
* **Run as the daemon's own user for an untrusted client.**  Without build
  users (an unprivileged daemon, or a root daemon with ``build-users-group``
  empty) the builder would run with the daemon's uid and could rewrite the
  store's database, every user's roots and the TCP keys (or, as root,
  anything).  :func:`self_build_refusal` refuses such builds unless the
  client is trusted (``trusted-users``) or is the daemon's own user (who can
  change the store anyway); the local CLI on its own store may build.

**What it still can do** (the sandbox issue closes these):

* read everything its uid may read (other users' world-readable files,
  ``/proc`` of other processes as allowed by ``hidepid``), use the network,
  talk to other processes over abstract Unix sockets, SysV IPC and
  ``/dev/mqueue``, and see other builds' world-readable build dirs;
* leave files in world-writable places *below* the top level (a directory
  another user made world-writable), in SysV IPC objects, or hard links to
  its files elsewhere: the sweep only looks at top-level entries.  Such
  files can no longer be setuid/setgid or carry capabilities (the filter),
  so they are junk, not a way to act as the build user;
* get its outputs' hash parts from the scratch/real path rewriting (no
  purity guarantee; fixed outputs are checked by hash).

How the filter is installed.  When the process that starts the builder has a
single thread (``/proc/self/task``; a daemon connection's process has), the
same two ``prctl`` calls (:func:`preexec_confiner`) confine a spawner forked
once per build request, which starts every builder with a ``vfork``
(:mod:`.spawner`); if that helper cannot be had, they run as a
``preexec_fn`` in each forked child, after the switch to the build user,
right before the exec (a fork of the whole process instead of a vfork:
~2 ms per builder).  Otherwise Popen exec's a
tiny stdlib-only Python trampoline (``python3 -I -S -c``) as the builder's user, which reads the
filter, the builder's argv and its exact environment from an inherited
memfd, sets ``NO_NEW_PRIVS``, loads the filter with
``prctl(PR_SET_SECCOMP)``, sets every ignored signal back to its default (those
Python ignores, SIGPIPE and SIGXFSZ, and any the daemon inherited ignored, e.g.
SIGHUP under ``nohup``: exec keeps ignored signals) and exec's the builder.  Not ``preexec_fn``: the daemon
process may have threads (GC socket, optimiser), and Python documents
``preexec_fn`` as unsafe with threads (a child may deadlock before exec):
with threads, the trampoline.
The environment goes through the memfd because Python's locale coercion
adds ``LC_CTYPE=C.UTF-8`` to its own environment.  Cost: one interpreter
start plus ``import ctypes`` per build: median 17.8 vs 2.9 ms for a trivial build
without build users, 25.7 vs 9.8 ms with them (N=30, ``bench/confine_overhead.py``),
i.e. ~15 ms, which made a chain of small builds 3-4x slower than Nix's
(``bench/build.py``): hence the ``preexec_fn`` when it is safe.
``filter-syscalls = false`` turns NNP and the filter off (the sweep
stays: it is not about syscalls).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import marshal
import os
import re
import signal
import stat
import struct
import sys
from typing import Callable, Iterable

from .. import fs

# --- the BPF program ------------------------------------------------------------------

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_NR, _ARCH = 0, 4


def _arg_lo(i: int) -> int:
    return 16 + 8 * i  # low 32 bits of args[i] (little-endian hosts only)


AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# classic BPF opcodes
LD_W_ABS = 0x20
JEQ_K = 0x15
JSET_K = 0x45
JA = 0x05
RET_K = 0x06
AND_K = 0x54

SETID_BITS = stat.S_ISUID | stat.S_ISGID
CREATE_FLAGS = 0o100 | 0o20000000  # O_CREAT | __O_TMPFILE (same on x86 and generic)

# What each ABI's calls get: ("mode", i): EPERM if args[i] has setuid/setgid;
# ("create", f, m): EPERM if args[f] has O_CREAT/O_TMPFILE and args[m] setid bits;
# ("errno", E): always E.
_MODE_CALLS = {"chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2, "creat": 1,
               "mknod": 1, "mknodat": 2}
_CREATE_CALLS = {"open": (1, 2), "openat": (2, 3)}
_ENOTSUP_CALLS = ("setxattr", "lsetxattr", "fsetxattr", "setxattrat")
_ENOSYS_CALLS = ("openat2", "io_uring_setup", "io_uring_enter", "io_uring_register")

SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "creat": 85,
               "mknod": 133, "mknodat": 259, "open": 2, "openat": 257, "setxattr": 188,
               "lsetxattr": 189, "fsetxattr": 190, "setxattrat": 463, "openat2": 437,
               "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427},
    "i386": {"chmod": 15, "fchmod": 94, "fchmodat": 306, "fchmodat2": 452, "creat": 8,
             "mknod": 14, "mknodat": 297, "open": 5, "openat": 295, "setxattr": 226,
             "lsetxattr": 227, "fsetxattr": 228, "setxattrat": 463, "openat2": 437,
             "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427},
    # asm-generic numbering: no chmod/open/creat/mknod, only the *at calls
    "aarch64": {"fchmod": 52, "fchmodat": 53, "fchmodat2": 452, "mknodat": 33, "openat": 56,
                "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "setxattrat": 463,
                "openat2": 437, "io_uring_setup": 425, "io_uring_enter": 426,
                "io_uring_register": 427},
}

#: host machine -> [(audit arch, syscall table, mask applied to the number)]
_ABIS: dict[str, list[tuple[int, str, int | None]]] = {
    "x86_64": [(AUDIT_ARCH_X86_64, "x86_64", ~X32_SYSCALL_BIT & 0xFFFFFFFF),
               (AUDIT_ARCH_I386, "i386", None)],
    "aarch64": [(AUDIT_ARCH_AARCH64, "aarch64", None)],
}


class ConfineError(Exception):
    """The confinement cannot be set up here (the message says why and what to do)."""


def native_arch() -> str | None:
    """The host's architecture as :data:`SYSCALLS` names it, or None if unsupported."""
    m = os.uname().machine
    m = {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)
    return m if m in _ABIS and sys.byteorder == "little" else None


class _Asm:
    """A label assembler for classic BPF (jumps are forward and resolved at the end)."""

    def __init__(self) -> None:
        self.ins: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        assert name not in self.labels
        self.labels[name] = len(self.ins)

    def op(self, code: int, k: int = 0, jt: int | str = 0, jf: int | str = 0) -> None:
        self.ins.append((code, jt, jf, k & 0xFFFFFFFF))

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self.ins):
            def rel(target: int | str, pc: int = pc) -> int:
                if isinstance(target, int):
                    return target
                off = self.labels[target] - pc - 1
                if not 0 <= off <= 255:
                    raise ConfineError(f"BPF jump to {target} out of range ({off})")
                return off
            if code == JA:
                k, jt, jf = rel(jt), 0, 0  # (JA takes its offset in k)
            out += struct.pack("=HBBI", code, rel(jt), rel(jf), k)
        return bytes(out)


def build_filter(machine: str | None = None) -> bytes:
    """The seccomp program (``struct sock_filter[]``, native byte order) for ``machine``
    (default: this host).  Pure: the same input gives the same bytes."""
    machine = machine or native_arch()
    if machine not in _ABIS:
        raise ConfineError(f"no seccomp filter for architecture '{machine}'; "
                           "set 'filter-syscalls = false' to build without one")
    a = _Asm()
    abis = _ABIS[machine]
    a.op(LD_W_ABS, _ARCH)
    for arch, table, _ in abis:
        a.op(JEQ_K, arch, jt=f"abi_{table}", jf=0)
    a.op(RET_K, RET_KILL_PROCESS)
    for _arch, table, mask in abis:
        a.label(f"abi_{table}")
        a.op(LD_W_ABS, _NR)
        if mask is not None:
            a.op(AND_K, mask)
        # (label, the flags argument of a call that may create a file, the mode argument)
        blocks: list[tuple[str, int | None, int]] = []
        for name, nr in sorted(SYSCALLS[table].items(), key=lambda kv: kv[1]):
            if name in _MODE_CALLS:
                target = f"{table}_{name}"
                blocks.append((target, None, _MODE_CALLS[name]))
            elif name in _CREATE_CALLS:
                target = f"{table}_{name}"
                blocks.append((target, *_CREATE_CALLS[name]))
            elif name in _ENOTSUP_CALLS:
                target = "enotsup"
            elif name in _ENOSYS_CALLS:
                target = "enosys"
            else:  # pragma: no cover - a table entry without a rule
                raise AssertionError(name)
            a.op(JEQ_K, nr, jt=target, jf=0)
        a.op(RET_K, RET_ALLOW)
        for target, flags_arg, mode_arg in blocks:
            a.label(target)
            if flags_arg is not None:
                a.op(LD_W_ABS, _arg_lo(flags_arg))
                a.op(JSET_K, CREATE_FLAGS, jt=0, jf="allow")
            a.op(LD_W_ABS, _arg_lo(mode_arg))
            a.op(JSET_K, SETID_BITS, jt="eperm", jf="allow")
    a.label("allow")
    a.op(RET_K, RET_ALLOW)
    a.label("eperm")
    a.op(RET_K, RET_ERRNO | errno.EPERM)
    a.label("enotsup")
    a.op(RET_K, RET_ERRNO | errno.EOPNOTSUPP)
    a.label("enosys")
    a.op(RET_K, RET_ERRNO | errno.ENOSYS)
    return a.assemble()


@functools.lru_cache(maxsize=None)
def host_filter() -> bytes:
    """:func:`build_filter` for this host (made once per process)."""
    return build_filter()


# --- installing it: the trampoline --------------------------------------------------------

# Runs as the builder's user with only the stdlib (-I -S: no site, no environment,
# no cwd on sys.path).  Exit 1 with one line on stderr (the build log) on failure,
# like an exec failure of the builder itself.
_TRAMPOLINE = r"""
import marshal, os, signal, sys
f = open(int(sys.argv[1]), 'rb')
flt, path, argv, env = marshal.loads(f.read())
f.close()
def die(msg):
    os.write(2, msg.encode('utf-8', 'surrogateescape') + b'\n')
    os._exit(1)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
if libc.prctl(38, 1, 0, 0, 0) != 0:
    die('cannot set no_new_privs for the builder: ' + os.strerror(ctypes.get_errno()))
if flt:
    class Prog(ctypes.Structure):
        _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(flt, len(flt))
    prog = Prog(len(flt) // 8, ctypes.addressof(buf))
    if libc.prctl(22, 2, ctypes.addressof(prog), 0, 0) != 0:
        die('cannot load the seccomp filter for the builder: ' + os.strerror(ctypes.get_errno())
            + " (set 'filter-syscalls = false' to build without it)")
for s in signal.valid_signals():
    if signal.getsignal(s) == signal.SIG_IGN:
        signal.signal(s, signal.SIG_DFL)
try:
    os.execve(path, argv, env)
except OSError as e:
    die("executing '%s': %s" % (path.decode('utf-8', 'surrogateescape'), e.strerror))
"""


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    return libc


def preexec_confiner(flt: bytes | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that sets ``NO_NEW_PRIVS`` and loads ``flt`` (None: NNP only), or
    None when this process has more than one thread (then use :func:`confined_argv`).

    Everything is prepared here; the child only makes the two ``prctl`` calls.  A
    failure raises in the child, which Popen reports as ``SubprocessError``.
    """
    try:
        if len(os.listdir("/proc/self/task")) != 1:
            return None
    except OSError:
        return None
    libc = _libc()
    buf = ctypes.create_string_buffer(flt, len(flt)) if flt else None
    prog = _SockFprog(len(flt) // 8, ctypes.addressof(buf)) if flt and buf is not None else None
    prog_addr = ctypes.addressof(prog) if prog is not None else 0
    ignored = [sig for sig in signal.valid_signals() if signal.getsignal(sig) == signal.SIG_IGN]

    def confine_child() -> None:
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "cannot set no_new_privs for the builder")
        # PR_SET_SECCOMP, SECCOMP_MODE_FILTER (buf and prog live as long as this closure)
        if prog_addr and libc.prctl(22, 2, prog_addr, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot load the seccomp filter for the builder")
        for sig in ignored:  # (Popen restores only SIGPIPE and SIGXFSZ)
            signal.signal(sig, signal.SIG_DFL)
    confine_child.keep = (buf, prog)  # type: ignore[attr-defined]
    return confine_child


def python_for_builders() -> str:
    """An interpreter any user can run (the venv's ``python`` may sit in a private dir)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def confined_argv(executable: str, argv: list[str], env: dict[str, str],
                  flt: bytes | None) -> tuple[list[str], int]:
    """(Popen args, fd to pass) that run ``executable`` with ``argv`` and exactly ``env``
    under ``NO_NEW_PRIVS`` and the filter ``flt`` (None: no filter, NNP only).

    The fd is a memfd holding the spec; the caller passes it with ``pass_fds``
    and closes it after Popen.
    """
    enc = lambda s: os.fsencode(s)  # noqa: E731
    spec = (flt or b"", enc(executable), [enc(a) for a in argv],
            {enc(k): enc(v) for k, v in env.items()})
    fd = os.memfd_create("storekeeper-builder", os.MFD_CLOEXEC)
    try:
        data = marshal.dumps(spec)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return [python_for_builders(), "-I", "-S", "-c", _TRAMPOLINE, str(fd)], fd


# --- untrusted builds as the daemon's own user ---------------------------------------------------

def self_build_refusal(builds_as_daemon: bool, client_may: bool) -> str | None:
    """Why a builder may not run now (None: it may), given whether it would run as the
    daemon's own uid (no build users) and whether the client may have that.

    The client may when it is trusted, is the daemon's own user, or is the local CLI
    on its own store: each can change the store without a build anyway.
    """
    if not builds_as_daemon or client_may:
        return None
    uid = os.geteuid()
    if uid == 0:
        return ("refusing to run the builder of an untrusted client as root (the daemon's own "
                "user, uid 0): it could change anything on this machine; configure "
                "'build-users-group'")
    return (f"refusing to run the builder of an untrusted client as the daemon's own user "
            f"(uid {uid}): it could rewrite the store's database, other users' roots and TCP "
            "keys; run the daemon as root with 'build-users-group', or build as a trusted user")


# --- the sweep --------------------------------------------------------------------------------

#: Places a build user can create top-level entries in (besides the store dir and the
#: build dir's parent); missing ones are skipped.
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run/lock")

_STORE_NAME = re.compile(r"^[0-9a-df-np-sv-z]{32}-")
_BUILD_DIR_NAME = re.compile(r"^nix-build-")


def sweep_dirs(store_dir: str, build_dir_parent: str) -> list[str]:
    """The directories :func:`sweep` looks at, each once (by device and inode)."""
    out, seen = [], set()
    for d in (store_dir, build_dir_parent, *SHARED_DIRS):
        try:
            real = os.path.realpath(d)
            st = os.stat(real)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(real)
    return out


def _remove_entry(dir_fd: int, name: str) -> None:
    """Delete ``name`` (and all below it) in the directory open at ``dir_fd``, never following
    a symlink."""
    fs.remove_tree(name, dir_fd)


def kept_by_keep_failed(dir_path: str, name: str, st: os.stat_result, store_dir: str) -> bool:
    """What ``keep-failed`` may have left for the user to look at: a build dir
    (``nix-build-*`` directory) or a store-path-named entry in the store dir."""
    if dir_path == os.path.realpath(store_dir):
        return bool(_STORE_NAME.match(name))
    return stat.S_ISDIR(st.st_mode) and bool(_BUILD_DIR_NAME.match(name))


def keep_paths(paths: Iterable[str]):
    """A ``keep`` for :func:`sweep` that spares exactly ``paths``."""
    kept = {os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p)) for p in paths}
    return lambda dir_path, name, st: os.path.join(dir_path, name) in kept


def sweep(uid: int, dirs: Iterable[str], keep=lambda dir_path, name, st: False) -> list[str]:
    """Delete every top-level entry owned by ``uid`` in ``dirs``, except where
    ``keep(dir, name, lstat)`` says so; returns the paths deleted.

    Call it only when no process of ``uid`` runs (after ``kill_processes``).  Each
    dir is opened once (``O_NOFOLLOW``) and everything after is relative to that fd:
    the owner is read with ``fstatat(AT_SYMLINK_NOFOLLOW)`` and the entry deleted
    by name in the same fd.  Between the two, only ``uid`` itself or the dir's
    owner could rename the entry (the shared dirs are sticky; the store dir is
    ``01775``), and ``uid`` runs nothing; a replacement made by root is not
    ours to fear.  Errors on one entry do not stop the sweep (the next one retries).
    """
    if uid == 0 or uid == os.geteuid():
        raise ConfineError(f"refusing to sweep the files of uid {uid}")
    removed: list[str] = []
    for d in dirs:
        try:
            dfd = fs.open_dir(d)
        except OSError:
            continue
        try:
            for name in os.listdir(dfd):
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if st.st_uid != uid or keep(d, name, st):
                        continue
                    _remove_entry(dfd, name)
                    removed.append(os.path.join(d, name))
                except OSError:
                    continue
        finally:
            os.close(dfd)
    return removed
