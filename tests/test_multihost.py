"""Clients on another host: two network namespaces on this machine stand for two hosts.

Host A (namespace ``skhA<pid>``) runs the daemon, listening on its Unix
socket and on TCP at 10.254.77.1 (a /30 that exists only inside the two
namespaces, joined by a veth pair); host B (``skhB<pid>``, 10.254.77.2) runs
the clients, as real users made with ``useradd``.  "ssh" is a script that
runs ``daemon --stdio`` in namespace A as the user named in the URL, as sshd
would.  The file system is shared (one machine), but every byte between the
hosts goes over the veth pair or through the substitute ssh.

Needs root, ``ip netns``, ``useradd`` and ``runuser``; skips cleanly otherwise,
and always deletes its namespaces and users.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from daemon_util import stop_process, wait_for_socket
from test_tcp_auth import wait_for_line

from storekeeper.daemon.tcp import NOT_AUTHENTICATED
from storekeeper.fs.private import read_key_file

HOST_A, HOST_B = "10.254.77.1", "10.254.77.2"
SK = os.path.join(os.path.dirname(sys.executable), "storekeeper")


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"skprobe{os.getpid() % 100000}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None
                       or shutil.which("runuser") is None,
                       reason="needs root, useradd and runuser to create real users"),
    pytest.mark.skipif(not _netns_usable(), reason="needs root and a working 'ip netns'"),
]


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass
class Hosts:
    a: str
    b: str


#: each "host" also gets a UTS namespace with a name of its own (clients name their
#: runtime-root leases after their host)
HOSTNAMES: dict[str, str] = {}


@pytest.fixture
def hosts():
    tag = str(os.getpid() % 100000)
    a, b = f"skhA{tag}", f"skhB{tag}"
    made: list[str] = []
    try:
        for ns in (a, b):
            ip("netns", "add", ns)
            made.append(ns)
        # Both ends are created inside the namespaces: nothing appears in ours.
        ip("link", "add", f"skva{tag}", "netns", a, "type", "veth", "peer", "name", f"skvb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"skva{tag}", HOST_A), (b, f"skvb{tag}", HOST_B)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
        HOSTNAMES.update({a: "skhosta", b: "skhostb"})
        yield Hosts(a, b)
    finally:
        HOSTNAMES.clear()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home_a: str  # their home on host A
    home_b: str  # and on host B


@pytest.fixture
def users(shared_dir):
    names = [f"skm{os.getpid() % 100000}{c}" for c in "ab"]
    made = []
    try:
        out = []
        for n in names:
            subprocess.run(["useradd", "-M", "-N", "-s", "/bin/sh", n], check=True, capture_output=True)
            made.append(n)
            pw = pwd.getpwnam(n)
            homes = []
            for h in ("a", "b"):
                home = os.path.join(shared_dir, f"home-{n}-{h}")
                os.mkdir(home, 0o700)
                os.chown(home, pw.pw_uid, pw.pw_gid)
                homes.append(home)
            out.append(User(n, pw.pw_uid, pw.pw_gid, *homes))
        yield out
    finally:
        for n in made:
            subprocess.run(["userdel", n], capture_output=True)


def run_on(ns: str, user: User | None, home: str, *argv: str, env: dict | None = None,
           timeout: float = 60, input: str = "") -> subprocess.CompletedProcess:
    """``argv`` in namespace ``ns`` as ``user`` (root if None), with a minimal environment."""
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home,
            "XDG_CONFIG_HOME": os.path.join(home, ".config"), "NIX_CONF_DIR": os.path.join(home, "etc")}
    base.update(env or {})
    cmd = ["ip", "netns", "exec", ns]
    if ns in HOSTNAMES:
        cmd += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', HOSTNAMES[ns]]
    if user is not None:
        cmd += ["runuser", "-u", user.name, "--"]
    cmd += ["env", "-i", *(f"{k}={v}" for k, v in base.items()), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)


class DaemonOnA:
    """Our daemon in namespace A, run by root, on the store's default socket and on TCP."""

    def __init__(self, hosts: Hosts, base: str, *args: str, custom: bool = False,
                 nix_conf: str = "") -> None:
        """A chroot store at ``base``/root, or (``custom``) a store whose store dir is real
        here (``base``/store, as a client on host B sees it on the shared file system)."""
        if custom:
            self.root = self.store_dir = os.path.join(base, "store")
            self.state = os.path.join(base, "state")
            self.url = f"local?store={self.store_dir}&state={self.state}&log={base}/log"
        else:
            self.root = os.path.join(base, "root")
            self.store_dir = "/nix/store"
            self.state = os.path.join(self.root, "nix/var/nix")
            self.url = self.root
        self.sock = os.path.join(self.state, "daemon-socket/socket")
        self.log_path = os.path.join(base, "daemon.log")
        self._log = open(self.log_path, "ab")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NIX_CONF_DIR": os.path.join(base, "etc-d")}
        os.makedirs(env["NIX_CONF_DIR"], exist_ok=True)
        with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "w") as f:
            f.write(nix_conf)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", hosts.a, sys.executable, "-m", "storekeeper.daemon", "--store",
             self.url, "--listen-tcp", f"{HOST_A}:0", "--listen-tcp", ":0", "-v", *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for_socket(self.sock, self.proc)
            self.port = int(wait_for_line(self.log_path, rf"listening on tcp {re.escape(HOST_A)}:(\d+)",
                                          self.proc)[1])
            self.loopback_port = int(wait_for_line(self.log_path, r"listening on tcp 127\.0\.0\.1:(\d+)",
                                                   self.proc)[1])
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def daemon_a(hosts, shared_dir):
    d = DaemonOnA(hosts, shared_dir)
    yield d
    d.stop()


