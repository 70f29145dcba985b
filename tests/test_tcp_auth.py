"""TCP authentication and the sealed stream (formats.tcpauth, store.tcpkeys, daemon.tcp,
client.transports), against a real daemon on loopback (127.0.0.1 only).

Tests with real users on two network namespaces are in test_multihost.py.
"""

from __future__ import annotations

import io
import os
import pwd
import re
import secrets
import shlex
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import nix_env
from daemon_util import start_daemon, stop_process

from storekeeper.client import DaemonError, RemoteStore, open_remote
from storekeeper.client.keys import issue_tcp_key, revoke_tcp_key, save_tcp_key
from storekeeper.client.transports import SshTransport, default_tcp_key_path
from storekeeper.daemon.tcp import NOT_AUTHENTICATED
from storekeeper.errors import StoreError
from storekeeper.formats import tcpauth
from storekeeper.formats.errors import FormatError
from storekeeper.formats.tcpauth import format_key_file, parse_key_file
from storekeeper.formats.url import SshAddress, TcpAddress, parse_store_url
from storekeeper.formats.wire import WORKER_MAGIC_1, WireEOF, WireReader, WireWriter
from storekeeper.fs.private import read_key_file
from storekeeper.store.tcpkeys import TcpKeys

ME = pwd.getpwuid(os.geteuid()).pw_name
QUIET = {"log": lambda m: None, "timeout": 30}


# --- the pure parts -------------------------------------------------------------

def test_proofs_are_bound_to_the_key_the_user_and_both_nonces():
    key, other = secrets.token_bytes(32), secrets.token_bytes(32)
    c, s = secrets.token_bytes(32), secrets.token_bytes(32)
    t = tcpauth.transcript("alice", c, s)
    proof = tcpauth.client_proof(key, t)
    assert len(proof) == 32
    assert proof != tcpauth.client_proof(other, t)
    assert proof != tcpauth.client_proof(key, tcpauth.transcript("bob", c, s))
    assert proof != tcpauth.client_proof(key, tcpauth.transcript("alice", c, secrets.token_bytes(32)))
    assert proof != tcpauth.server_proof(key, t)  # a proof cannot be reflected back
    c2s, s2c = tcpauth.session_keys(key, t)
    assert len({c2s, s2c, proof, key}) == 4


def test_sealed_frames_round_trip_and_detect_every_change():
    key = secrets.token_bytes(32)
    data = [b"x" * 10, secrets.token_bytes(tcpauth.MAX_FRAME + 5), b"tail"]
    sealer = tcpauth.Sealer(key)
    frames = [sealer.seal(d) for d in data]
    stream = b"".join(frames)
    opener = tcpauth.Opener(key, io.BytesIO(stream))
    got = []
    while frame := opener.next_frame():
        got.append(frame)
    assert b"".join(got) == b"".join(data) and len(got) == 4  # the big one is split in two

    def read_all(raw: bytes, k: bytes = key) -> bytes:
        o, out = tcpauth.Opener(k, io.BytesIO(raw)), b""
        while frame := o.next_frame():
            out += frame
        return out

    flipped = bytearray(stream)
    flipped[6] ^= 1  # a payload byte of the first frame
    with pytest.raises(tcpauth.AuthError, match="frame 0 does not verify"):
        read_all(bytes(flipped))
    with pytest.raises(tcpauth.AuthError, match="frame 0 does not verify"):  # reordered
        read_all(frames[2] + frames[0])
    with pytest.raises(tcpauth.AuthError, match="frame 1 does not verify"):  # replayed
        read_all(frames[0] + frames[0])
    with pytest.raises(tcpauth.AuthError):  # the other direction's key
        read_all(stream, secrets.token_bytes(32))
    with pytest.raises(WireEOF):  # cut in the middle of a frame
        read_all(stream[:-3])
    with pytest.raises(tcpauth.AuthError, match="limit"):  # a length no frame may have
        read_all((tcpauth.MAX_FRAME + 1).to_bytes(4, "little") + b"\0" * 64)


