"""Issue 11, the daemon's side: attacks by real unprivileged users on a daemon running as root.

Each test starts storekeeper's daemon as root on a chroot store in a directory other
users can traverse, and runs the attack as real users (``runuser``), with the
documented clients or a raw protocol script.  Skipped without root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import nix_env
from daemon_util import start_daemon, stop_process
from realusers import SK, as_user, needs_root_users, real_users, spawn_as

from storekeeper.client import RemoteStore
from storekeeper.store.roots import indirect_root_name

pytestmark = [needs_root_users]

#: a raw client, run as a user: python -c RAW SOCKET ACTION ARGS…; prints JSON
RAW = r"""
import json, socket, sys, time
from storekeeper.client import RemoteStore
from storekeeper.client.userroots import RemoteUserRoots
from storekeeper.formats.wire import Op, WireWriter, WORKER_MAGIC_1
sock, action, *args = sys.argv[1:]
def client():
    return RemoteStore(sock, "/nix/store", log=lambda m: None, timeout=30)
def answer(fn):
    try:
        print(json.dumps({"ok": fn()}))
    except Exception as e:
        print(json.dumps({"error": str(e)}))
if action == "add-indirect":
    def go():
        with client() as c, c._exchange(WireWriter().u64(Op.AddIndirectRoot).string(args[0].encode("utf-8", "surrogateescape"))) as r:
            return r.u64()
    answer(go)
elif action == "unregister":
    def go():
        with client() as c:
            return RemoteUserRoots(c).unregister(args)
    answer(go)
elif action == "register-many":
    def go():
        with client() as c:
            p = c.parse_path(args[1])
            return RemoteUserRoots(c).register([(f"n{i}", p) for i in range(int(args[0]))])
    answer(go)
elif action == "hash-part":
    def go():
        with client() as c, c._exchange(WireWriter().u64(Op.QueryPathFromHashPart).string(b"\xff" * 32)) as r:
            return r.string()
    answer(go)
elif action == "valid-paths":
    def go():
        w = WireWriter().u64(Op.QueryValidPaths).u64(int(args[0]))
        for i in range(int(args[0])):
            w.string("/nix/store/" + "a" * 32 + f"-{i:040d}")
        with client() as c, c._exchange(w.u64(0)) as r:
            return len(r.strings())
    answer(go)
elif action == "hold":  # open N connections, report, keep them open
    held = []
    out = []
    for i in range(int(args[0])):
        try:
            held.append(client())
            out.append("ok")
        except Exception as e:
            out.append(str(e))
    print(json.dumps(out), flush=True)
    time.sleep(float(args[1]))
elif action == "idle":  # connect, then wait for the daemon to hang up
    c = client()
    s = c._sock if hasattr(c, "_sock") else None
    start = time.monotonic()
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(sock)
    raw.sendall(WireWriter().u64(WORKER_MAGIC_1).take())
    raw.settimeout(30)
    data = raw.recv(16)
    raw.sendall(WireWriter().u64(0x122).u64(0).u64(0).take())
    while data:
        data = raw.recv(4096)
    print(json.dumps({"closed_after": time.monotonic() - start}))
elif action == "gc-no-read":  # start a GC, never read its output
    raw = socket.socket(socket.AF_UNIX)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    raw.connect(sock)
    raw.sendall(WireWriter().u64(WORKER_MAGIC_1).take())
    raw.recv(16)
    raw.sendall(WireWriter().u64(0x122).u64(0).u64(0).take())
    time.sleep(0.5)
    raw.recv(64)  # version string and STDERR_LAST
    w = WireWriter().u64(Op.SetOptions)
    for v in (0, 0, 0, 7, 1, 0, 0, 0, 0, 0, 1, 0):  # verbosity 7: every message
        w.u64(v)
    w.u64(0)
    raw.sendall(w.take())
    time.sleep(0.5)
    raw.recv(64)
    # delete dead, no paths given, liveness kept, no byte limit, three obsolete fields
    raw.sendall(WireWriter().u64(Op.CollectGarbage).u64(2).u64(0).u64(0).u64((1 << 64) - 1)
                .u64(0).u64(0).u64(0).take())
    print("started", flush=True)
    time.sleep(float(args[0]))