def tcp_url(daemon: DaemonOnA, key: str | None = None, port: int | None = None) -> str:
    params = [f"key={key}"] if key else []
    if daemon.store_dir != "/nix/store":
        params.append(f"store={daemon.store_dir}")
    return f"tcp://{HOST_A}:{port or daemon.port}" + ("?" + "&".join(params) if params else "")


def write_file(path: str, text: str, user: User, mode: int = 0o644) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, user.uid, user.gid)
    os.chmod(path, mode)
    return path


def issue_key_on_a(hosts: Hosts, daemon: DaemonOnA, user: User | None, home: str) -> str:
    """``tcp-key issue`` on host A over the Unix socket; returns the key file's path."""
    r = run_on(hosts.a, user, home, SK, "--store", f"unix://{daemon.sock}", "tcp-key", "issue")
    assert r.returncode == 0, r.stderr
    name = user.name if user else "root"
    assert f"issued a TCP key for user '{name}'" in r.stderr
    return r.stdout.strip()


def copy_key_to_b(src: str, user: User) -> str:
    """What the user does by hand: the key file, mode 0600, into their config dir on host B."""
    d = os.path.join(user.home_b, ".config", "storekeeper")
    os.makedirs(d, mode=0o700, exist_ok=True)
    for p in (os.path.join(user.home_b, ".config"), d):
        os.chown(p, user.uid, user.gid)
    dst = os.path.join(d, "tcp-key")
    shutil.copyfile(src, dst)
    os.chown(dst, user.uid, user.gid)
    os.chmod(dst, 0o600)
    return dst


