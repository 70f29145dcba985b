"""The build sandbox (``sandbox = true``): what a builder can and cannot do inside it.

Builders are a static busybox copied into the store (as Nix's own tests do), on
chroot stores (logical ``/nix/store`` kept under a temp dir: only the sandbox
makes that store dir exist for the builder).  Each "cannot" test also runs the
same builder unsandboxed on a store with a real store dir, where it *can*: so
every such test fails without the sandbox.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import needs_nix
from realusers import SK, as_user, needs_root_users, real_users, spawn_as, start_daemon_as, stop
from test_build import area_factory, build_users  # noqa: F401 -- fixtures

from storekeeper.build import Builder, BuildMode, BuildSettings, BuildStatus
from storekeeper.build import sandbox as sandbox_mod
from storekeeper.config.settings import this_system
from storekeeper.formats.derivation import (
    Derivation,
    DerivationOutput,
    derivation_store_path,
    fill_output_paths,
    print_derivation,
)
from storekeeper.formats.storepath import StorePath
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import DerivedPath
from storekeeper.store.local import LocalStore

SYSTEM = this_system()
BUSYBOX = shutil.which("busybox") or "/bin/busybox"

needs_sandbox = pytest.mark.skipif(
    not os.path.exists(BUSYBOX) or sandbox_mod.unavailable() is not None,
    reason=f"needs a static busybox and kernel namespaces ({sandbox_mod.unavailable()})")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (build users)")

pytestmark = [needs_sandbox, pytest.mark.slow]

SANDBOXED = [("sandbox", "true"), ("build-users-group", "")]
UNSANDBOXED = [("sandbox", "false"), ("build-users-group", "")]


def shell_path(store: LocalStore) -> StorePath:
    """A store path holding ``bin/busybox`` and ``bin/sh -> busybox``."""
    src = os.path.join(store.real_store_dir, "..", "bb-src")
    os.makedirs(os.path.join(src, "bin"), exist_ok=True)
    if not os.path.exists(os.path.join(src, "bin", "busybox")):
        shutil.copy(BUSYBOX, os.path.join(src, "bin", "busybox"))
        os.symlink("busybox", os.path.join(src, "bin", "sh"))
    return store.add_path(src, name="busybox").path


def add_drv(store: LocalStore, name: str, script: str, *, fixed_hash: str | None = None,
            flat: bool = False, env: dict[str, str] | None = None, srcs: tuple[StorePath, ...] = ()) -> StorePath:
    sd = store.store_dir
    bb = shell_path(store)
    sh = sd.print(bb) + "/bin/sh"
    out = DerivationOutput(hash_algo="sha256" if flat else "r:sha256", hash=fixed_hash) if fixed_hash \
        else DerivationOutput()
    drv = Derivation(outputs={"out": out}, platform=SYSTEM, builder=sh,
                     args=["-e", "-c", script],
                     env={"builder": sh, "name": name, "system": SYSTEM, **(env or {})},
                     input_srcs=sorted([sd.print(bb), *(sd.print(s) for s in srcs)]))
    drv = fill_output_paths(drv, sd, read_drv=None)
    info = store.add_text(name + ".drv", print_derivation(drv), references=[bb, *srcs])
    assert info.path == derivation_store_path(drv, sd)
    return info.path


def build(store: LocalStore, drv: StorePath, settings) -> tuple[object, str]:
    """(result, output's real path) of building ``drv``; the log lines are in result.log."""
    lines: list[str] = []

    class Log:
        def __getattr__(self, name):
            return lambda *a, **k: 0

        def result(self, act, kind, fields):
            lines.append(str(fields[0]))

        def log(self, level, msg):
            lines.append(msg)

    st = BuildSettings().with_settings(settings)
    [res] = Builder(store, st, logger=Log()).build([DerivedPath(drv, ("out",))])
    res.log = "\n".join(lines)
    outs = store.query_derivation_outputs(drv)
    return res, store.real_path(outs["out"])


@pytest.fixture
def chroot_store(tmp_path):
    root = tmp_path / "root"
    s = LocalStore(LocalLayout.chroot(str(root)))
    yield s
    s.close()


@pytest.fixture
def real_store(tmp_path):
    base = str(tmp_path / "real")
    s = LocalStore(LocalLayout.custom(base + "/store", base + "/state", base + "/log"))
    yield s
    s.close()


def read_out(path: str) -> str:
    with open(path) as f:
        return f.read()


# --- a plain sandboxed build ----------------------------------------------------------------

def test_builds_on_a_chroot_store_with_the_logical_store_dir_inside(chroot_store):
    drv = add_drv(chroot_store, "hello", 'echo "$NIX_BUILD_TOP $PWD $TMPDIR $HOME" > $out; '
                  'id -u >> $out; id -g >> $out; echo $$ >> $out; hostname >> $out; '
                  'cat /etc/passwd >> $out; ls /etc >> $out; '
                  'ifconfig lo | grep -q "UP LOOPBACK RUNNING" && echo lo-up >> $out')
    res, out = build(chroot_store, drv, SANDBOXED)
    assert res.status in (BuildStatus.BUILT,), res.error_msg
    lines = read_out(out).splitlines()
    assert lines[0] == "/build /build /build /homeless-shelter"
    assert lines[1:5] == ["1000", "100", "1", "localhost"]
    assert lines[5:8] == ["root:x:0:0:Nix build user:/build:/noshell",
                          "nixbld:x:1000:100:Nix build user:/build:/noshell",
                          "nobody:x:65534:65534:Nobody:/:/noshell"]
    assert lines[8:] == ["group", "hosts", "passwd", "lo-up"]
    assert chroot_store.is_valid(chroot_store.query_derivation_outputs(drv)["out"])
    # the chroot dir is gone
    assert not [n for n in os.listdir(chroot_store.real_store_dir) if n.endswith(".chroot")]


def test_one_launcher_per_session_runs_parallel_builds_and_leaves_no_process(chroot_store):
    """The fork server (build/forkserver.py): several sandboxed builds at once in one
    request, each with its own status and log; no child of ours is left afterwards
    (a daemon's connection process is reused only without one)."""
    drvs = [add_drv(chroot_store, f"par{i}", f"sleep 0.{i}; echo {i}; echo {i} > $out")
            for i in range(4)]
    drvs.append(add_drv(chroot_store, "fails", "echo oops; exit 3"))
    st = BuildSettings().with_settings(SANDBOXED + [("max-jobs", "3"), ("keep-going", "true")])
    res = Builder(chroot_store, st).build([DerivedPath(d, frozenset({"out"})) for d in drvs])
    assert [r.status for r in res[:4]] == [BuildStatus.BUILT] * 4, [r.error_msg for r in res]
    for i, d in enumerate(drvs[:4]):
        out = chroot_store.real_path(chroot_store.query_derivation_outputs(d)["out"])
        assert read_out(out) == f"{i}\n"
    assert res[4].status == BuildStatus.PERMANENT_FAILURE
    assert "failed with exit code 3" in res[4].error_msg and "> oops" in res[4].error_msg
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def _our_launcher() -> int | None:
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError):
            continue
        if ppid == os.getpid() and b"fork server" in cmd:
            return int(pid)
    return None