"""


class RootDaemon:
    """storekeeper's daemon as root, serving a chroot store under ``base`` (traversable)."""

    def __init__(self, base: str, conf: str = "") -> None:
        self.root, self.sock = os.path.join(base, "root"), os.path.join(base, "d.sock")
        env = nix_env(os.path.join(base, "env"))
        self.conf = os.path.join(base, "daemon.conf")
        with open(self.conf, "w") as f:
            f.write("build-users-group =\n" + conf)
        self.log_path = os.path.join(base, "daemon.log")
        self._log = open(self.log_path, "wb")
        self.proc = start_daemon("ours", self.root, self.sock, env, "--config", self.conf, "-v",
                                 log=self._log)
        self.state = os.path.join(self.root, "nix/var/nix")
        for d in (base, self.root, os.path.join(self.root, "nix"), os.path.join(self.root, "nix/var"),
                  self.state):
            os.chmod(d, 0o755)

    def client(self) -> RemoteStore:
        return RemoteStore(self.sock, "/nix/store", log=lambda m: None, timeout=60)

    def raw(self, user, *args: str, timeout: float = 60):
        r = as_user(user, [sys.executable, "-c", RAW, self.sock, *args], timeout=timeout)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def setup(shared_dir):
    made = []

    def make(conf: str = "", *tags: str):
        users = real_users(shared_dir, *tags)
        made.append(users)
        d = RootDaemon(shared_dir, conf)
        made.append(d)
        return d, users.__enter__()
    yield make
    for thing in reversed(made):
        if isinstance(thing, RootDaemon):
            thing.stop()
        else:
            thing.__exit__(None, None, None)


