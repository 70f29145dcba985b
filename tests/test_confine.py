"""The confinement of builds without the sandbox (build/confine.py), piece by piece.

* The seccomp program is checked by interpreting its BPF here (no kernel): verdicts for
  sample syscalls on x86_64 (native, x32, i386) and aarch64, and a foreign ABI killed.
* The trampoline is run for real (as whoever runs the tests): the kernel refuses
  setuid/setgid modes and xattrs, the builder gets exactly its environment, default
  signal dispositions and the same exec-failure line as without it.
* The sweep (root only: it needs files of another uid) deletes that uid's top-level
  entries fd-relatively and never follows a symlink it deletes.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys

import pytest

from storekeeper.build import confine

# --- a classic-BPF interpreter (just what seccomp programs use) ----------------------------


def run_bpf(prog: bytes, nr: int, arch: int, args=(0, 0, 0, 0, 0, 0)) -> int:
    data = struct.pack("=iIQ6Q", nr, arch, 0, *[a & (2**64 - 1) for a in (list(args) + [0] * 6)[:6]])
    ins = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    a, pc = 0, 0
    for _ in range(10_000):
        code, jt, jf, k = ins[pc]
        pc += 1
        if code == confine.LD_W_ABS:
            a = struct.unpack_from("=I", data, k)[0]
        elif code == confine.AND_K:
            a &= k
        elif code == confine.JEQ_K:
            pc += jt if a == k else jf
        elif code == confine.JSET_K:
            pc += jt if a & k else jf
        elif code == confine.JA:
            pc += k
        elif code == confine.RET_K:
            return k
        else:
            raise AssertionError(f"unknown opcode {code:#x}")
    raise AssertionError("no verdict")


EPERM = confine.RET_ERRNO | errno.EPERM
ENOTSUP = confine.RET_ERRNO | errno.EOPNOTSUPP
ENOSYS = confine.RET_ERRNO | errno.ENOSYS
ALLOW, KILL = confine.RET_ALLOW, confine.RET_KILL_PROCESS
O_CREAT, O_TMPFILE = 0o100, 0o20000000 | 0o200000


def _cases(t: dict[str, int]):
    """(syscall, args, verdict) for one ABI's table ``t``."""
    out = []
    for name, mode_arg in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("fchmodat2", 2),
                           ("creat", 1), ("mknod", 1), ("mknodat", 2)):
        if name not in t:
            continue
        for mode, want in ((0o755, ALLOW), (0o4755, EPERM), (0o2755, EPERM), (0o6755, EPERM),
                           (0o1777, ALLOW), (0o100000 | 0o4755, EPERM),
                           (0xFFFFFFFF00000000 | 0o755, ALLOW)):  # only the low 32 bits count
            args = [0] * 6
            args[mode_arg] = mode
            out.append((name, args, want))
    for name, (fa, ma) in (("open", (1, 2)), ("openat", (2, 3))):
        if name not in t:
            continue
        for flags, mode, want in ((O_CREAT, 0o4755, EPERM), (O_TMPFILE, 0o2700, EPERM),
                                  (O_CREAT, 0o755, ALLOW), (0, 0o4755, ALLOW), (1, 0o6755, ALLOW)):
            args = [0] * 6
            args[fa], args[ma] = flags, mode
            out.append((name, args, want))
    for name in ("setxattr", "lsetxattr", "fsetxattr", "setxattrat"):
        out.append((name, [0] * 6, ENOTSUP))
    for name in ("openat2", "io_uring_setup", "io_uring_enter", "io_uring_register"):
        out.append((name, [0] * 6, ENOSYS))
    return out


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_filter_verdicts_by_interpretation(machine):
    prog = confine.build_filter(machine)
    assert prog == confine.build_filter(machine)  # pure
    assert len(prog) % 8 == 0 and len(prog) // 8 < 256
    abis = {"x86_64": [(confine.AUDIT_ARCH_X86_64, "x86_64", 0),
                       (confine.AUDIT_ARCH_X86_64, "x86_64", confine.X32_SYSCALL_BIT),
                       (confine.AUDIT_ARCH_I386, "i386", 0)],
            "aarch64": [(confine.AUDIT_ARCH_AARCH64, "aarch64", 0)]}[machine]
    for arch, table, bias in abis:
        t = confine.SYSCALLS[table]
        for name, args, want in _cases(t):
            got = run_bpf(prog, t[name] | bias, arch, args)
            assert got == want, (machine, table, bias, name, [oct(a) for a in args], hex(got))
        # everything else passes: read, write, execve, getuid, and odd numbers
        for nr in (0, 1, 3, 59, 63, 64, 221, 102, 0xFFFF, 451):
            if nr not in t.values():
                assert run_bpf(prog, nr | bias, arch) == ALLOW, (table, nr)
    # another ABI is killed, not let through: 32-bit ARM (on either), x86_64 on aarch64
    for foreign in (0x40000028, confine.AUDIT_ARCH_AARCH64 if machine == "x86_64"
                    else confine.AUDIT_ARCH_X86_64):
        assert run_bpf(prog, confine.SYSCALLS["i386"]["chmod"], foreign, [0, 0o4755]) == KILL
        assert run_bpf(prog, 0, foreign) == KILL