def test_tcp_clients_on_another_host_are_the_users_whose_keys_they_hold(hosts, users, daemon_a, shared_dir):
    alice, bob = users
    root_home = os.path.join(shared_dir, "home-root")
    os.makedirs(root_home, exist_ok=True)
    key_a = issue_key_on_a(hosts, daemon_a, alice, alice.home_a)
    assert key_a == os.path.join(alice.home_a, ".config/storekeeper/tcp-key")
    assert os.stat(key_a).st_mode & 0o777 == 0o600 and os.stat(key_a).st_uid == alice.uid
    assert os.stat(os.path.join(daemon_a.state, "tcp-keys", str(alice.uid))).st_uid == 0
    copy_key_to_b(key_a, alice)

    # alice on host B: add, then query, over TCP (default key location)
    src = write_file(os.path.join(alice.home_b, "notes.txt"), "alice's notes from host B\n", alice)
    r = run_on(hosts.b, alice, alice.home_b, SK, "--store", tcp_url(daemon_a), "add", src)
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert path.startswith("/nix/store/") and path.endswith("-notes.txt")
    r = run_on(hosts.b, alice, alice.home_b, SK, "--store", tcp_url(daemon_a), "query", "--hash", path)
    assert r.returncode == 0 and r.stdout.startswith("sha256:"), r.stderr
    r2 = run_on(hosts.a, None, root_home, SK, "--store", f"unix://{daemon_a.sock}", "query", "--hash", path)
    assert r2.stdout == r.stdout
    assert re.search(rf"authenticated as user '{alice.name}' \(uid {alice.uid}, tcp from "
                     rf"{re.escape(HOST_B)}:\d+\)$", daemon_a.log(), re.M)  # untrusted: no "(trusted)"

    # an untrusted TCP peer cannot do trusted-only ops; root over TCP can
    r = run_on(hosts.b, alice, alice.home_b, SK, "--store", tcp_url(daemon_a), "verify", "--repair")
    assert r.returncode != 0 and "you are not privileged to repair paths" in r.stderr
    root_key = issue_key_on_a(hosts, daemon_a, None, root_home)
    r = run_on(hosts.b, None, root_home, SK, "--store", tcp_url(daemon_a, root_key), "verify", "--repair")
    assert r.returncode == 0, r.stderr
    assert re.search(rf"authenticated as user 'root' \(uid 0, tcp from {re.escape(HOST_B)}:\d+\) \(trusted\)",
                     daemon_a.log())

    # bob on host B: a made-up key, alice's name with a made-up key, his name with alice's key
    def bob_with(name: str, key_hex: str) -> str:
        f = write_file(os.path.join(bob.home_b, "k"), f"user {name}\nkey {key_hex}\n", bob, 0o600)
        r = run_on(hosts.b, bob, bob.home_b, SK, "--store", tcp_url(daemon_a, f), "query", "--hash", path)
        assert r.returncode != 0
        return r.stderr
    alice_key_hex = read_key_file(key_a, alice.uid)[1].hex()
    # the same answer whether the user has no key or a different one (the log says which)
    assert NOT_AUTHENTICATED in bob_with(bob.name, alice_key_hex)
    issue_key_on_a(hosts, daemon_a, bob, bob.home_a)
    assert NOT_AUTHENTICATED in bob_with(bob.name, alice_key_hex)
    assert NOT_AUTHENTICATED in bob_with(alice.name, "ab" * 32)
    # a copy of alice's key file left readable by others: bob's client will not use it
    careless = os.path.join(shared_dir, "alice-key-copy")
    shutil.copyfile(key_a, careless)
    os.chown(careless, alice.uid, alice.gid)
    os.chmod(careless, 0o644)
    r = run_on(hosts.b, bob, bob.home_b, SK, "--store", tcp_url(daemon_a, careless), "query", "--hash", path)
    assert r.returncode != 0 and f"belongs to uid {alice.uid}, not to uid {bob.uid}" in r.stderr
    # "--listen-tcp :0" bound loopback on host A: host B cannot reach it
    r = run_on(hosts.b, alice, alice.home_b, SK, "--store", tcp_url(daemon_a, port=daemon_a.loopback_port),
               "query", "--hash", path)
    assert r.returncode != 0 and "Connection refused" in r.stderr
    assert daemon_a.proc.poll() is None


def fake_ssh(base: str, hosts: Hosts) -> str:
    """An 'ssh' for host B: logs in to host A (10.254.77.1 only) as USER in USER@HOST, as sshd
    would (a fresh environment), and runs the command there with the user's shell.  Run by
    a user other than root it can only log in as that same user, and runs the command in
    its own namespace (the daemon's Unix socket is on the shared file system)."""
    path = os.path.join(base, "fake-ssh")
    with open(path, "w") as f:
        f.write(f"""#!/bin/sh
# like OpenSSH: options before and after the destination, then the command
dest=
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; [ -n "$dest" ] || {{ dest=$1; shift; }}; break;;
        -i|-p|-o|-F|-l) shift 2;;
        -*) shift;;
        *) [ -n "$dest" ] && break; dest=$1; shift;;
    esac
done
case "$dest" in *@*) user=${{dest%@*}}; host=${{dest#*@}};; *) user=$(id -un); host=$dest;; esac
[ "$host" = "{HOST_A}" ] || {{ echo "ssh: connect to host $host: No route to host" >&2; exit 255; }}
echo "$user@$host" >> {base}/ssh-logins
if [ "$(id -u)" != 0 ]; then
    [ "$user" = "$(id -un)" ] || {{ echo "$user@$host: Permission denied (publickey)." >&2; exit 255; }}
    exec env -i PATH=/usr/bin:/bin HOME=/ NIX_CONF_DIR={base}/etc-ssh sh -c "$*"
fi
exec ip netns exec {hosts.a} unshare --uts sh -c 'hostname skhosta && exec "$@"' sh \\
    runuser -u "$user" -- env -i PATH=/usr/bin:/bin HOME=/ NIX_CONF_DIR={base}/etc-ssh sh -c "$*"
""")
    os.chmod(path, 0o755)
    os.makedirs(os.path.join(base, "etc-ssh"), exist_ok=True)
    logins = os.path.join(base, "ssh-logins")
    open(logins, "a").close()
    os.chmod(logins, 0o666)  # (also written when a user runs it)
    return path