def _kill(proc: subprocess.Popen) -> None:
    """The process and what runuser started (its own session)."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _link_as(user, link: str, target: str) -> None:
    assert as_user(user, ["ln", "-sfn", target, link]).returncode == 0


def test_attack3_a_user_cannot_remove_another_users_indirect_root(setup):
    """Attack 3: alice claims bob's indirect root (AddIndirectRoot for his link), then
    unregisters it; before the fix the ``gcroots/auto`` entry went, and the next GC
    collected bob's path while his ``result`` still pointed at it.  The entry here
    was made without a claim (as real Nix, or a daemon before claims, makes it).
    (Nix 2.8 has no unregister operation, so not this hole.)"""
    d, users = setup("", "a", "b")
    alice, bob = users["a"], users["b"]
    with d.client() as c:
        path = c.print_path(c.add_text("bobs-result", b"bob").path)
    link = os.path.join(bob.home, "result")
    _link_as(bob, link, path)
    auto = os.path.join(d.state, "gcroots", "auto")
    os.makedirs(auto, exist_ok=True)
    entry = os.path.join(auto, indirect_root_name(link))
    os.symlink(link, entry)  # an entry older than the daemon's claims
    assert d.raw(alice, "add-indirect", link) == {"ok": 1}
    d.raw(alice, "unregister", link)  # (drops her own claim only)
    assert os.path.islink(entry), "alice removed bob's indirect root"
    r = as_user(alice, [*SK, "--store", f"unix://{d.sock}", "gc", "--json"])
    assert r.returncode == 0, r.stderr
    assert path not in json.loads(r.stdout)["paths"]
    # bob owns the link: he may remove it
    assert d.raw(bob, "unregister", link) == {"ok": [link]}
    assert not os.path.lexists(entry)


@pytest.mark.slow  # (waits out a stalled client: seconds)
def test_attack7_a_gc_client_that_stops_reading_wedges_nobody(setup):
    """Attack 7: alice starts a GC over many dead paths with every message asked for, and
    never reads (a tiny receive buffer).  Before the fix the collector blocked in a
    send while holding gc.lock, so bob's GC (and adds of paths in its batch) waited
    until alice went away.  Now bob's GC and an add finish within a bound.
    (Nix 2.8 has the same hole: its daemon writes GC messages with a blocking write.)"""
    d, users = setup("", "a", "b")
    alice, bob = users["a"], users["b"]
    with d.client() as c:
        for i in range(1500):
            c.add_text(f"dead-{i}", f"garbage {i}".encode())
    time.sleep(2)  # (that connection's process, and its temp roots, are gone)
    attacker = spawn_as(alice, [sys.executable, "-c", RAW, d.sock, "gc-no-read", "60"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                        start_new_session=True)
    try:
        assert attacker.stdout.readline().strip() == "started"
        time.sleep(3)  # the collector is well into its work (or blocked, before the fix)
        start = time.monotonic()
        r = as_user(bob, [*SK, "--store", f"unix://{d.sock}", "gc", "--json"], timeout=60)
        took = time.monotonic() - start
        assert r.returncode == 0, r.stderr
        assert took < 30, f"bob's GC took {took:.1f} s"
        assert json.loads(r.stdout)["paths"] == []  # alice's collection took them all
        with d.client() as c:
            c.add_text("after", b"still works")
            assert c.verify_store() is not None if hasattr(c, "verify_store") else True
    finally:
        _kill(attacker)
    assert d.proc.poll() is None


@pytest.mark.slow  # (idle and auth time-outs: seconds)
def test_attack9_limits_connections_idle_requests_registrations(setup):
    """Attack 9: unbounded resources.  Each limit is a setting; exceeding it gives the
    client a one-line error, the daemon logs it once, and other users are served.
    (Nix 2.8 has none of these limits.)"""
    d, users = setup("max-connections-per-user = 3\nidle-timeout = 3\nmax-request-size = 1M\n"
                     "max-root-registrations = 5\n", "a", "b")
    alice, bob = users["a"], users["b"]
    with d.client() as c:
        path = c.print_path(c.add_text("reg", b"reg").path)
    # connections per user: the 4th of alice's is refused with a clear error; bob's works
    holder = spawn_as(alice, [sys.executable, "-c", RAW, d.sock, "hold", "4", "20"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                        start_new_session=True)
    try:
        out = json.loads(holder.stdout.readline())
        assert out[:3] == ["ok"] * 3
        assert "max-connections-per-user" in out[3]
        assert d.raw(bob, "register-many", "1", path) == {"ok": []}
    finally:
        _kill(holder)
    # idle: a connection that sends nothing after the handshake is closed
    closed = d.raw(alice, "idle")["closed_after"]
    assert closed < 10
    # bytes per request
    big = d.raw(alice, "valid-paths", "20000")
    assert "max-request-size" in big["error"]
    assert d.raw(alice, "valid-paths", "10") == {"ok": 0}
    # registrations per user
    assert "max-root-registrations" in d.raw(alice, "register-many", "6", path)["error"]
    assert d.raw(alice, "register-many", "5", path) == {"ok": []}
    assert "max-root-registrations" in d.raw(alice, "register-many", "6", path)["error"]
    time.sleep(0.5)
    log = d.log()
    assert log.count("max-connections-per-user") == 1
    assert "idle-timeout" in log
    assert d.proc.poll() is None


def test_attack10_non_utf8_and_links_the_user_cannot_read(setup):
    """Attack 10: non-UTF-8 strings answered "unexpected error: UnicodeEncodeError"; and
    AddIndirectRoot made the root daemon read a link in a directory the user cannot
    read, and record its target world-readably.  (Nix 2.8 does not record targets.)"""
    d, users = setup("", "a", "b")
    alice, bob = users["a"], users["b"]
    for args in (("add-indirect", "/tmp/x\udcff"), ("unregister", "/tmp/x\udcff"), ("hash-part",)):
        out = d.raw(alice, *args)
        text = json.dumps(out)
        assert "unexpected" not in text and "codec" not in text, out
    with d.client() as c:
        path = c.print_path(c.add_text("secret-target", b"s").path)
    link = os.path.join(bob.home, "private-result")  # bob's home is 0700
    _link_as(bob, link, path)
    assert d.raw(alice, "add-indirect", link) == {"ok": 1}
    ind = os.path.join(d.state, "storekeeper", "indirect")
    rec_path = os.path.join(ind, indirect_root_name(link))
    with open(rec_path) as f:
        rec = json.load(f)
    assert rec["path"] is None, "the daemon read a link alice cannot read"
    assert os.stat(rec_path).st_mode & 0o077 == 0 and os.stat(ind).st_mode & 0o077 == 0
    # bob adding his own link: read with his rights, recorded
    assert d.raw(bob, "add-indirect", link) == {"ok": 1}
    with open(rec_path) as f:
        assert json.load(f)["path"] == path
    assert d.proc.poll() is None