def test_key_files_parse_strictly():
    key = secrets.token_bytes(32)
    assert parse_key_file(format_key_file("alice", key, "a comment\nover two lines"), "f") == ("alice", key)
    for bad, why in [(b"user alice\n", "needs a 'user' and a 'key'"),
                     (b"user alice\nkey abcd\n", "64 hex digits"),
                     (b"user alice\nkey " + b"zz" * 32 + b"\n", "64 hex digits"),
                     (b"user alice\nkey " + key.hex().encode() + b"\nport 1\n", "unexpected 'port 1'"),
                     (b"\xff\xfe", "not text")]:
        with pytest.raises(FormatError, match=why):
            parse_key_file(bad, "f")


def test_key_files_must_be_private_regular_files_of_their_owner(tmp_path):
    path = str(tmp_path / "tcp-key")
    save_tcp_key(path, "alice", secrets.token_bytes(32))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_key_file(path, os.geteuid())[0] == "alice"
    os.chmod(path, 0o640)
    with pytest.raises(StoreError, match="mode 0640: it must be readable by its owner only"):
        read_key_file(path, os.geteuid())
    os.chmod(path, 0o600)
    with pytest.raises(StoreError, match=f"belongs to uid {os.geteuid()}, not to uid 12345"):
        read_key_file(path, 12345)
    os.symlink(path, str(tmp_path / "link"))
    with pytest.raises(StoreError, match="is a symbolic link"):
        read_key_file(str(tmp_path / "link"), os.geteuid())


def test_the_daemons_key_store(tmp_path):
    keys = TcpKeys(str(tmp_path))
    assert keys.lookup(1000, "alice") is None
    k1 = keys.issue(1000, "alice")
    assert os.stat(keys.dir).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(keys.dir, "1000")).st_mode & 0o777 == 0o600
    assert keys.lookup(1000, "alice") == k1
    # uid 1000 renamed (or deleted and reused by someone else): the key no longer counts
    assert keys.lookup(1000, "mallory") is None
    k2 = keys.issue(1000, "alice")
    assert k2 != k1 and keys.lookup(1000, "alice") == k2  # reissue replaces
    os.chmod(os.path.join(keys.dir, "1000"), 0o644)
    with pytest.raises(StoreError, match="mode 0644"):
        keys.lookup(1000, "alice")
    os.chmod(os.path.join(keys.dir, "1000"), 0o600)
    os.chmod(keys.dir, 0o755)
    with pytest.raises(StoreError, match="TCP keys are disabled"):
        keys.lookup(1000, "alice")
    os.chmod(keys.dir, 0o700)
    assert keys.revoke(1000) and not keys.revoke(1000)
    assert keys.lookup(1000, "alice") is None


def test_store_urls_for_other_hosts():
    a = parse_store_url("ssh-ng://alice@build1.example:2222?remote-program=/opt/sk/bin/storekeeper%20daemon"
                        "&remote-store=/srv/root&ssh-key=/k", {})
    assert isinstance(a, SshAddress)
    assert (a.user, a.host, a.port, a.remote_program, a.remote_store, a.ssh_key) == \
        ("alice", "build1.example", 2222, "/opt/sk/bin/storekeeper daemon", "/srv/root", "/k")
    b = parse_store_url("ssh://host", {})
    assert isinstance(b, SshAddress) and b.user is None and b.remote_program == "storekeeper daemon"
    t = parse_store_url("tcp://[::1]:7000?key=/k&store=/x/store", {})
    assert isinstance(t, TcpAddress) and (t.host, t.port, t.key_file, t.store_dir) == ("::1", 7000, "/k", "/x/store")
    assert t.url == "tcp://[::1]:7000"
    for url, why in [("ssh-ng://-oProxyCommand=x", "not a host name"),
                     ("ssh-ng://-x@host", "not a user name"),
                     ("ssh-ng://host?base64-ssh-public-host-key=AAAA", "not supported"),
                     ("tcp://host", "a port is needed"),
                     ("tcp://host:99999", "not a port number"),
                     ("tcp://host:1?secret=1", "unknown parameter")]:
        with pytest.raises(FormatError, match=why):
            parse_store_url(url, {})


