"""The sandbox launcher: the program that puts builders into their sandboxes.

This file is **not imported** by storekeeper: :mod:`.forkserver` reads its
source and runs it once per build session as a *fork server*, ``python3 -I -S
-c <source> <socket fd>`` (it needs nothing but the standard library, and it is
a fresh single-threaded interpreter whatever threads the daemon has: each build
is a ``fork`` of it, safe only because it never has a second thread).  For each
build the daemon sends the spec (a memfd holding a ``marshal``led dict,
:meth:`storekeeper.build.sandbox.Sandbox.spec_fd`) and the log pipe; the
server forks a child (:func:`start`: its own session, stdout and stderr the
log) that sets up the sandbox and execs the builder, kills or reaps it when
asked (:func:`serve` has the protocol).  Starting an interpreter per build
cost 15-40 ms, more than the rest of the sandbox together.  The server runs
as the daemon's user (root, or the unprivileged user running the daemon); the
build's host identity (the build user, or the daemon's own ids) is in the spec.

What it does, in order (Linux, ``ctypes`` on libc; numbers are x86_64/aarch64's):

1. The server forks the build's first process (:func:`start`), which drops
   its supplementary groups (root only: impossible inside), ``unshare``s
   user, mount, pid, ipc, uts and (unless fixed-output) net namespaces and
   waits; the server, outside, writes its maps (:func:`map_ids`): inside uid
   1000 = the host uid, gid 100 = the host gid, nothing else (root may map a
   build user; anyone may map their own ids, after denying ``setgroups``).
2. The first process forks PID 1 of the new pid namespace and stays as its
   monitor; it exits as its child did (status, or death by the same signal),
   keeping the log pipe open until then.  When PID 1 exits, the kernel kills
   everything else in the namespace: nothing of the build survives it.
   ``PDEATHSIG`` SIGKILL chains them to the server, so killing the first one
   (or the server, or the daemon) kills the sandbox.  (Two Python processes
   and one more for the file systems per build: each fork and wake-up is
   paid again on a loaded machine.)
3. PID 1: ``lo`` up, hostname ``localhost``, domain name ``(none)``, every
   mount private (so nothing propagates to the host), the chroot and store
   dir file systems (:func:`file_systems`), the binds of the spec (the inputs
   made read-only together, :func:`bind_inputs`; any other read-only remount
   must keep the flags the kernel locked on the source mount --
   nosuid/nodev/noexec -- or it fails with EPERM, hence ``statvfs``), a fresh
   ``proc``, a ``tmpfs`` on ``/dev/shm``, a ``devpts`` (optional), then
   ``pivot_root(".", ".")`` and a lazy unmount of the old root, ``chdir``
   to the build dir, uid 1000 / gid 100 (all capabilities go with the exec at
   the latest), ``NO_NEW_PRIVS``, the seccomp filter, no core dumps,
   all fds but 0-2 closed, and ``execve`` of the builder.

Failures: one line on stderr (the
build log) and exit status 1, as an exec failure of the builder itself.
"""

# (_signal, not signal, and _socket, not socket: they import enum and selectors, a
# third of this program's start-up time, which the first build of a session pays)
import _signal as signal  # type: ignore[import-not-found]
import _socket
import ctypes
import gc
import marshal
import os
import resource
import select
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 8, 38, 22
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
# statvfs f_flag bits (ST_*) -> the MS_* flag the kernel locks on a bind in a user namespace
LOCKED = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC),
          (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME))

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
libc.syscall.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p]
# (a second handle: its ``syscall`` gets mount_setattr's argument types)
libc2 = ctypes.CDLL(None, use_errno=True)
libc2.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint,
                          ctypes.c_void_p, ctypes.c_size_t]
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1


def die(msg, prefix="error: sandbox: "):
    os.write(2, (prefix + msg + "\n").encode("utf-8", "surrogateescape"))
    os._exit(1)


def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        die("%s: %s" % (what, os.strerror(e)))


def mount(src, target, fstype, flags, data=None):
    check(libc.mount(src, target, fstype, flags, data),
          "mount %r on %r" % (src, target))


def locked_flags(path):
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in LOCKED if f & st)


def bind(src, target, readonly, recursive):
    flags = MS_BIND | (MS_REC if recursive else 0)
    mount(src, target, None, flags)
    if readonly:
        remount_readonly(target)


def remount_readonly(target):
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | locked_flags(target))