def ssh_url(user: str, store: str, store_dir: str = "/nix/store") -> str:
    url = f"ssh-ng://{user}@{HOST_A}?remote-program={SK}%20daemon&remote-store={quote(store, safe='/')}"
    return url + (f"&store={store_dir}" if store_dir != "/nix/store" else "")


def test_ssh_stdio_clients_are_seen_as_the_user_ssh_logged_in(hosts, users, daemon_a, shared_dir):
    alice, bob = users
    env = {"STOREKEEPER_SSH": fake_ssh(shared_dir, hosts)}
    here = os.path.join(shared_dir, "client-b")  # root's home on host B, where the client runs
    os.makedirs(here)

    def ssh(user: str, *argv: str, store: str = daemon_a.root) -> subprocess.CompletedProcess:
        return run_on(hosts.b, None, here, SK, "--store", ssh_url(user, store), *argv, env=env)

    # alice: through the relay the daemon sees alice (SO_PEERCRED of the stdio process)
    r = ssh(alice.name, "add-text", "from-b.txt", "-")
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    r = ssh(alice.name, "tcp-key", "issue", "--output", os.path.join(here, "alice.key"))
    assert r.returncode == 0, r.stderr
    assert f"issued a TCP key for user '{alice.name}' (uid {alice.uid})" in r.stderr
    keys = os.path.join(daemon_a.state, "tcp-keys")
    assert sorted(os.listdir(keys)) == [str(alice.uid)]
    # per-user ops act for the logged-in user only: bob's revoke leaves alice's key alone
    r = ssh(bob.name, "tcp-key", "revoke")
    assert r.returncode == 0 and "you had no TCP key" in r.stderr, r.stderr
    assert sorted(os.listdir(keys)) == [str(alice.uid)]
    # untrusted as alice, trusted as root
    r = ssh(alice.name, "verify", "--repair")
    assert r.returncode != 0 and "you are not privileged to repair paths" in r.stderr
    r = ssh("root", "verify", "--repair")
    assert r.returncode == 0, r.stderr
    log = daemon_a.log()
    assert re.search(rf"connection from user '{alice.name}' \(uid {alice.uid}, pid \d+\): child", log)
    assert re.search(rf"connection from user '{bob.name}' \(uid {bob.uid}, pid \d+\): child", log)
    # the key alice got through ssh works over TCP from host B
    copy_key_to_b(os.path.join(here, "alice.key"), alice)
    r = run_on(hosts.b, alice, alice.home_b, SK, "--store", tcp_url(daemon_a), "query", "--hash", path)
    assert r.returncode == 0, r.stderr

    # ssh to a host that is not there
    r = run_on(hosts.b, None, here, SK, "--store", f"ssh-ng://{alice.name}@10.254.77.3", "init", env=env)
    assert r.returncode != 0 and "No route to host" in r.stderr and "exited with status 255" in r.stderr

    # No daemon: the stdio process serves the store itself with the user's own rights
    daemon_a.stop()
    own = os.path.join(alice.home_a, "store")
    r = ssh(alice.name, "add-text", "mine.txt", "-", store=own)
    assert r.returncode == 0, r.stderr
    mine = r.stdout.strip()
    real = os.path.join(own, mine.lstrip("/"))
    assert os.path.isfile(real) and os.stat(os.path.join(own, "nix/var/nix/db/db.sqlite")).st_uid == alice.uid
    # ... and cannot write a store it does not own
    r = ssh(alice.name, "add-text", "sneaky.txt", "-")
    assert r.returncode != 0
    assert not any(n.endswith("-sneaky.txt") for n in os.listdir(os.path.join(daemon_a.root, "nix/store")))
    with open(os.path.join(shared_dir, "ssh-logins")) as f:
        assert f.read().split() == [f"{alice.name}@{HOST_A}"] * 2 + [f"{bob.name}@{HOST_A}"] \
            + [f"{alice.name}@{HOST_A}", f"root@{HOST_A}", f"{alice.name}@{HOST_A}", f"{alice.name}@{HOST_A}"]