def test_unknown_architecture_is_refused_with_a_clear_error():
    with pytest.raises(confine.ConfineError, match="set 'filter-syscalls = false'"):
        confine.build_filter("riscv64")


# --- the trampoline, for real ---------------------------------------------------------------

needs_native = pytest.mark.skipif(confine.native_arch() is None, reason="no filter for this arch")

PROBE = r"""
import os, sys
d = sys.argv[1]
def try_(what, fn):
    try:
        fn()
        print(what, 0)
    except OSError as e:
        print(what, e.errno)
p = os.path.join(d, 'f')
open(p, 'w').close()
try_('chmod-755', lambda: os.chmod(p, 0o755))
try_('chmod-4755', lambda: os.chmod(p, 0o4755))
try_('chmod-2755', lambda: os.chmod(p, 0o2755))
fd = os.open(p, os.O_RDONLY)
try_('fchmod-6755', lambda: os.fchmod(fd, 0o6755))
try_('fchmodat-4755', lambda: os.chmod('f', 0o4755, dir_fd=os.open(d, os.O_RDONLY)))
try_('open-creat-4755', lambda: os.close(os.open(os.path.join(d, 'g'), os.O_CREAT | os.O_WRONLY, 0o4755)))
try_('mknod-2755', lambda: os.mknod(os.path.join(d, 'h'), 0o2755 | 0o100000))
try_('setxattr', lambda: os.setxattr(p, 'user.sk', b'1'))
print('mode', oct(os.stat(p).st_mode & 0o7777))
print('setid-files', sorted(n for n in os.listdir(d) if os.stat(os.path.join(d, n)).st_mode & 0o6000))
with open('/proc/self/status') as f:
    print('status', *[l.split()[1] for l in f if l.startswith(('NoNewPrivs:', 'Seccomp:'))])
"""


