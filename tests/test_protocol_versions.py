"""Worker protocol 1.34 .. 1.38 (../shared/spec/protocol-1.35-plus.md): golden handshakes
written byte for byte from the spec, every op whose format changed after 1.34 at each
version, simulated 2.35 and Lix clients, our client's negotiation, and a store wiped and
re-created under a running daemon (with real Nix clients)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
from conftest import needs_nix, nix_env
from daemon_util import DaemonError, read_log, run_session, start_daemon, stop_process
from test_build import area_factory  # noqa: F401 -- (a fixture)

from storekeeper.api import DEAD, DELETE_DEAD, DELETE_SPECIFIC, GCOptions
from storekeeper.client.remote import RemoteStore
from storekeeper.daemon.session import Session
from storekeeper.daemon.trust import PeerInfo
from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import dump_string
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.storepath import StoreDir
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import WireReader, WireWriter, frame
from storekeeper.store.local import LocalStore

SD = StoreDir("/nix/store")
HELLO = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
HELLO_NAR = dump_string(b"hello\n")
HELLO_CA = "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
FEATURE = "delete-dead-specific-referrers"


def hx(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# --- golden bytes, from the spec (§2 steps 1-7, §3 1.38 example) ----------------------------

MAGIC_1 = hx("63 78 69 6e 00 00 00 00")       # "cxin"
MAGIC_2 = hx("6f 69 78 64 00 00 00 00")       # "oixd"
OURS_1_38 = hx("26 01 00 00 00 00 00 00")     # the daemon announces 1.38
V = {34: hx("22 01 00 00 00 00 00 00"), 35: hx("23 01 00 00 00 00 00 00"),
     37: hx("25 01 00 00 00 00 00 00"), 38: hx("26 01 00 00 00 00 00 00")}
ZERO = hx("00 00 00 00 00 00 00 00")
NIX_VERSION = hx("05 00 00 00 00 00 00 00  32 2e 38 2e 30 00 00 00")  # "2.8.0", padded
TRUSTED = hx("01 00 00 00 00 00 00 00")
NOT_TRUSTED = hx("02 00 00 00 00 00 00 00")
STDERR_LAST = hx("73 74 6c 61 00 00 00 00")
# the daemon's feature list: one string, "delete-dead-specific-referrers" (30 bytes + 2 pad)
OUR_FEATURES = hx("01 00 00 00 00 00 00 00  1e 00 00 00 00 00 00 00") + FEATURE.encode() + b"\0\0"


def client_hello(minor: int, features: bytes = ZERO) -> bytes:
    """What a client announcing ``minor`` sends: magic, version, (1.38) its feature list,
    cpu affinity 0, reserveSpace 0."""
    return MAGIC_1 + V[minor] + (features if minor >= 38 else b"") + ZERO + ZERO


GOLDEN = {
    # minor: (client bytes, daemon bytes for a trusted peer)
    34: (client_hello(34), MAGIC_2 + OURS_1_38 + NIX_VERSION + STDERR_LAST),
    35: (client_hello(35), MAGIC_2 + OURS_1_38 + NIX_VERSION + TRUSTED + STDERR_LAST),
    37: (client_hello(37), MAGIC_2 + OURS_1_38 + NIX_VERSION + TRUSTED + STDERR_LAST),
    38: (client_hello(38), MAGIC_2 + OURS_1_38 + OUR_FEATURES + NIX_VERSION + TRUSTED + STDERR_LAST),
}


@pytest.fixture
def store(tmp_path):
    s = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    yield s
    s.close()


def converse(store: LocalStore, c2s: bytes, trusted: bool = True, peer: PeerInfo | None = None) -> bytes:
    """Feed ``c2s`` to an in-process Session over a socketpair; all it answered."""
    return run_session(store, c2s, trusted=trusted, peer=peer)


@pytest.mark.parametrize("minor", sorted(GOLDEN))
def test_golden_handshake(store, minor):
    c2s, want = GOLDEN[minor]
    assert converse(store, c2s) == want


def test_handshake_trust_flag_and_feature_intersection(store):
    # untrusted: 2; a 1.34 client gets no flag at all
    assert converse(store, client_hello(35), trusted=False).endswith(NIX_VERSION + NOT_TRUSTED + STDERR_LAST)
    assert converse(store, client_hello(34), trusted=False).endswith(NIX_VERSION + STDERR_LAST)
    # a 2.35 client's offer: ours is sent whatever the client offered (the intersection is
    # each side's business); the byte stream is the same
    offer = WireWriter().strings(["disable-set-options", FEATURE, "realisation-with-path-not-hash"]).take()
    assert converse(store, client_hello(38, offer)) == GOLDEN[38][1]
    # a newer client (1.40, say) is spoken to at 1.38
    c2s = MAGIC_1 + hx("28 01 00 00 00 00 00 00") + ZERO + ZERO + ZERO
    assert converse(store, c2s) == GOLDEN[38][1]


def test_refused_old_client_gets_a_readable_error(store):
    s2c = converse(store, MAGIC_1 + hx("15 01 00 00 00 00 00 00") + ZERO + ZERO)
    assert s2c.startswith(MAGIC_2 + OURS_1_38 + hx("70 74 78 63 00 00 00 00"))  # STDERR_ERROR
    assert b"1.21 is not supported" in s2c


# --- ops whose format changed after 1.34, at each version ---------------------------------------

VERSIONS = [(34, ()), (35, ()), (37, ()), (38, ()), (38, (FEATURE,))]


def hello_info() -> ValidPathInfo:
    return ValidPathInfo(SD.parse(HELLO), Hash.of("sha256", HELLO_NAR), len(HELLO_NAR), ca=HELLO_CA)


def add_hello(store: LocalStore) -> None:
    store.add_nar(hello_info(), io.BytesIO(HELLO_NAR))


class Sim:
    """A simulated client over an in-process Session, speaking ``minor`` (+ features)."""

    def __init__(self, store: LocalStore, minor: int, features=(), trusted: bool = True,
                 peer: PeerInfo | None = None, lix: bool = False) -> None:
        ours, self.sock = socket.socketpair()
        self.sock.settimeout(20)
        self.thread = threading.Thread(target=self._serve, args=(store, ours, trusted, peer))
        self.thread.start()
        self.r = WireReader(self.sock.makefile("rb"))
        self.minor = minor
        self.sock.sendall(MAGIC_1 + WireWriter().u64(0x100 | minor).take())
        assert self.r.u64() == 0x6478696F
        daemon = self.r.u64()
        if lix:
            assert daemon & 0xFF >= 35, "a Lix client refuses daemons below 1.35"
        self.minor = min(minor, daemon & 0xFF)
        self.features: set[str] = set()
        if self.minor >= 38:
            self.sock.sendall(WireWriter().strings(list(features)).take())
            self.features = set(self.r.strings()) & set(features)
        self.sock.sendall(ZERO + ZERO)
        self.nix_version = self.r.string()
        self.trust = self.r.u64() if self.minor >= 35 else None
        ok, _ = read_log(self.r)
        assert ok
        if "disable-set-options" not in self.features:
            self.op(WireWriter().u64(19).u64(0).u64(0).u64(0).u64(3).u64(1).u64(0).u64(1).u64(0)
                    .u64(0).u64(0).u64(1).u64(1).string_map({"connect-timeout": "5"}))

    @staticmethod
    def _serve(store, sock, trusted, peer) -> None:
        try:
            Session(store, sock.makefile("rb"), sock.sendall, trusted=trusted, peer=peer).run()
        finally:
            sock.close()

    def op(self, w: WireWriter) -> None:
        """Send a request; read the log up to STDERR_LAST (raise on STDERR_ERROR)."""
        self.sock.sendall(w.take())
        ok, msgs = read_log(self.r)
        if not ok:
            raise DaemonError(msgs[-1].payload.message)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # (the reader's file keeps the fd open)
        self.sock.close()
        self.thread.join(20)
        assert not self.thread.is_alive()


@contextmanager
def sim(*args, **kw):
    c = Sim(*args, **kw)
    try:
        yield c
    finally:
        c.close()


def read_build_result(c: Sim) -> dict:
    r = c.r
    res = {"status": r.u64(), "errorMsg": r.string(), "timesBuilt": r.u64(),
           "isNonDeterministic": r.u64(), "startTime": r.u64(), "stopTime": r.u64()}
    if c.minor >= 37:
        res["cpu"] = []
        for _ in range(2):
            res["cpu"].append(r.u64() if r.u64() else None)
    res["builtOutputs"] = r.string_map()
    return res


@pytest.mark.parametrize("minor,features", VERSIONS)
def test_build_result_has_cpu_times_from_1_37(store, minor, features):
    add_hello(store)
    with sim(store, minor, features) as c:
        c.op(WireWriter().u64(46).strings([HELLO]).u64(0))  # BuildPathsWithResults
        assert c.r.u64() == 1 and c.r.string() == HELLO
        res = read_build_result(c)
        assert res["status"] == 2 and res["builtOutputs"] == {}  # AlreadyValid
        assert ("cpu" in res) == (minor >= 37)
        if minor >= 37:
            assert res["cpu"] == [None, None]  # nothing was built: absent
        # the connection is still in step
        c.op(WireWriter().u64(1).string(HELLO))
        assert c.r.u64() == 1


@pytest.mark.parametrize("minor,features", VERSIONS)
def test_add_perm_root_from_1_36(store, tmp_path, minor, features):
    add_hello(store)
    link = str(tmp_path / "result")
    with sim(store, minor, features) as c:
        if minor < 36:
            with pytest.raises(DaemonError, match="needs protocol 1.36"):
                c.op(WireWriter().u64(47).string(HELLO).string(link))
            assert not os.path.lexists(link)
            return
        c.op(WireWriter().u64(47).string(HELLO).string(link))
        assert c.r.string() == link
        assert os.readlink(link) == HELLO
        with pytest.raises(DaemonError, match="not an absolute path"):
            c.op(WireWriter().u64(47).string(HELLO).string("result"))
        with pytest.raises(DaemonError, match="is not valid"):
            c.op(WireWriter().u64(47).string("/nix/store/" + "0" * 32 + "-x").string(link + "2"))
    # an indirect root now: the GC keeps the path
    dead = store.collect_garbage(GCOptions(action=DEAD)).paths
    assert HELLO not in dead


def test_add_perm_root_is_made_with_the_untrusted_peers_rights(store, shared_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    add_hello(store)
    nobody = PeerInfo.from_ids(os.getpid(), 65534, 65534)
    mine = os.path.join(shared_dir, "nobody")
    os.mkdir(mine)
    os.chown(mine, 65534, 65534)
    with sim(store, 38, (FEATURE,), trusted=False, peer=nobody) as c:
        assert c.trust == 2
        # not where nobody may write (a root-owned dir; the store's gcroots)
        with pytest.raises(DaemonError, match="Permission denied"):
            c.op(WireWriter().u64(47).string(HELLO).string(os.path.join(shared_dir, "r")))
        with pytest.raises(DaemonError, match="Permission denied"):
            c.op(WireWriter().u64(47).string(HELLO).string(
                os.path.join(store.state_dir, "gcroots", "evil")))
        c.op(WireWriter().u64(47).string(HELLO).string(os.path.join(mine, "r")))
        assert c.r.string() == os.path.join(mine, "r")
    assert os.lstat(os.path.join(mine, "r")).st_uid == 65534
    assert not os.path.lexists(os.path.join(shared_dir, "r"))
    assert HELLO not in store.collect_garbage(GCOptions(action=DEAD)).paths


def make_chain(store: LocalStore):
    """a <- b (b refers to a), c alone; all dead (added by a process that is gone: no pins)."""
    with LocalStore(store.layout) as other:
        a = other.add_text("a", b"a")
        b = other.add_text("b", store.print_path(a.path).encode(), references=[a.path])
        c = other.add_text("c", b"c")
    return store.print_path(a.path), store.print_path(b.path), store.print_path(c.path)


def gc_request(c: Sim, action: int, paths, delete_referrers: bool = False, whole: bool = False) -> WireWriter:
    w = WireWriter().u64(20).u64(action)
    if FEATURE in c.features:
        if whole:
            w.u64(1)
        else:
            w.u64(0).strings(paths).boolean(delete_referrers)
    else:
        w.strings(paths)
    return w.boolean(False).u64(2**64 - 1).u64(0).u64(0).u64(0)


def gc_reply(c: Sim) -> list[str]:
    paths = c.r.strings()
    c.r.u64()
    c.r.u64()
    return paths


@pytest.mark.parametrize("minor,features", VERSIONS)
def test_collect_garbage_at_each_version(store, minor, features):
    add_hello(store)
    a, b, cc = make_chain(store)
    with sim(store, minor, features) as c:
        if FEATURE not in c.features:
            # deleteDead with paths is refused; deleteSpecific as in 1.34
            with pytest.raises(DaemonError, match="negotiated protocol"):
                c.op(gc_request(c, 2, [cc]))
            c.op(gc_request(c, 3, [b]))
            assert gc_reply(c) == [b]
            c.op(gc_request(c, 1, []))  # returnDead, an empty set: the whole store
            assert set(gc_reply(c)) == {a, cc, HELLO}
            return
        # returnDead of a set; deleteDead of a set skips what must stay (a: b refers to it)
        c.op(gc_request(c, 1, [a, cc]))
        assert gc_reply(c) == [cc]
        c.op(gc_request(c, 2, [a, cc]))
        assert gc_reply(c) == [cc]
        assert store.is_valid(SD.parse(a)) and not store.is_valid(SD.parse(cc))
        # deleteSpecific of a alone fails (b refers to it); with its referrers it goes
        with pytest.raises(DaemonError, match="still alive"):
            c.op(gc_request(c, 3, [a]))
        c.op(gc_request(c, 3, [a], delete_referrers=True))
        assert sorted(gc_reply(c)) == sorted([a, b])
        c.op(gc_request(c, 1, [], whole=True))
        assert gc_reply(c) == [HELLO]


# --- simulated modern clients (spec §2, §3) ---------------------------------------------------

@pytest.mark.parametrize("kind", ["2.35", "lix"])
def test_simulated_modern_clients_complete_the_common_ops(store, kind):
    if kind == "2.35":
        args = dict(minor=38, features=("disable-set-options", FEATURE, "realisation-with-path-not-hash"))
    else:
        args = dict(minor=35, lix=True)  # Lix announces 1.35 "forever"
    with sim(store, **args) as c:
        assert c.nix_version == "2.8.0" and c.trust == 1
        if kind == "2.35":
            assert c.features == {FEATURE}  # so SetOptions was sent
        c.op(WireWriter().u64(1).string(HELLO))  # IsValidPath
        assert c.r.u64() == 0
        info = hello_info()
        w = WireWriter().u64(39).string(HELLO).string("").string(info.nar_hash.digest.hex())
        w.strings([]).u64(0).u64(info.nar_size).boolean(False).strings([]).string(HELLO_CA)
        c.op(w.boolean(False).boolean(True).raw(frame(HELLO_NAR)))  # AddToStoreNar (framed NAR)
        c.op(WireWriter().u64(1).string(HELLO))
        assert c.r.u64() == 1
        c.op(WireWriter().u64(26).string(HELLO))  # QueryPathInfo
        assert c.r.u64() == 1
        assert c.r.string() == ""  # deriver
        assert c.r.string() == info.nar_hash.digest.hex()
        c.r.strings()
        c.r.u64()
        assert c.r.u64() == len(HELLO_NAR)
        c.r.u64()
        c.r.strings()
        assert c.r.string() == HELLO_CA
        c.op(WireWriter().u64(9).strings([HELLO]).u64(0))  # BuildPaths
        assert c.r.u64() == 1


# --- our client ------------------------------------------------------------------------------

@pytest.mark.nix
def test_our_client_speaks_1_38_to_our_daemon(tmp_path):
    root, sock = str(tmp_path / "root"), str(tmp_path / "d.sock")
    proc = start_daemon("ours", root, sock, nix_env(str(tmp_path)))
    try:
        with RemoteStore(sock, store_dir="/nix/store") as rs:
            assert (rs.minor, rs.features, rs.trust) == (38, frozenset({FEATURE}), 1)
            a = rs.add_text("a", b"a")
            b = rs.add_text("b", rs.print_path(a.path).encode(), references=[a.path])
        with RemoteStore(sock, store_dir="/nix/store") as rs:  # (without the first one's pins)
            res = rs.collect_garbage(GCOptions(action=DELETE_DEAD, paths=frozenset([a.path]),
                                               specific=True))
            assert res.paths == []  # a is kept by b: skipped, not an error
            res = rs.collect_garbage(GCOptions(action=DELETE_SPECIFIC, paths=frozenset([a.path]),
                                               specific=True, delete_referrers=True))
            assert sorted(res.paths) == sorted(map(rs.print_path, [a.path, b.path]))
    finally:
        stop_process(proc)


@needs_nix
@pytest.mark.nix
def test_our_client_falls_back_to_1_34_against_nix_2_8(tmp_path):
    root, sock = str(tmp_path / "root"), str(tmp_path / "n.sock")
    proc = start_daemon("nix", root, sock, nix_env(str(tmp_path)))
    try:
        with RemoteStore(sock, store_dir="/nix/store") as rs:
            assert (rs.daemon_version, rs.minor, rs.features, rs.trust) == (0x122, 34, frozenset(), 0)
            a = rs.add_text("a", b"a")
            assert rs.is_valid(a.path)
        with RemoteStore(sock, store_dir="/nix/store") as rs:
            with pytest.raises(Exception, match="lacks the protocol feature"):
                rs.collect_garbage(GCOptions(action=DELETE_DEAD, paths=frozenset([a.path]), specific=True))
            res = rs.collect_garbage(GCOptions(action=DELETE_SPECIFIC, paths=frozenset([a.path])))
            assert res.paths == [rs.print_path(a.path)]
    finally:
        stop_process(proc)


# --- a store wiped and re-created under a running daemon ---------------------------------------

def wipe(*dirs: str) -> None:
    """As Nix's test scripts do: rm -rf the store and state dirs; mkdir them again.

    A connection still being served (e.g. the start-up probe of ``wait_for_socket``) may
    be initialising the store meanwhile, as it would under nix-daemon: remove again until
    the rm -rf and the mkdir are ours."""
    for d in dirs:
        for _ in range(100):
            shutil.rmtree(d, ignore_errors=True)
            try:
                os.makedirs(d)
                break
            except FileExistsError:
                continue
        else:
            raise AssertionError(f"cannot wipe {d}: something keeps re-creating it")


@needs_nix
@pytest.mark.nix
def test_store_wiped_under_a_running_daemon(area_factory):
    a = area_factory().start("ours")  # (store paths real on this machine: builds run)
    src = os.path.join(a.work, "hello.txt")
    with open(src, "w") as f:
        f.write("hello\n")
    expr = ('derivation { name = "x"; builder = "/bin/sh"; args = ["-c" "echo hi > $out"]; '
            'system = builtins.currentSystem; }')

    def run(*args: str) -> str:
        return a.run(list(args), check=True).stdout.decode().strip()

    for step in range(3):
        if step == 1:
            wipe(a.store, a.state)
        if step == 2:  # brand-new empty store: not even the dirs
            for d in (a.store, a.state):
                shutil.rmtree(d)
        path = run("nix-store", "--add", src)
        assert run("nix-store", "-q", "--hash", path).startswith("sha256:")
        out = run("nix-build", "--no-out-link", "-E", expr)
        assert open(out).read() == "hi\n"
        assert run("nix-store", "-q", "--references", out) == ""
    # several first connections to a brand-new store at once all succeed
    for _ in range(3):
        wipe(a.store, a.state)
        results: list[object] = [None] * 4

        def one(i: int, results: list[object] = results) -> None:
            try:
                results[i] = run("nix-store", "--add", src)
            except BaseException as e:  # noqa: BLE001
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r == path for r in results), results


def test_store_db_initialisation_is_race_safe(tmp_path):
    """Many processes opening one brand-new store at once: all succeed, one schema."""
    root = str(tmp_path / "root")
    code = ("import sys; from storekeeper.store.local import LocalStore; "
            "from storekeeper.formats.url import LocalLayout; "
            "s = LocalStore(LocalLayout.chroot(sys.argv[1])); s.add_text('t', b't'); s.close()")
    for _ in range(3):
        shutil.rmtree(root, ignore_errors=True)
        procs = [subprocess.Popen([sys.executable, "-c", code, root], stderr=subprocess.PIPE)
                 for _ in range(6)]
        errs = [(p.wait(60), p.stderr.read().decode()) for p in procs]
        assert all(rc == 0 for rc, _ in errs), errs
        with LocalStore(LocalLayout.chroot(root)) as s:
            assert len(s.query_all_valid_paths()) == 1