@pytest.mark.parametrize("transport", ["unix-on-A", "tcp-from-B", "ssh-from-B"])
def test_every_command_answers_the_same_over_each_transport(transport, hosts, users, daemon_a, shared_dir):
    """The same user's session gives the same answers over all three transports (a hook for
    ops that depend on the peer: run them through :func:`as_alice`)."""
    alice, _ = users
    env = {"STOREKEEPER_SSH": fake_ssh(shared_dir, hosts)}
    copy_key_to_b(issue_key_on_a(hosts, daemon_a, alice, alice.home_a), alice)
    src = write_file(os.path.join(alice.home_a, "dep.txt"), "a dependency\n", alice)
    dep = run_on(hosts.a, alice, alice.home_a, SK, "--store", f"unix://{daemon_a.sock}", "add", src).stdout.strip()

    def as_alice(*argv: str) -> subprocess.CompletedProcess:
        if transport == "unix-on-A":
            return run_on(hosts.a, alice, alice.home_a, SK, "--store", f"unix://{daemon_a.sock}", *argv)
        if transport == "tcp-from-B":
            return run_on(hosts.b, alice, alice.home_b, SK, "--store", tcp_url(daemon_a), *argv)
        # ssh: a client on B (root there) logs in to A as alice
        return run_on(hosts.b, None, alice.home_b, SK, "--store", ssh_url(alice.name, daemon_a.root),
                      *argv, env=env)

    out = {}
    r = as_alice("add-text", "top.txt", "-", "--ref", dep)
    assert r.returncode == 0, r.stderr
    top = r.stdout.strip()
    for name, argv in {"refs": ["query", "--references", top],
                       "closure": ["query", "--requisites", top],
                       "referrers": ["query", "--referrers", dep],
                       "info": ["path-info", "--json", "-r", top],
                       "dump": ["dump", dep],
                       "verify": ["verify", "--json"]}.items():
        r = as_alice(*argv)
        assert r.returncode == 0, (name, r.stderr)
        out[name] = r.stdout
    assert out["refs"].split() == [dep]
    assert sorted(out["closure"].split()) == sorted([dep, top])
    assert top in out["referrers"]
    assert "nix-archive-1" in out["dump"] and "a dependency" in out["dump"]
    assert '"errors": []' in out["verify"]
    r = as_alice("verify", "--repair")
    assert r.returncode != 0 and "not privileged" in r.stderr  # alice, whatever the transport
    who = {"unix-on-A": rf"connection from user '{alice.name}' \(uid {alice.uid}, pid \d+\)",
           "ssh-from-B": rf"connection from user '{alice.name}' \(uid {alice.uid}, pid \d+\)",
           "tcp-from-B": rf"authenticated as user '{alice.name}' \(uid {alice.uid}, tcp from {re.escape(HOST_B)}"}
    assert re.search(who[transport], daemon_a.log())


def _has_runtime_root_op() -> bool:
    from storekeeper.daemon import server  # noqa: F401 -- loads every op module
    from storekeeper.daemon.registry import OPS
    return any("runtime" in e.name.lower() for e in OPS.values())


@pytest.mark.skipif(not _has_runtime_root_op(),
                    reason="TODO(issue6 merge): needs the op by which a client reports its runtime "
                           "roots (branch issue6-roots)")