def test_the_ssh_command_line():
    a = parse_store_url("ssh-ng://alice@hostA:2222?remote-store=/srv/my%20root&ssh-key=/k", {})
    env = {"STOREKEEPER_SSH": "/bin/my-ssh -F '/etc/my config'", "NIX_SSHOPTS": "-o ConnectTimeout=3"}
    cmd = SshTransport(a, env).command()
    assert cmd == ["/bin/my-ssh", "-F", "/etc/my config", "-x", "-a", "-i", "/k", "-p", "2222",
                   "-o", "ConnectTimeout=3", "--", "alice@hostA",
                   "storekeeper daemon --stdio --store '/srv/my root'"]
    assert shlex.split(cmd[-1])[-1] == "/srv/my root"
    assert default_tcp_key_path({"HOME": "/home/a"}) == "/home/a/.config/storekeeper/tcp-key"
    assert default_tcp_key_path({"XDG_CONFIG_HOME": "/c"}) == "/c/storekeeper/tcp-key"


# --- a daemon on loopback ----------------------------------------------------------

def wait_for_line(path: str, pattern: str, proc: subprocess.Popen, timeout: float = 15.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            m = re.search(pattern, f.read())
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(path, errors="replace") as f:
        raise AssertionError(f"no '{pattern}' in the daemon's log:\n{f.read()}")


class TcpDaemon:
    def __init__(self, tmp, *args: str) -> None:
        self.root, self.sock = str(tmp / "root"), str(tmp / "d.sock")
        self.log_path = str(tmp / "daemon.log")
        self._log = open(self.log_path, "wb")
        self.proc = start_daemon("ours", self.root, self.sock, nix_env(str(tmp / "env")),
                                 "--listen-tcp", "127.0.0.1:0", "-v", *args, log=self._log)
        self.port = int(wait_for_line(self.log_path, r"listening on tcp 127\.0\.0\.1:(\d+)", self.proc)[1])
        self.state = os.path.join(self.root, "nix/var/nix")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def url(self, key_file: str, port: int | None = None) -> str:
        return f"tcp://127.0.0.1:{port or self.port}?key={key_file}"

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def daemon(tmp_path):
    d = TcpDaemon(tmp_path)
    yield d
    d.stop()


def my_key(daemon: TcpDaemon, path: str) -> str:
    with RemoteStore(daemon.sock, **QUIET) as unix:
        user, uid, key = issue_tcp_key(unix)
    assert (user, uid) == (ME, os.geteuid())
    save_tcp_key(path, user, key)
    return path


def test_a_tcp_client_is_the_user_whose_key_it_holds(daemon, tmp_path):
    key = my_key(daemon, str(tmp_path / "key"))
    # the daemon's copy: mode 0600 in a 0700 dir, named by uid
    kdir = os.path.join(daemon.state, "tcp-keys")
    assert os.stat(kdir).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(kdir, str(os.geteuid()))).st_mode & 0o777 == 0o600
    with open_remote(parse_store_url(daemon.url(key)), **QUIET) as tcp:
        info = tcp.add_text("over-tcp.txt", b"hello over tcp\n")
        assert tcp.query_path_info(info.path).nar_hash == info.nar_hash
        assert tcp.url == f"tcp://127.0.0.1:{daemon.port}"
        tcp.add_signatures(info.path, ["k:dGVzdA=="])  # root is trusted, over TCP as over the socket
        # a key cannot mint or revoke keys
        with pytest.raises(DaemonError, match="needs a connection to the daemon's Unix socket"):
            issue_tcp_key(tcp)
        with pytest.raises(DaemonError, match="needs a connection to the daemon's Unix socket"):
            revoke_tcp_key(tcp)
    with RemoteStore(daemon.sock, **QUIET) as unix:
        assert unix.is_valid(info.path)
    assert re.search(rf"authenticated as user '{ME}' \(uid {os.geteuid()}, tcp from 127\.0\.0\.1:\d+\) "
                     r"\(trusted\)", daemon.log())


def refused(url: str) -> str:
    with pytest.raises(StoreError) as e:
        open_remote(parse_store_url(url), **QUIET).close()
    return str(e.value)