def test_a_dead_launcher_takes_its_builds_with_it(chroot_store):
    """Killing the fork server kills its sandboxes (PDEATHSIG): the build fails as
    killed, nothing of it is left, and the next request starts a new server."""
    marker = f"sandbox-orphan-{os.getpid()}"
    drv = add_drv(chroot_store, "orphan", f'echo started; sh -c "sleep 30; echo {marker}"')
    killed = []

    def inner_started() -> bool:
        # (the inner sh, started after "started" was written; the builder's own command
        # line names the marker too, before it has written anything)
        return bool(_processes_with(f"sleep 30; echo {marker}")) and \
            len(_processes_with(marker)) > len(_processes_with("echo started; sh -c"))

    def killer() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not killed:
            pid = _our_launcher()
            if pid is not None and inner_started():
                os.kill(pid, 9)
                killed.append(pid)
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    start = time.monotonic()
    res, _ = build(chroot_store, drv, SANDBOXED)
    t.join()
    assert killed and time.monotonic() - start < 20
    assert res.status == BuildStatus.PERMANENT_FAILURE
    assert "failed due to signal 9 (Killed)" in res.error_msg and "> started" in res.error_msg
    time.sleep(0.3)
    assert _processes_with(marker) == []
    res, out = build(chroot_store, add_drv(chroot_store, "after", "echo ok > $out"), SANDBOXED)
    assert res.status == BuildStatus.BUILT and read_out(out) == "ok\n"