def set_readonly(path, recursive):
    """``mount_setattr``: the mount at ``path`` (and with ``recursive`` every mount
    below it) read-only, or (not ``recursive``) writable again.  False if the
    kernel has no ``mount_setattr`` (before 5.12)."""
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY if recursive else 0,
                       0 if recursive else MOUNT_ATTR_RDONLY, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    if libc2.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path, AT_RECURSIVE if recursive else 0,
                     ctypes.addressof(buf), len(attr)) == 0:
        return True
    if ctypes.get_errno() == 38:  # ENOSYS
        return False
    check(-1, "mount_setattr on %r" % path)


def bind_inputs(root, store, binds):
    """The input closure, bound read-only below the store dir: ``binds`` in one
    ``mount_setattr`` on the whole tree (then the store dir's own mount, where
    the outputs go, writable again) instead of a remount each -- 2000 inputs
    took 4000 mount calls and as many ``statvfs``."""
    for src, target in binds:
        bind(src, root + target, False, False)
    if set_readonly(root + store, True):
        set_readonly(root + store, False)
        return
    for _, target in binds:
        remount_readonly(root + target)


def write_file(path, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def loopback_up():
    s = libc.socket(2, 2, 0)  # AF_INET, SOCK_DGRAM
    if s < 0:
        check(-1, "socket")
    try:
        req = ctypes.create_string_buffer(struct.pack("16sH22x", b"lo", 0), 40)
        check(libc.ioctl(s, 0x8913, req), "SIOCGIFFLAGS lo")
        flags = struct.unpack("16sH22x", req.raw)[1]
        req = ctypes.create_string_buffer(struct.pack("16sH22x", b"lo", flags | 1), 40)
        check(libc.ioctl(s, 0x8914, req), "bringing lo up")  # SIOCSIFFLAGS IFF_UP
    finally:
        os.close(s)


def raise_capabilities():
    """Permitted capabilities made effective again (after a uid change with KEEPCAPS)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()
    check(libc.capget(header, data), "capget")
    data[0], data[3] = data[1], data[4]
    check(libc.capset(header, data), "capset")


def make_entries(dir_fd, entries):
    """Create ``entries`` ((path, kind, data), parents first) below ``dir_fd``."""
    for name, kind, data in entries:
        if kind == b"d":
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        elif kind == b"l":
            os.symlink(data, name, dir_fd=dir_fd)
        else:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444, dir_fd=dir_fd)
            try:
                if data:
                    os.write(fd, data)
            finally:
                os.close(fd)


def file_systems(spec):
    """The chroot and its store dir, on file systems of their own: the root a tmpfs
    with the skeleton (``/etc`` files, mount points); the store dir an overlay of
    ``lower`` (a tmpfs with a mount point per input) and ``upper`` (on disk, in the
    store's file system: the outputs).  Creating thousands of mount points costs
    microseconds on a tmpfs and milliseconds each on some disks.

    Both are filled by a child as uid 1000 that keeps its capabilities: a file
    system mounted in a user namespace refuses files owned by ids it cannot map
    (host root), and overlayfs refuses a mounter whose ids the namespace does not
    map.  The paths are handed over as ``O_PATH`` fds opened as this process's
    host identity, so uid 1000 need not be able to reach them."""
    root, top, uid, gid = spec["root"], spec["layers"], spec["uid"], spec["gid"]
    for where in (root, top + b"/lower"):
        mount(b"none", where, b"tmpfs", MS_NOSUID | MS_NODEV,
              b"mode=0755,uid=%d,gid=%d" % (uid, gid))
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY)
           for p in (root, top + b"/lower", top + b"/upper", top + b"/work")]
    pid = os.fork()
    if pid == 0:
        try:
            check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "PR_SET_KEEPCAPS")
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            raise_capabilities()
            make_entries(fds[0], spec["skeleton"])
            make_entries(fds[1], spec["entries"])
            fd_path = [b"/proc/self/fd/%d" % fd for fd in fds]
            mount(b"overlay", fd_path[0] + spec["store"], b"overlay", 0,
                  b"lowerdir=%s,upperdir=%s,workdir=%s,userxattr" % tuple(fd_path[1:]))
            os.chmod(fd_path[0] + b"/tmp", 0o1777)
            for d in (b"", b"/etc"):
                os.chmod(fd_path[0] + d, 0o555)
        except BaseException as e:  # noqa: BLE001
            die("setting up the chroot: %s" % e)
        os._exit(0)
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        os._exit(1)


def pid1(spec):
    check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "PR_SET_PDEATHSIG")
    if spec["private_net"]:
        loopback_up()
    check(libc.sethostname(b"localhost", 9), "sethostname")
    check(libc.setdomainname(b"(none)", 6), "setdomainname")
    mount(None, b"/", None, MS_REC | MS_PRIVATE)
    root = spec["root"]
    file_systems(spec)
    store = spec["store"]
    inputs = []
    for src, target, readonly, recursive in spec["binds"]:
        if readonly and not recursive and target.startswith(store + b"/"):
            inputs.append((src, target))
        else:
            bind(src, root + target, readonly, recursive)
    bind_inputs(root, store, inputs)
    mount(b"proc", root + b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # Kernel knobs: look only.  (Without build users a root daemon's builder is host
    # root's uid, which owns these files; capabilities it has none of outside.)
    for knob in (b"/proc/sys", b"/proc/sysrq-trigger"):
        if os.path.exists(root + knob):
            bind(root + knob, root + knob, True, False)
    mount(b"none", root + b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV,
          b"mode=1777,size=" + spec["shm_size"])
    if spec["devpts"]:
        if libc.mount(b"none", root + b"/dev/pts", b"devpts", MS_NOSUID | MS_NOEXEC,
                      b"newinstance,mode=0620,ptmxmode=0666") != 0:
            pass  # no pseudo-terminals in this sandbox (as with bwrap's fallback)
    os.chdir(root)
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        die("no pivot_root for this architecture")
    check(libc.syscall(nr, b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "unmounting the host's root")
    os.chroot(".")
    os.chdir(spec["cwd"])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    flt = spec["filter"]
    if flt:
        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        buf = ctypes.create_string_buffer(flt, len(flt))
        prog = Prog(len(flt) // 8, ctypes.addressof(buf))
        check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.addressof(prog), 0, 0),
              "loading the seccomp filter (set 'filter-syscalls = false' to build without it)")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.closerange(3, 1 << 20)
    for sig in signal.valid_signals():  # exec keeps ignored signals: none for the builder
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    path = spec["path"]
    try:
        os.execve(path, spec["argv"], spec["env"])
    except OSError as e:
        # (as without the sandbox: confine.py's trampoline says the same)
        die("executing '%s': %s" % (path.decode("utf-8", "surrogateescape"), e.strerror), "")


def monitor(pid):
    """Wait for ``pid`` and end as it did (exit status, or death by the same signal).
    Keeps the log pipe open until then: the daemon takes the end of the log as the
    end of the build and kills what is left."""
    for sig in (15, 2, 1):  # SIGTERM, SIGINT, SIGHUP
        signal.signal(sig, lambda s, f: os.kill(pid, 9))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def child(spec, go):
    """The build's first process, in its new namespaces once the server has mapped
    our ids: forks PID 1 and monitors it."""
    if os.read(go, 1) != b"1":
        os._exit(1)  # the server failed (and said why)
    os.close(go)
    pid = os.fork()
    if pid == 0:
        try:
            pid1(spec)
        except BaseException as e:  # noqa: BLE001 - one line in the log, never a traceback
            die(str(e) or e.__class__.__name__)
        os._exit(1)
    monitor(pid)


def start(server_pid, spec, log_fd, ready, go):
    """In the server's fresh child: the process the daemon knows as the builder.  Its
    own session, the log as stdout and stderr, then the namespaces (``ready``: the
    server may write our maps; ``go``: it has)."""
    try:
        check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "PR_SET_PDEATHSIG")
        if os.getppid() != server_pid:
            os._exit(1)  # (the server died before PDEATHSIG was set)
        os.setsid()  # (its own session: the daemon kills its process group)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.umask(0o022)
        for sig in (2, 15, 1):
            signal.signal(sig, signal.SIG_DFL)
        # (the server's socket, the other builds' pidfds: all but our two pipes)
        low, high = sorted((ready, go))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, 1 << 20)
        if os.geteuid() == 0:
            os.setgroups([])  # (only possible outside the user namespace)
    except BaseException as e:  # noqa: BLE001
        die(str(e) or e.__class__.__name__)
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if spec["private_net"]:
        flags |= CLONE_NEWNET
    check(libc.unshare(flags), "cannot create the build's namespaces")
    os.write(ready, b"1")
    os.close(ready)
    child(spec, go)


def map_ids(pid, spec, ready, go, log_fd):
    """In the server, once ``pid`` has made its namespaces: write its maps from outside
    (root may map the build user's ids; a process may always map only its own), then
    let it go on.  ``setgroups`` is denied first, as the kernel requires of the latter.
    Mapping from outside keeps the child's host identity for the set-up, so it can
    reach bind sources under root-only directories."""
    if os.read(ready, 1) != b"1":
        return  # (it failed, and said why in the log)
    proc = "/proc/%d/" % pid
    try:
        write_file(proc + "uid_map", b"%d %d 1\n" % (spec["uid"], spec["host_uid"]))
        write_file(proc + "setgroups", b"deny\n")
        write_file(proc + "gid_map", b"%d %d 1\n" % (spec["gid"], spec["host_gid"]))
    except OSError as e:
        os.kill(pid, 9)
        os.write(log_fd, b"error: sandbox: cannot map the build's user ids: %s\n"
                 % e.strerror.encode())
        return
    os.write(go, b"1")


def begin(me, spec_fd, log_fd):
    """Fork the build's first process (:func:`start`) and map its ids; its pid."""
    with open(spec_fd, "rb", closefd=False) as f:
        spec = marshal.loads(f.read())
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ready_r)
                os.close(go_w)
                start(me, spec, log_fd, ready_w, go_r)
            finally:
                os._exit(1)  # (never back into the server's loop)
        os.close(ready_w)
        os.close(go_r)
        ready_w = go_r = -1
        map_ids(pid, spec, ready_r, go_w, log_fd)
        return pid
    finally:
        for fd in (ready_r, ready_w, go_r, go_w):
            if fd >= 0:
                os.close(fd)


def serve(sock_fd):
    """The fork server (module docstring): requests and answers are ``marshal``led
    tuples on the ``SOCK_SEQPACKET`` socket ``sock_fd``:

    * ``("start",)`` with the fds (spec memfd, log pipe): a child for one build,
      answered ``("started", pid)``;
    * ``("kill", pid)``: SIGKILL to that child's process group (never after it
      was reaped, so never to a recycled pid; no answer);
    * ``("wait", pid)``: answered ``("exited", pid, wait status, user and system
      CPU microseconds)`` once the child has exited; only then is it reaped.

    End of file on the socket (the daemon is gone or done): every child killed,
    exit."""
    check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "PR_SET_PDEATHSIG")
    for sig in (2, 15, 1):
        signal.signal(sig, signal.SIG_IGN if sig == 2 else signal.SIG_DFL)
    # No collector here or in the children: it would write to every object's header,
    # and each child would copy those pages on write (this loop makes no cycles).
    gc.disable()
    gc.freeze()
    sock = _socket.socket(fileno=sock_fd)
    me = os.getpid()
    poll = select.poll()
    poll.register(sock_fd, select.POLLIN)
    pidfds = {}      # pidfd -> pid, for the children not yet seen to exit
    children = {}    # pid -> pidfd, until reaped
    exited, waited = set(), set()

    def stop():
        for pid in children:
            try:
                os.killpg(pid, 9)
            except OSError:
                pass
        os._exit(0)

    def send(*msg):
        try:
            sock.send(marshal.dumps(msg))
        except OSError:
            stop()  # (the daemon is gone)

    def reap(pid):
        _, status, ru = os.wait4(pid, 0)
        os.close(children.pop(pid))
        exited.discard(pid)
        waited.discard(pid)
        send("exited", pid, status, int(ru.ru_utime * 1e6), int(ru.ru_stime * 1e6))

    space = _socket.CMSG_SPACE(2 * 4)
    while True:
        for fd, _ in poll.poll():
            if fd in pidfds:
                pid = pidfds.pop(fd)
                poll.unregister(fd)
                exited.add(pid)
                if pid in waited:
                    reap(pid)
                continue
            try:
                data, anc, _, _ = sock.recvmsg(1 << 16, space)
            except OSError:
                stop()
            fds = []
            for level, kind, raw in anc:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    fds += struct.unpack("%di" % (len(raw) // 4), raw[:len(raw) - len(raw) % 4])
            if not data:
                stop()
            msg = marshal.loads(data)
            if msg[0] == "start" and len(fds) == 2:
                try:
                    pid = begin(me, fds[0], fds[1])
                except Exception as e:  # noqa: BLE001 - answered, never a dead server
                    pid = -1
                    send("error", "cannot start the build: %s"
                         % (getattr(e, "strerror", None) or e))
                finally:
                    for x in fds:
                        os.close(x)
                if pid < 0:
                    continue
                pidfd = os.pidfd_open(pid)
                children[pid] = pidfd
                pidfds[pidfd] = pid
                poll.register(pidfd, select.POLLIN)
                send("started", pid)
            elif msg[0] == "kill":
                if msg[1] in children and msg[1] not in exited:
                    try:
                        os.killpg(msg[1], 9)
                    except OSError:
                        pass
            elif msg[0] == "wait" and msg[1] in children:
                waited.add(msg[1])
                if msg[1] in exited:
                    reap(msg[1])
            else:
                for x in fds:
                    os.close(x)
                send("error", "bad request %r" % (msg[:1],))


if __name__ == "__main__":
    serve(int(sys.argv[1]))