def test_wrong_keys_unknown_users_and_bad_files_are_refused(daemon, tmp_path):
    good = my_key(daemon, str(tmp_path / "key"))
    wrong = str(tmp_path / "wrong")
    save_tcp_key(wrong, ME, secrets.token_bytes(32))
    # A wrong key, a user without a key and an unknown user get the same answer (the
    # names that exist are not revealed); the daemon's log says which it was.
    same = "refused the connection: " + NOT_AUTHENTICATED
    assert same in refused(daemon.url(wrong))
    nobody = str(tmp_path / "nobody")
    _, mykey = read_key_file(good, os.geteuid())
    save_tcp_key(nobody, "nobody", mykey)  # my key, claiming to be someone else
    assert same in refused(daemon.url(nobody))
    wait_for_line(daemon.log_path, r"no TCP key has been issued to user 'nobody'", daemon.proc)
    TcpKeys(daemon.state).issue(pwd.getpwnam("nobody").pw_uid, "nobody")
    assert same in refused(daemon.url(nobody))
    wait_for_line(daemon.log_path, r"bad proof for user 'nobody'", daemon.proc)
    ghost = str(tmp_path / "ghost")
    save_tcp_key(ghost, "no-such-user-sk", mykey)
    assert same in refused(daemon.url(ghost))
    wait_for_line(daemon.log_path, r"unknown user 'no-such-user-sk'", daemon.proc)
    os.chmod(good, 0o644)
    assert "has mode 0644" in refused(daemon.url(good))
    os.chmod(good, 0o600)
    assert "no TCP key at" in refused(daemon.url(str(tmp_path / "missing")))
    # revoked: the old key stops working, a reissued one works
    with RemoteStore(daemon.sock, **QUIET) as unix:
        assert revoke_tcp_key(unix)
    assert same in refused(daemon.url(good))
    my_key(daemon, good)
    open_remote(parse_store_url(daemon.url(good)), **QUIET).close()
    assert daemon.proc.poll() is None