@pytest.mark.parametrize("transport", ["tcp-from-B", "ssh-from-B"])
def test_each_host_reports_its_own_runtime_roots(transport, hosts, users, shared_dir):
    """alice runs a program from a store path on host B.  The daemon on A (runtime-roots =
    client) cannot see B's processes: unreported, the path is collected; once alice's client
    on B has run its GC flow over the transport, a GC on A keeps the path, held under a lease
    named for host B and alice's uid."""
    alice, _ = users
    d = DaemonOnA(hosts, shared_dir, custom=True,
                  nix_conf="runtime-roots = client\nruntime-root-lease = 600\n")
    holders: list[subprocess.Popen] = []
    try:
        env = {"STOREKEEPER_SSH": fake_ssh(shared_dir, hosts)}
        copy_key_to_b(issue_key_on_a(hosts, d, alice, alice.home_a), alice)
        root_home = os.path.join(shared_dir, "home-root")
        os.makedirs(root_home, exist_ok=True)

        def on_a(*argv: str, input: str = "") -> subprocess.CompletedProcess:
            r = run_on(hosts.a, None, root_home, SK, "--store", f"unix://{d.sock}?store={d.store_dir}",
                       *argv, input=input)
            assert r.returncode == 0, r.stderr
            return r

        def alice_on_b(*argv: str) -> subprocess.CompletedProcess:
            url = tcp_url(d) if transport == "tcp-from-B" else ssh_url(alice.name, d.url, d.store_dir)
            return run_on(hosts.b, alice, alice.home_b, SK, "--store", url, *argv, env=env)

        def hold(path: str) -> None:
            """alice's program on host B, using ``path`` (an open file) for a minute at most."""
            marker = os.path.join(alice.home_b, f"holding-{len(holders)}")
            holders.append(subprocess.Popen(
                ["ip", "netns", "exec", hosts.b, "runuser", "-u", alice.name, "--", "sh", "-c",
                 f"exec 3<{path}; touch {marker}; exec sleep 60"], start_new_session=True))
            deadline = time.monotonic() + 15
            while not os.path.exists(marker):
                assert time.monotonic() < deadline, "the holder did not start"
                time.sleep(0.05)

        def valid(path: str) -> bool:
            return run_on(hosts.a, None, root_home, SK, "--store", f"unix://{d.sock}?store={d.store_dir}",
                          "query", "--hash", path).returncode == 0

        # Control: held on B but never reported -> collected by a GC on A.
        control = on_a("add-text", "control.txt", "-", input="control\n").stdout.strip()
        hold(control)
        on_a("gc")
        assert not valid(control)

        held = on_a("add-text", "held.txt", "-", input="held\n").stdout.strip()
        hold(held)
        r = alice_on_b("gc")
        assert r.returncode == 0, r.stderr
        with open(os.path.join(d.state, "storekeeper", "leases", str(alice.uid))) as f:
            lease = json.load(f)
        assert held in lease["skhostb"]["paths"]
        on_a("gc")
        assert valid(held), f"{held} was collected while alice's program on host B used it"
    finally:
        for h in holders:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(h.pid, signal.SIGKILL)
            h.wait()
        d.stop()


@pytest.mark.skipif(shutil.which("nix-store") is None, reason="real Nix (nix-bin) not installed")
@pytest.mark.nix
def test_real_nix_over_ssh_ng_reaches_the_daemon_as_the_ssh_user(hosts, users, daemon_a, shared_dir):
    """Real Nix 2.8's ssh-ng client (``ssh HOST -x -a 'PROGRAM --stdio --store …'``) with
    ``storekeeper-nix-daemon`` as the remote program: relayed, seen as alice, untrusted."""
    alice, _ = users
    bindir = os.path.join(shared_dir, "bin")
    os.mkdir(bindir)
    os.symlink(fake_ssh(shared_dir, hosts), os.path.join(bindir, "ssh"))
    url = (f"ssh-ng://{alice.name}@{HOST_A}?remote-program={os.path.dirname(SK)}/storekeeper-nix-daemon"
           f"&remote-store=unix://{daemon_a.sock}")
    src = write_file(os.path.join(alice.home_b, "via-nix.txt"), "real nix over ssh-ng\n", alice)
    env = {"PATH": f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin", "XDG_CACHE_HOME": f"{alice.home_b}/.cache",
           "NIX_STATE_DIR": f"{alice.home_b}/nixstate", "NIX_LOG_DIR": f"{alice.home_b}/nixlog"}
    r = run_on(hosts.b, alice, alice.home_b, "nix-store", "--store", url, "--add", src, env=env)
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    r = run_on(hosts.b, alice, alice.home_b, "nix-store", "--store", url, "-q", "--hash", path, env=env)
    assert r.returncode == 0 and r.stdout.startswith("sha256:"), r.stderr
    r = run_on(hosts.b, alice, alice.home_b, "nix-store", "--store", url, "--verify", "--repair", env=env)
    assert r.returncode != 0 and "not privileged" in r.stderr
    assert re.search(rf"connection from user '{alice.name}' \(uid {alice.uid}, pid \d+\): child",
                     daemon_a.log())
    with open(os.path.join(shared_dir, "ssh-logins")) as f:
        assert f.read().split() == [f"{alice.name}@{HOST_A}"] * 3