def _probe(tmp_path, flt):
    d = tmp_path / "probe"
    d.mkdir()
    python = confine.python_for_builders()
    argv, fd = confine.confined_argv(python, ["python3", "-I", "-S", "-c", PROBE, str(d)], {}, flt)
    try:
        p = subprocess.run(argv, pass_fds=(fd,), env={}, capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    assert p.returncode == 0, p.stderr
    return dict(line.split(" ", 1) for line in p.stdout.splitlines())


@needs_native
def test_the_kernel_refuses_setid_modes_and_xattrs_under_the_filter(tmp_path):
    got = _probe(tmp_path, confine.build_filter())
    assert got["chmod-755"] == "0"
    for what in ("chmod-4755", "chmod-2755", "fchmod-6755", "fchmodat-4755", "open-creat-4755",
                 "mknod-2755"):
        assert got[what] == str(errno.EPERM), (what, got)
    assert got["setxattr"] == str(errno.EOPNOTSUPP)
    assert got["mode"] == "0o755" and got["setid-files"] == "[]"
    assert got["status"] == "1 2"  # NoNewPrivs, Seccomp (filter mode)


@needs_native
def test_without_the_filter_the_same_probe_makes_setid_files(tmp_path):
    """The control: NO_NEW_PRIVS only (flt None) lets all of it through."""
    got = _probe(tmp_path, None)
    assert got["chmod-4755"] == "0" and got["open-creat-4755"] == "0"
    assert got["setid-files"] != "[]" and got["status"] == "1 0"


def test_the_builder_gets_exactly_its_environment_and_default_signals(tmp_path):
    env = {"A": "b", "PATH": "/usr/bin:/bin", "ODD": "x\udcffy"}
    script = ("grep -E '^(SigIgn|SigBlk|NoNewPrivs)' /proc/self/status; echo @@; env -0; "
              "echo @@; ls /proc/self/fd")
    argv, fd = confine.confined_argv("/bin/sh", ["sh", "-c", script], env,
                                     confine.build_filter() if confine.native_arch() else None)
    # a daemon started under nohup: its children inherit SIGHUP ignored, builders must not
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        p = subprocess.run(argv, pass_fds=(fd,), env={}, capture_output=True, timeout=60)
    finally:
        signal.signal(signal.SIGHUP, old)
        os.close(fd)
    status, environ, fds = p.stdout.decode("utf-8", "surrogateescape").split("@@\n")
    assert "SigIgn:\t0000000000000000" in status and "SigBlk:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status
    seen = dict(e.split("=", 1) for e in environ.rstrip("\n").split("\0") if e)
    seen.pop("PWD", None)  # (sh sets it)
    assert seen == env  # no LC_CTYPE from Python's locale coercion
    assert fds.split() == ["0", "1", "2", "3"]  # the spec's memfd is gone (3: ls's own)


def test_an_exec_failure_is_one_line_and_exit_1():
    argv, fd = confine.confined_argv("/nonexistent/builder", ["builder"], {}, None)
    try:
        p = subprocess.run(argv, pass_fds=(fd,), env={}, capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    assert p.returncode == 1
    assert p.stderr == "executing '/nonexistent/builder': No such file or directory\n"


# --- the sweep ---------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make files of another uid")
def test_sweep_deletes_top_level_entries_of_the_uid_only(tmp_path):
    uid, other = 54321, 54322
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")

    def make(name: str, owner: int, kind: str = "file") -> None:
        p = shared / name
        if kind == "file":
            p.write_text("x")
        elif kind == "dir":
            p.mkdir()
            (p / "sub").mkdir()
            (p / "sub" / "f").write_text("x")
            os.chmod(p / "sub", 0o500)
            os.lchown(p / "sub", owner, owner)
        elif kind == "link":
            os.symlink(victim, p)
        os.lchown(p, owner, owner)

    make("junk", uid)
    make("tree", uid, "dir")
    make("link", uid, "link")
    make("nix-build-kept-0", uid, "dir")
    make("theirs", other)
    make("roots", 0)
    keep = lambda d, n, st: n == "nix-build-kept-0"  # noqa: E731
    removed = confine.sweep(uid, [str(shared), str(tmp_path / "missing")], keep=keep)
    assert sorted(os.path.basename(r) for r in removed) == ["junk", "link", "tree"]
    assert sorted(os.listdir(shared)) == ["nix-build-kept-0", "roots", "theirs"]
    assert (victim / "precious").read_text() == "keep me\n"
    with pytest.raises(confine.ConfineError):
        confine.sweep(0, [str(shared)])
    with pytest.raises(confine.ConfineError):
        confine.sweep(os.geteuid(), [str(shared)])


def test_sweep_dirs_are_real_and_unique(tmp_path):
    link = tmp_path / "link"
    os.symlink("/tmp", link)
    dirs = confine.sweep_dirs(str(tmp_path), str(link))
    assert dirs[0] == str(tmp_path) and dirs.count("/tmp") == 1
    assert all(not os.path.islink(d) for d in dirs)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