def raw_auth(port: int, user: str, proof_for=None) -> tuple[socket.socket, bytes, bytes, bool, bytes]:
    """One exchange by hand: returns (socket, snonce, the proof sent, accepted, payload)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    r = WireReader(s.makefile("rb"))
    cnonce = b"\1" * 32  # the same client nonce every time: only the daemon's nonce differs
    s.sendall(tcpauth.hello(user, cnonce))
    snonce = tcpauth.read_challenge(r)
    proof = proof_for(snonce) if proof_for else b"\0" * 32
    s.sendall(tcpauth.proof_message(proof))
    accepted, payload = tcpauth.read_verdict(r)
    return s, snonce, proof, accepted, payload


def test_a_recorded_exchange_cannot_be_replayed(daemon, tmp_path):
    user, key = read_key_file(my_key(daemon, str(tmp_path / "key")), os.geteuid())
    s, snonce1, proof1, ok, _ = raw_auth(
        daemon.port, user, lambda sn: tcpauth.client_proof(key, tcpauth.transcript(user, b"\1" * 32, sn)))
    assert ok
    s.close()
    s, snonce2, _, ok, reason = raw_auth(daemon.port, user, lambda sn: proof1)
    s.close()
    assert snonce2 != snonce1
    assert not ok and reason.decode() == NOT_AUTHENTICATED


def test_a_nix_client_on_the_tcp_port_gets_nothing(daemon):
    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    s.sendall(WireWriter().u64(WORKER_MAGIC_1).take())
    assert s.recv(100) == b""  # closed without a byte
    s.close()
    wait_for_line(daemon.log_path, r"a Nix worker-protocol client \(0x6e697863\): closed without a word",
                  daemon.proc)


class Tamperer(threading.Thread):
    """A TCP relay on loopback that flips one byte at ``offset`` of one direction."""

    def __init__(self, port: int, upstream: bool, offset: int) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target, self.upstream, self.offset = port, upstream, offset

    def pump(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        seen = 0
        try:
            while data := src.recv(65536):
                if flip and seen <= self.offset < seen + len(data):
                    b = bytearray(data)
                    b[self.offset - seen] ^= 0x20
                    data = bytes(b)
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for sock in (dst, src):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> None:
        self.listener.settimeout(30)
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.target), timeout=30)
        t = threading.Thread(target=self.pump, args=(client, server, self.upstream), daemon=True)
        t.start()
        self.pump(server, client, not self.upstream)
        t.join(10)
        client.close()
        server.close()
        self.listener.close()


def test_bytes_changed_on_the_way_end_the_connection(daemon, tmp_path):
    key = my_key(daemon, str(tmp_path / "key"))
    user = ME
    up_auth = len(tcpauth.hello(user, b"\0" * 32)) + len(tcpauth.proof_message(b"\0" * 32))
    down_auth = len(tcpauth.challenge(b"\0" * 32)) + len(tcpauth.verdict_ok(b"\0" * 32))

    # client -> daemon: the daemon drops the connection, nothing of it is served
    relay = Tamperer(daemon.port, upstream=True, offset=up_auth + 4 + 2)
    relay.start()
    with pytest.raises(StoreError, match="cannot open connection"):
        open_remote(parse_store_url(daemon.url(key, relay.port)), **QUIET)
    relay.join(30)
    assert "sealed frame 0 does not verify" in daemon.log()

    # daemon -> client: the client says what happened
    relay = Tamperer(daemon.port, upstream=False, offset=down_auth + 4 + 2)
    relay.start()
    with pytest.raises(StoreError, match="tampered with or broken .*frame 0 does not verify"):
        open_remote(parse_store_url(daemon.url(key, relay.port)), **QUIET)
    relay.join(30)
    assert daemon.proc.poll() is None


def test_identity_rules_apply_to_tcp_peers_as_to_unix_peers(tmp_path):
    # Nobody is trusted, and only root and nobody may connect.
    d = TcpDaemon(tmp_path, "--trusted-users", "nobody", "--allowed-users", "root", "nobody")
    try:
        key = my_key(d, str(tmp_path / "key"))
        with open_remote(parse_store_url(d.url(key)), **QUIET) as tcp:
            info = tcp.add_text("untrusted.txt", b"x")
            with pytest.raises(DaemonError, match="not privileged to add signatures"):
                tcp.add_signatures(info.path, ["k:dGVzdA=="])
        with RemoteStore(d.sock, **QUIET) as unix:  # the same over the socket
            with pytest.raises(DaemonError, match="not privileged to add signatures"):
                unix.add_signatures(info.path, ["k:dGVzdA=="])
    finally:
        d.stop()
    d = TcpDaemon(tmp_path, "--allowed-users", "nobody", "--trusted-users", "nobody")
    try:
        assert f"user '{ME}' (uid {os.geteuid()}, tcp from 127.0.0.1:" in refused(d.url(key))
        assert "is not in allowed-users" in refused(d.url(key))
    finally:
        d.stop()


# --- daemon --stdio: relay or serve --------------------------------------------------

def fake_ssh(tmp_path) -> str:
    """An 'ssh' that runs the command here (as we are): skips options, logs the destination."""
    script = tmp_path / "fake-ssh"
    script.write_text("#!/bin/sh\n"
                      "while [ $# -gt 0 ]; do case \"$1\" in --) shift; break;; -i|-p|-o|-F) shift 2;; "
                      "*) shift;; esac; done\n"
                      f"echo \"$1\" >> {tmp_path}/ssh-destinations\n"
                      "shift\nexec sh -c \"$*\"\n")
    script.chmod(0o755)
    return str(script)


def test_stdio_relays_to_a_running_daemon_and_serves_itself_without_one(tmp_path, monkeypatch):
    monkeypatch.setenv("STOREKEEPER_SSH", fake_ssh(tmp_path))
    bindir = os.path.dirname(sys.executable)
    root = str(tmp_path / "root")
    url = (f"ssh-ng://{ME}@hostA?remote-program={bindir}/storekeeper%20daemon&remote-store={root}")
    # No daemon: the stdio process serves the store with its own (here: root's) rights, trusted.
    with open_remote(parse_store_url(url), **QUIET) as st:
        info = st.add_text("via-ssh.txt", b"ssh\n")
        st.add_signatures(info.path, ["k:dGVzdA=="])
        assert st.url == f"ssh-ng://{ME}@hostA"
    assert (tmp_path / "ssh-destinations").read_text() == f"{ME}@hostA\n"
    # A daemon on the store's socket that trusts nobody: the relayed connection is
    # an ordinary (untrusted) peer of that daemon.
    sock = os.path.join(root, "nix/var/nix/daemon-socket/socket")
    log = open(tmp_path / "daemon.log", "wb")
    proc = start_daemon("ours", root, sock, nix_env(str(tmp_path / "env")), "--trusted-users", "nobody",
                        "-v", log=log)
    try:
        with open_remote(parse_store_url(url), **QUIET) as st:
            assert st.is_valid(info.path)
            with pytest.raises(DaemonError, match="not privileged to add signatures"):
                st.add_signatures(info.path, ["k:dGVzdA=="])
        # --socket given: the daemon must be there
        bad = url.replace("%20daemon", "%20daemon%20--socket%20" + str(tmp_path / "nosuch"))
        with pytest.raises(StoreError, match="'fake-ssh' exited with status 1"):
            open_remote(parse_store_url(bad), **QUIET)
    finally:
        stop_process(proc)
        log.close()
    text = (tmp_path / "daemon.log").read_text()
    assert re.search(rf"connection from user '{ME}' \(uid {os.geteuid()}, pid \d+\): child", text)


def test_a_silent_tcp_peer_does_not_hold_up_others(daemon, tmp_path):
    key = my_key(daemon, str(tmp_path / "key"))
    silent = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10) for _ in range(3)]
    half = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    half.sendall(tcpauth.hello(ME, b"\0" * 32)[:12])  # a hello cut short
    try:
        start = time.monotonic()
        with open_remote(parse_store_url(daemon.url(key)), **QUIET) as tcp:
            assert not tcp.is_valid(tcp.parse_path("/nix/store/00000000000000000000000000000000-x"))
        assert time.monotonic() - start < 5  # the daemon's auth timeout is 10 s
        with RemoteStore(daemon.sock, **QUIET) as unix:
            unix.add_text("still-serving.txt", b"x")
    finally:
        for s in (*silent, half):
            s.close()


def test_the_auth_deadline_covers_the_whole_handshake(tmp_path):
    """A peer that sends one byte at a time, each well within any per-read timeout, is
    cut off when the whole authentication passes ``auth-timeout`` (before: a timeout
    per read, so one byte every few seconds held a daemon process forever)."""
    conf = tmp_path / "sk.conf"
    conf.write_text("auth-timeout = 2\n")
    d = TcpDaemon(tmp_path, "--config", str(conf))
    try:
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        hello = tcpauth.hello("root", b"\1" * 32)
        start = time.monotonic()
        closed_after = None
        for i in range(len(hello)):
            try:
                s.sendall(hello[i:i + 1])
            except OSError:
                closed_after = time.monotonic() - start
                break
            time.sleep(0.25)
            if time.monotonic() - start > 8:
                break
        if closed_after is None:
            s.settimeout(5)
            try:
                s.recv(1)
            except OSError:
                pass
            closed_after = time.monotonic() - start
        s.close()
        assert closed_after < 6, f"still connected after {closed_after:.1f} s"
        wait_for_line(d.log_path, r"not done within 2 s \(auth-timeout\)", d.proc)
        assert d.proc.poll() is None
    finally:
        d.stop()


def test_refusals_take_the_same_time_for_unknown_users_and_wrong_keys(daemon):
    """Same answer, and no measurable difference in time, whether the user exists."""
    def timed(user: str) -> tuple[float, bytes]:
        start = time.perf_counter()
        s, _, _, ok, reason = raw_auth(daemon.port, user)
        took = time.perf_counter() - start
        s.close()
        assert not ok
        return took, reason
    times: dict[str, list[float]] = {"root": [], "no-such-user-sk": []}
    for _ in range(15):
        for user in times:
            took, reason = timed(user)
            times[user].append(took)
            assert reason.decode() == NOT_AUTHENTICATED
    med = {u: sorted(t)[len(t) // 2] for u, t in times.items()}
    assert abs(med["root"] - med["no-such-user-sk"]) < 0.02, med