def both(tmp_path, name: str, script: str, sandboxed=SANDBOXED, unsandboxed=UNSANDBOXED,
         **kw) -> tuple[str, str]:
    """The output of ``script`` built in the sandbox (chroot store) and without it (a store
    with a real store dir); each must build."""
    outs = []
    for kind, settings in (("root", sandboxed), ("real", unsandboxed)):
        if kind == "root":
            store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
        else:
            b = str(tmp_path / "real")
            store = LocalStore(LocalLayout.custom(b + "/store", b + "/state", b + "/log"))
        try:
            res, out = build(store, add_drv(store, name, script, **kw), settings)
            assert res.status == BuildStatus.BUILT, (kind, res.error_msg)
            outs.append(read_out(out))
        finally:
            store.close()
    return outs[0], outs[1]


# --- what a sandboxed builder cannot do (and an unsandboxed one can) -------------------------

def test_cannot_read_a_host_file_outside_its_closure(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    inside, outside = both(tmp_path, "readhost",
                           f'cat {secret} > $out 2>/dev/null || echo no-such-file > $out')
    assert (inside, outside) == ("no-such-file\n", "s3cret\n")


class _Listener:
    """A TCP listener on 127.0.0.1 answering HTTP, counting connections."""

    def __init__(self, body: bytes) -> None:
        outer = self
        self.hits = 0

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def fetch(port: int, dest: str) -> str:
    """Shell (busybox) that GETs /x from 127.0.0.1:port into ``dest`` (the body only).
    (Debian's static busybox ``wget`` crashes; ``nc`` does not.)"""
    return (f'printf "GET /x HTTP/1.0\\r\\n\\r\\n" | nc 127.0.0.1 {port} > $TMPDIR/resp && '
            f'tr -d "\\r" < $TMPDIR/resp | sed "1,/^$/d" > {dest}')


def test_cannot_reach_a_loopback_listener_but_a_fixed_output_build_can(tmp_path):
    body = b"payload from the host\n"
    srv = _Listener(body)
    try:
        script = f'{fetch(srv.port, "$TMPDIR/got")} && cat $TMPDIR/got > $out || echo unreachable > $out'
        inside, outside = both(tmp_path, "net", script)
        assert (inside, outside) == ("unreachable\n", body.decode())
        assert srv.hits == 1  # only the unsandboxed one got through
        # a fixed-output build shares the host's network (and gets no /etc/hosts of ours)
        store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
        try:
            drv = add_drv(store, "fetched", fetch(srv.port, "$out"),
                          fixed_hash=hashlib.sha256(body).hexdigest(), flat=True)
            res, out = build(store, drv, SANDBOXED)
            assert res.status == BuildStatus.BUILT, res.error_msg
            assert read_out(out) == body.decode() and srv.hits == 2
        finally:
            store.close()
    finally:
        srv.close()


def test_cannot_make_setuid_or_setgid_files_or_set_xattrs(tmp_path):
    probe = tmp_path / "xattr-probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        pytest.skip("no user xattrs on this file system")
    # xattrs need a program that calls setxattr: the host's python, bound in
    paths = [("sandbox-paths", "/usr /lib /lib64? /bin")]
    py = ("import os,sys\\ntry:\\n os.setxattr(sys.argv[1],'user.x',b'1'); print('allowed')\\n"
          "except OSError as e: print(os.strerror(e.errno))")
    script = ('mkdir $out; touch $out/f $out/g; '
              'chmod 4755 $out/f 2>/dev/null && echo allowed > $out/suid || echo denied > $out/suid; '
              'chmod 2755 $out/g 2>/dev/null && echo allowed > $out/sgid || echo denied > $out/sgid; '
              f'printf "{py}" > $TMPDIR/x.py; /usr/bin/python3 -I -S $TMPDIR/x.py $out/f > $out/xattr; '
              'grep -E "^(NoNewPrivs|Seccomp):" /proc/self/status | tr -s "\\t" " " > $out/status')
    results = []
    for flt in ("true", "false"):
        store = LocalStore(LocalLayout.chroot(str(tmp_path / f"root-{flt}")))
        try:
            res, out = build(store, add_drv(store, "setid", script),
                             SANDBOXED + paths + [("filter-syscalls", flt)])
            assert res.status == BuildStatus.BUILT, res.error_msg
            results.append([read_out(os.path.join(out, n)).strip()
                            for n in ("suid", "sgid", "xattr", "status")])
            # whatever it managed, the registered output is canonical (no setid bits)
            assert not os.stat(os.path.join(out, "f")).st_mode & 0o6000
        finally:
            store.close()
    assert results[0] == ["denied", "denied", "Operation not supported", "NoNewPrivs: 1\nSeccomp: 2"]
    assert results[1][:3] == ["allowed", "allowed", "allowed"]


def test_cannot_see_other_processes(tmp_path):
    host = subprocess.Popen(["sleep", "60"])
    try:
        script = (f'test -e /proc/{host.pid} && echo seen > $out || echo unseen > $out; '
                  'ls /proc | grep -c "^[0-9]" >> $out')
        inside, outside = both(tmp_path, "procs", script)
        assert inside.splitlines()[0] == "unseen" and outside.splitlines()[0] == "seen"
        assert int(inside.splitlines()[1]) <= 3  # sh, ls, grep
    finally:
        host.kill()
        host.wait()


def _processes_with(marker: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return out


def test_cannot_leave_a_process_behind(tmp_path):
    marker = f"left-behind-{os.getpid()}-{id(tmp_path)}"
    script = (f'setsid sh -c "sleep 300; echo {marker}" > /dev/null 2>&1 < /dev/null & '
              'sleep 1; echo ok > $out')
    try:
        both(tmp_path, "daemonize", script)
        time.sleep(0.3)
        # only the unsandboxed build's process is left (there are no build users here)
        left = _processes_with(marker)
        assert len(left) == 1, left
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, 9)


def test_sees_only_its_input_closure_under_the_store_dir(tmp_path):
    for kind in ("root", "real"):
        if kind == "root":
            store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
        else:
            b = str(tmp_path / "real")
            store = LocalStore(LocalLayout.custom(b + "/store", b + "/state", b + "/log"))
        try:
            other = store.add_text("other", b"not an input\n").path
            dep = store.add_text("dep", b"an input's reference\n").path
            inp = store.add_text("input", store.store_dir.print(dep).encode(), [dep]).path
            bb = shell_path(store)
            # (without build users the builder is the inputs' owner inside: only the
            # read-only mount stops the chmod)
            p = store.store_dir.print(inp)
            drv = add_drv(store, "closure", 'ls $NIX_STORE > $TMPDIR/l; '
                          f'chmod u+w {p} 2>/dev/null && echo chmod >> $TMPDIR/l; '
                          f'echo x > {p} 2>/dev/null && echo wrote >> $TMPDIR/l; '
                          'mv $TMPDIR/l $out', srcs=(inp,))
            res, out = build(store, drv, SANDBOXED if kind == "root" else UNSANDBOXED)
            assert res.status == BuildStatus.BUILT, res.error_msg
            seen = read_out(out).split()
            if kind == "root":
                assert sorted(seen) == sorted(p.base for p in (bb, inp, dep))
            else:
                assert other.base in seen and "chmod" in seen and "wrote" in seen
        finally:
            store.close()


# --- settings ------------------------------------------------------------------------------

def test_no_chroot_is_an_error_with_sandbox_true_and_unsandboxed_when_relaxed(tmp_path):
    b = str(tmp_path / "real")
    store = LocalStore(LocalLayout.custom(b + "/store", b + "/state", b + "/log"))
    try:
        script = "hostname > $out"
        drv = add_drv(store, "nochroot", script, env={"__noChroot": "1"})
        res, _ = build(store, drv, [("sandbox", "true"), ("build-users-group", "")])
        assert res.status == BuildStatus.MISC_FAILURE
        assert "has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'" in res.error_msg
        res, out = build(store, drv, [("sandbox", "relaxed"), ("build-users-group", "")])
        assert res.status == BuildStatus.BUILT, res.error_msg
        assert read_out(out) == socket.gethostname() + "\n"
        # relaxed sandboxes the rest
        res, out = build(store, add_drv(store, "relaxed", script),
                         [("sandbox", "relaxed"), ("build-users-group", "")])
        assert res.status == BuildStatus.BUILT and read_out(out) == "localhost\n"
    finally:
        store.close()


def test_untrusted_clients_cannot_turn_the_sandbox_off():
    from storekeeper.config.settings import client_may_set
    for name in ("sandbox", "sandbox-fallback", "sandbox-paths", "extra-sandbox-paths",
                 "sandbox-build-dir", "build-dir"):
        assert client_may_set(name, "false", False, lambda n: None, lambda m: None) is None


@needs_root
def test_with_build_users_the_builder_is_1000_inside_and_the_build_user_outside(tmp_path):
    store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    try:
        drv = add_drv(store, "users", 'id -u > $out; id -g >> $out; stat -c "%u %g" /build >> $out')
        res, out = build(store, drv, [("sandbox", "true"), ("build-users-group", "nixbld")])
        if res.status != BuildStatus.BUILT and "group 'nixbld'" in res.error_msg:
            pytest.skip(res.error_msg)
        assert res.status == BuildStatus.BUILT, res.error_msg
        assert read_out(out).split() == ["1000", "100", "1000", "100"]
    finally:
        store.close()


def test_storekeeper_build_on_a_chroot_store(tmp_path):
    """``storekeeper --store DIR build DRV`` (a chroot store: sandboxed, whatever the
    settings say) prints the output path and registers it."""
    root = str(tmp_path / "root")
    store = LocalStore(LocalLayout.chroot(root))
    try:
        drv = add_drv(store, "cli", "echo built-by-cli > $out")
        printed = store.store_dir.print(drv)
    finally:
        store.close()
    env = {**os.environ, "NIX_CONF_DIR": str(tmp_path), "NIX_REMOTE": ""}
    (tmp_path / "nix.conf").write_text("build-users-group =\nsandbox = false\n")
    cli = [sys.executable, "-m", "storekeeper.cli.main"]
    r = subprocess.run([*cli, "--store", root, "build", printed], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    [out] = r.stdout.split()
    assert out.startswith("/nix/store/") and out.endswith("-cli")
    with open(root + out) as f:
        assert f.read() == "built-by-cli\n"
    store = LocalStore(LocalLayout.chroot(root))
    try:
        assert store.is_valid(store.parse_path(out))
    finally:
        store.close()


# --- real users, the default store, real nix-build -----------------------------------------------

def _bb_dir(home: str, uid: int, gid: int) -> str:
    """``<home>/bb`` with ``busybox`` and ``sh -> busybox``, owned by the user."""
    d = os.path.join(home, "bb")
    os.mkdir(d)
    shutil.copy(BUSYBOX, os.path.join(d, "busybox"))
    os.symlink("busybox", os.path.join(d, "sh"))
    for p in (d, os.path.join(d, "busybox")):
        os.chown(p, uid, gid)
    os.lchown(os.path.join(d, "sh"), uid, gid)
    return d


@needs_nix
@needs_root_users
def test_real_nix_build_as_a_plain_user_on_the_default_store(shared_dir):
    """A plain user, nothing but the README's commands: ``storekeeper daemon`` on the
    embedded default store (logical /nix/store under ~/.local/share), and the real
    nix-build of a busybox derivation through it: built in a user namespace (uid 1000
    inside), output registered."""
    with real_users(shared_dir, "p") as users:
        u = users["p"]
        data = os.path.join(u.home, ".local", "share")
        _bb_dir(u.home, u.pw_uid, u.pw_gid)
        env = {"XDG_DATA_HOME": data}
        proc = spawn_as(u, [*SK, "daemon"], env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
        try:
            root = os.path.join(data, "storekeeper", "root")
            deadline = time.monotonic() + 30
            sock = None
            while time.monotonic() < deadline and sock is None:
                for dirpath, _, files in os.walk(root):
                    if "socket" in files and dirpath.endswith("daemon-socket"):
                        sock = os.path.join(dirpath, "socket")
                if proc.poll() is not None:
                    pytest.fail(proc.stderr.read().decode())
                time.sleep(0.1)
            assert sock is not None
            expr = (f'derivation {{ name = "plain"; system = "{SYSTEM}"; builder = "${{./bb}}/sh"; '
                    'args = ["-c" "id -u > $out; id -g >> $out; echo $NIX_BUILD_TOP >> $out"]; }')
            etc = os.path.join(u.home, "etc")
            os.mkdir(etc)
            with open(os.path.join(etc, "nix.conf"), "w") as f:
                f.write("substituters =\n")
            nix_env = {"NIX_CONF_DIR": etc, "NIX_STATE_DIR": os.path.join(u.home, "nixstate"),
                       "NIX_LOG_DIR": os.path.join(u.home, "nixlog"),
                       "XDG_CACHE_HOME": os.path.join(u.home, ".cache"),
                       "NIX_REMOTE": f"unix://{sock}?root={root}"}
            r = as_user(u, ["nix-build", "--no-out-link", "-E", expr], env=nix_env)
            assert r.returncode == 0, r.stderr
            out = r.stdout.strip()
            assert out.startswith("/nix/store/") and out.endswith("-plain")
            with open(root + out) as f:
                assert f.read().split() == ["1000", "100", "/build"]
            st = os.lstat(root + out)
            assert (st.st_uid, st.st_mode & 0o777) == (u.pw_uid, 0o444)
            store_dir = os.path.join(root, "nix", "store")
            assert not [n for n in os.listdir(store_dir) if n.endswith(".chroot")]
            r = as_user(u, [*SK, "query", "--hash", out], env=env)
            assert r.returncode == 0 and r.stdout.startswith("sha256:"), r.stderr
        finally:
            stop(proc)


@needs_nix
def test_real_nix_build_against_a_root_daemon_with_build_users(area_factory, build_users):
    """The real nix-build against our daemon as root with build users and ``sandbox =
    true``: inside, uid 1000 / gid 100 (the build user outside); the output registered,
    owned by root, and no chroot dir left in the store dir."""
    group, _ = build_users
    a = area_factory(conf=f"build-users-group = {group}\nsandbox = true\n")
    a.start("ours")
    d = os.path.join(a.work, "bb")
    os.mkdir(d)
    shutil.copy(BUSYBOX, os.path.join(d, "busybox"))
    os.symlink("busybox", os.path.join(d, "sh"))
    expr = (f'derivation {{ name = "users"; system = "{SYSTEM}"; builder = "${{./bb}}/sh"; '
            'args = ["-c" "id -u > $out; id -g >> $out; stat -c %u:%g /build >> $out; '
            'ls /proc > p; grep -c ^[0-9] p >> $out"]; }')
    r = a.run(["nix-build", "--no-out-link", "-E", expr])
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode().strip()
    # (the sandbox's processes while ls ran: the builder and ls; not a pipe, whose
    # grep may or may not have been forked yet)
    assert read_out(out).split() == ["1000", "100", "1000:100", "2"]
    assert os.lstat(out).st_uid == 0
    assert not [n for n in os.listdir(a.store) if n.endswith(".chroot")]
    with a.local_store() as store:
        assert store.is_valid(store.parse_path(out))


def test_builtin_fetchurl_runs_in_the_sandbox_of_a_chroot_store(tmp_path):
    """builtin:fetchurl (our Python, as a child) on a chroot store: sandboxed (forced),
    with the host network as a fixed output, and its output lands at the logical path."""
    body = b"fetched by the builtin\n"
    srv = _Listener(body)
    store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    try:
        sd = store.store_dir
        h = hashlib.sha256(body).hexdigest()
        drv = Derivation(outputs={"out": DerivationOutput(hash_algo="sha256", hash=h)},
                         platform="builtin", builder="builtin:fetchurl", args=[],
                         env={"builder": "builtin:fetchurl", "name": "fetched", "system": "builtin",
                              "url": f"http://127.0.0.1:{srv.port}/x", "outputHash": h,
                              "outputHashAlgo": "sha256", "outputHashMode": "flat",
                              "executable": "", "unpack": "", "urls": f"http://127.0.0.1:{srv.port}/x"})
        drv = fill_output_paths(drv, sd, read_drv=None)
        path = store.add_text("fetched.drv", print_derivation(drv)).path
        res, out = build(store, path, SANDBOXED)
        assert res.status == BuildStatus.BUILT, res.error_msg
        assert read_out(out) == body.decode() and srv.hits == 1
    finally:
        store.close()
        srv.close()


@needs_nix
@needs_root_users
def test_an_unprivileged_daemon_builds_for_other_users_in_the_sandbox(shared_dir):
    """With ``sandbox = true`` an unprivileged daemon builds for an untrusted user (with
    ``sandbox = false`` it refuses: tests/test_build_confine.py), and the builder, though
    its host uid is the daemon's, cannot reach the daemon's database."""
    with real_users(shared_dir, "d", "a") as users:
        owner, alice = users["d"], users["a"]
        srv = os.path.join(shared_dir, "srv")
        proc, sock, _ = start_daemon_as(owner, srv, "sandbox = true\nsubstituters =\n")
        try:
            store = os.path.join(srv, "store")
            db = os.path.join(srv, "state", "db", "db.sqlite")
            with open(db, "rb") as f:
                before = f.read()
            _bb_dir(alice.home, alice.pw_uid, alice.pw_gid)
            expr = (f'derivation {{ name = "alices"; system = "{SYSTEM}"; builder = "${{./bb}}/sh"; '
                    f'args = ["-c" "echo pwned >> {db} 2>/dev/null && echo wrote > $out || '
                    'echo refused > $out"]; }')
            etc = os.path.join(alice.home, "etc")
            os.mkdir(etc)
            with open(os.path.join(etc, "nix.conf"), "w") as f:
                f.write("substituters =\n")
            env = {"NIX_CONF_DIR": etc, "NIX_STATE_DIR": os.path.join(alice.home, "nixstate"),
                   "NIX_LOG_DIR": os.path.join(alice.home, "nixlog"), "NIX_STORE_DIR": store,
                   "XDG_CACHE_HOME": os.path.join(alice.home, ".cache"),
                   "NIX_REMOTE": f"unix://{sock}"}
            r = as_user(alice, ["nix-build", "--no-out-link", "-E", expr], env=env)
            assert r.returncode == 0, r.stderr
            out = r.stdout.strip()
            assert read_out(out) == "refused\n"
            with open(db, "rb") as f:
                assert b"pwned" not in f.read() and before
        finally:
            stop(proc)


def test_fallback_when_the_kernel_refuses_namespaces(tmp_path, monkeypatch):
    """``sandbox-fallback = true``: unsandboxed, with one warning line (once per process);
    false: the build fails; a chroot store cannot build at all without the sandbox."""
    why = "the kernel refuses user, mount, pid and network namespaces here (test)"
    monkeypatch.setattr(sandbox_mod, "unavailable", lambda: why)
    monkeypatch.setattr(sandbox_mod, "_warned", set())
    b = str(tmp_path / "real")
    store = LocalStore(LocalLayout.custom(b + "/store", b + "/state", b + "/log"))
    try:
        settings = [("sandbox", "true"), ("build-users-group", "")]
        res, out = build(store, add_drv(store, "fb1", "hostname > $out"), settings)
        assert res.status == BuildStatus.BUILT, res.error_msg
        assert read_out(out) == socket.gethostname() + "\n"
        assert res.log.count("warning: building without the sandbox: " + why) == 1
        res, _ = build(store, add_drv(store, "fb2", "hostname > $out"), settings)
        assert res.status == BuildStatus.BUILT and "warning" not in res.log
        res, _ = build(store, add_drv(store, "fb3", "hostname > $out"),
                       settings + [("sandbox-fallback", "false")])
        assert res.status == BuildStatus.MISC_FAILURE
        assert res.error_msg.endswith(f"in a sandbox: {why} (set 'sandbox = false', or "
                                      "'sandbox-fallback = true')")
    finally:
        store.close()
    chroot = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    try:
        res, _ = build(chroot, add_drv(chroot, "fb4", "hostname > $out"), SANDBOXED)
        assert res.status == BuildStatus.MISC_FAILURE
        assert "builds need a store whose store dir is real on this machine, or the sandbox" \
            in res.error_msg
    finally:
        chroot.close()


def test_check_rebuilds_in_the_sandbox(chroot_store):
    """``--check`` builds a valid output again at a scratch path, in the sandbox too:
    a deterministic builder passes, one that differs is reported."""
    drv = add_drv(chroot_store, "det", "echo same > $out")
    nondet = add_drv(chroot_store, "nondet", "cat /proc/sys/kernel/random/uuid > $out")
    for d in (drv, nondet):
        res, _ = build(chroot_store, d, SANDBOXED)
        assert res.status == BuildStatus.BUILT, res.error_msg
    st = BuildSettings().with_settings(SANDBOXED)
    [res] = Builder(chroot_store, st).build([DerivedPath(drv, frozenset({"out"}))], BuildMode.CHECK)
    assert res.status == BuildStatus.BUILT, res.error_msg
    [res] = Builder(chroot_store, st).build([DerivedPath(nondet, frozenset({"out"}))],
                                            BuildMode.CHECK)
    assert res.status == BuildStatus.NOT_DETERMINISTIC, res.error_msg


def test_pass_as_file_names_the_file_inside(chroot_store):
    drv = add_drv(chroot_store, "paf", 'echo "$fooPath" > $out; cat "$fooPath" >> $out',
                  env={"passAsFile": "foo", "foo": "passed as a file"})
    res, out = build(chroot_store, drv, SANDBOXED)
    assert res.status == BuildStatus.BUILT, res.error_msg
    path, content = read_out(out).splitlines()
    assert path.startswith("/build/.attr-") and content == "passed as a file"


def test_sandbox_build_dir_and_extra_sandbox_paths(chroot_store, tmp_path):
    host_dir = tmp_path / "shared-in"
    host_dir.mkdir()
    (host_dir / "f").write_text("from the host\n")
    drv = add_drv(chroot_store, "bdir", 'echo "$NIX_BUILD_TOP $PWD" > $out; '
                  'grep ^nixbld /etc/passwd >> $out; cat /opt/in/f >> $out; '
                  'echo x > /opt/in/g 2>/dev/null && echo wrote >> $out; true')
    res, out = build(chroot_store, drv, SANDBOXED + [("sandbox-build-dir", "/sbx/top"),
                                                    ("extra-sandbox-paths", f"/opt/in={host_dir}")])
    assert res.status == BuildStatus.BUILT, res.error_msg
    assert read_out(out).splitlines() == [
        "/sbx/top /sbx/top", "nixbld:x:1000:100:Nix build user:/sbx/top:/noshell", "from the host"]
    assert not (host_dir / "g").exists()


def test_timeouts_kill_a_sandboxed_builder_and_everything_it_started(chroot_store):
    marker = f"sandbox-timeout-{os.getpid()}"
    drv = add_drv(chroot_store, "slow", f'setsid sh -c "sleep 300; echo {marker}" & '
                  'echo started; while :; do :; done')
    t = time.monotonic()
    res, _ = build(chroot_store, drv, SANDBOXED + [("timeout", "2")])
    assert res.status == BuildStatus.TIMED_OUT, res.error_msg
    assert time.monotonic() - t < 30
    time.sleep(0.3)
    assert _processes_with(marker) == []
    # a builder that cannot be executed: the same line as without the sandbox
    sd = chroot_store.store_dir
    bb = shell_path(chroot_store)
    missing = Derivation(outputs={"out": DerivationOutput()}, platform=SYSTEM,
                         builder=sd.print(bb) + "/no-such-builder", args=[],
                         env={"builder": "x", "name": "missing", "system": SYSTEM},
                         input_srcs=[sd.print(bb)])
    missing = fill_output_paths(missing, sd, read_drv=None)
    path = chroot_store.add_text("missing.drv", print_derivation(missing), [bb]).path
    res, _ = build(chroot_store, path, SANDBOXED)
    assert res.status == BuildStatus.PERMANENT_FAILURE
    assert f"> executing '{sd.print(bb)}/no-such-builder': No such file or directory" \
        in res.error_msg
