"""One contract for the store API, run against three backends with the same test bodies:

* ``local``: :class:`LocalStore` on a temp chroot store, in this process;
* ``ours``: :class:`RemoteStore` -> storekeeper's daemon (a subprocess);
* ``nix``: :class:`RemoteStore` -> the real ``nix-daemon`` 2.8 (the oracle).

Each backend serves one store for the whole module (starting daemons per test
would dominate the run time), so every test uses content of its own and
asserts membership, not equality, on store-wide answers.  Expected paths are
either golden values the real daemon produced or computed with
:mod:`storekeeper.formats` alone, never by the backend under test.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import time

import pytest
from conftest import HAVE_NIX, nix_env
from daemon_util import start_daemon, stop_process

from storekeeper.api import DEAD, DELETE_SPECIFIC, LIVE, GCOptions, Store
from storekeeper.client import DaemonError, RemoteStore
from storekeeper.errors import InvalidPath, StoreError
from storekeeper.formats.contentaddress import FLAT, RECURSIVE, TEXT, ContentAddress
from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import Directory, Regular, Symlink, dump_node, dump_string
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.storepath import StoreDir
from storekeeper.formats.url import LocalLayout
from storekeeper.fs.narfs import dump_path as dump_tree
from storekeeper.store.local import LocalStore

SD = StoreDir("/nix/store")
BAD = SD.parse("/nix/store/00000000000000000000000000000000-nothing-here")

# Golden: what the real nix-daemon 2.8 answered for a file holding "hello\n".
HELLO = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
HELLO_FIXED = {  # algo -> (flat path, recursive path)
    "md5": ("dra1cz5vbrhclpv4y1q0psnbkxz581bk-hello.txt", "l2ycihp9r6lnfifs72r40m62fwicg5iz-hello.txt"),
    "sha1": ("svdva85yi507g9vncgsaxvnd1r808h4w-hello.txt", "hzq8n5jpi3g2d0xhlvqd8q1gx5c9s6i3-hello.txt"),
    "sha256": ("gy454w1cxaq731grqwylhzf4pp9r5izh-hello.txt", "i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"),
    "sha512": ("9a8mxachqmcv8x2cfijdps9dyxgyyrzm-hello.txt", "8xkszhbayigjg9vbrrxfa1hp9qflbh6b-hello.txt"),
}
# Golden: nix-instantiate of a two-output derivation, and its output paths.
DRV_PATH = "/nix/store/26smrbriabgh1h08rza49y0lgcf8i01i-x.drv"
DRV_OUT = "/nix/store/8zwzc6rjxsxf092xb0f1kcjnvmfxmfg7-x"
DRV_DEV = "/nix/store/3rjlja4zgh7n2zx9yxzyx0bbla4z6q17-x-dev"
DRV_TEXT = (
    f'Derive([("dev","{DRV_DEV}","",""),("out","{DRV_OUT}","","")],[],[],"x86_64-linux",'
    f'"/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("dev","{DRV_DEV}"),("name","x"),'
    f'("out","{DRV_OUT}"),("outputs","out dev"),("system","x86_64-linux")])').encode()

TIMEOUT = 60.0


# --- backends --------------------------------------------------------------------------

class Backend:
    """One store; :meth:`open` gives a new handle (a new connection for daemons)."""

    def __init__(self, kind: str, root: str, socket: str | None = None,
                 proc: subprocess.Popen | None = None) -> None:
        self.kind, self.root, self.socket, self.proc = kind, root, socket, proc
        self.log: list[str] = []

    def open(self) -> Store:
        if self.kind == "local":
            return LocalStore(LocalLayout.chroot(self.root))
        return RemoteStore(self.socket, SD, timeout=TIMEOUT, log=self.log.append)


@pytest.fixture(scope="module", params=["local", "ours", "nix"])
def backend(request, tmp_path_factory):
    kind = request.param
    base = tmp_path_factory.mktemp(f"contract-{kind}")
    root = str(base / "root")
    if kind == "local":
        yield Backend(kind, root)
        return
    if kind == "nix" and not HAVE_NIX:
        pytest.skip("real Nix (nix-bin) not installed")
    sock = str(base / "daemon.sock")
    with open(base / "daemon.log", "wb") as log:
        proc = start_daemon(kind, root, sock, nix_env(str(base)), log=log, cwd=str(base))
    try:
        yield Backend(kind, root, sock, proc)
    finally:
        stop_process(proc)


@pytest.fixture
def store(backend) -> Store:
    s = backend.open()
    yield s
    s.close()


def test_every_backend_implements_the_contract(store):
    """The suite below is written against ``storekeeper.api.Store``; each backend must
    have every method of it, with the protocol's parameters."""
    import inspect
    assert isinstance(store, Store)
    for name, member in inspect.getmembers(Store, inspect.isfunction):
        if name.startswith("_"):
            continue
        want = list(inspect.signature(member).parameters)
        got = list(inspect.signature(getattr(store, name)).parameters)
        assert got[:len(want) - 1] == want[1:], (name, got, want)  # (want[0] is self)


def eventually(check, timeout: float = 15.0, interval: float = 0.05):
    """``check()`` once it is truthy: a daemon drops a closed connection's temp roots
    when its connection process exits, a moment after the client closed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def nar_of(path) -> bytes:
    return b"".join(dump_tree(str(path)))


def make_tree(base) -> str:
    d = base / "tree"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(d / "sub" / "run.sh", 0o755)
    (d / "data").write_bytes(b"\0" * 1000 + b"end")
    os.symlink("sub/run.sh", d / "link")
    return str(d)


def assert_topological(order, store) -> None:
    """Every path comes before the paths it refers to."""
    pos = {p: i for i, p in enumerate(order)}
    for p in order:
        for ref in store.query_references(p):
            if ref in pos and ref != p:
                assert pos[p] < pos[ref]


# --- adding and querying ------------------------------------------------------------------

def test_add_path_and_its_info(store, tmp_path):
    (tmp_path / "hello.txt").write_text("hello\n")
    info = store.add_path(str(tmp_path / "hello.txt"))
    assert store.print_path(info.path) == HELLO
    nar = dump_string(b"hello\n")
    assert (info.nar_hash, info.nar_size) == (Hash.of("sha256", nar), len(nar))
    assert info.ca == "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
    assert (info.references, info.deriver, info.ultimate, info.sigs) == (frozenset(), None, False, frozenset())

    tree = make_tree(tmp_path)
    t = store.add_path(tree, name="contract-tree")
    nar = nar_of(tree)
    want = ContentAddress(RECURSIVE, Hash.of("sha256", nar)).store_path(SD, "contract-tree")
    assert t.path == want and t.nar_hash == Hash.of("sha256", nar) and t.nar_size == len(nar)
    assert b"".join(store.dump_path(t.path)) == nar
    again = store.add_path(tree, name="contract-tree")  # adding twice is a no-op
    assert (again.path, again.nar_hash, again.ca) == (t.path, t.nar_hash, t.ca)

    got = store.path_info(t.path)
    assert got.with_(registration_time=0) == t.with_(registration_time=0)
    assert store.query_path_info(t.path) == got
    assert store.is_valid(t.path) and store.pin_valid(t.path)
    store.ensure_path(t.path)
    assert store.query_path_from_hash_part(t.path.hash_part) == t.path
    assert store.query_valid_paths([t.path, info.path, BAD]) == {t.path, info.path}
    assert {t.path, info.path} <= store.query_all_valid_paths()
    assert store.query_references(t.path) == set() and store.query_referrers(t.path) == set()


@pytest.mark.parametrize("algo", sorted(HELLO_FIXED))
def test_fixed_outputs_flat_and_recursive(store, tmp_path, algo):
    src = tmp_path / "hello.txt"
    src.write_text("hello\n")
    flat_base, rec_base = HELLO_FIXED[algo]
    flat = store.add_path(str(src), recursive=False, algo=algo)
    rec = store.add_path(str(src), recursive=True, algo=algo)
    assert (flat.path.base, rec.path.base) == (flat_base, rec_base)
    nar = dump_string(b"hello\n")
    assert flat.ca == ContentAddress(FLAT, Hash.of(algo, b"hello\n")).render()
    assert rec.ca == ContentAddress(RECURSIVE, Hash.of(algo, nar)).render()
    for info in (flat, rec):  # the NAR hash is SHA-256 of the NAR whatever the CA algo
        assert (info.nar_hash, info.nar_size) == (Hash.of("sha256", nar), len(nar))
        assert store.path_info(info.path).ca == info.ca
    tree = make_tree(tmp_path)
    t = store.add_path(tree, name=f"tree-{algo}", recursive=True, algo=algo)
    assert t.path == ContentAddress(RECURSIVE, Hash.of(algo, nar_of(tree))).store_path(SD, f"tree-{algo}")
    with pytest.raises(StoreError, match="not a regular file"):
        store.add_path(tree, recursive=False, algo=algo)


def test_text_paths_references_closure_and_order(store):
    def text(name: str, body: bytes, refs=()):
        info = store.add_text(name, body, refs)
        assert info.path == SD.make_text_path(name, Hash.of("sha256", body), refs)
        assert info.ca == ContentAddress(TEXT, Hash.of("sha256", body)).render()
        assert info.nar_hash == Hash.of("sha256", dump_string(body))
        assert info.references == frozenset(refs)
        return info.path

    a = text("ct-a", b"leaf")
    b = text("ct-b", f"b needs {SD.print(a)}".encode(), [a])
    c = text("ct-c", f"c needs {SD.print(b)} {SD.print(a)}".encode(), [a, b])
    d = text("ct-d", f"d needs {SD.print(c)}".encode(), [c])
    e = text("ct-e", f"e needs {SD.print(a)}".encode(), [a])
    assert store.query_references(c) == {a, b}
    assert store.query_referrers(a) == {b, c, e}
    assert store.query_referrers(d) == set()
    closure = store.query_closure([d])
    assert closure == {a, b, c, d}
    assert store.topo_sort(closure) == [d, c, b, a]
    both = store.query_closure([d, e])
    order = store.topo_sort(both)
    assert set(order) == both and order[-1] == a
    assert_topological(order, store)
    assert store.topo_sort([e, d, a]) == store.topo_sort([a, d, e])  # deterministic


def test_invalid_paths_raise_the_same_errors(store):
    ok = store.add_text("ct-valid", b"valid")
    assert not store.is_valid(BAD)
    assert store.query_path_info(BAD) is None
    assert store.query_valid_paths([BAD]) == set()
    assert store.query_path_from_hash_part(BAD.hash_part) is None
    assert store.query_valid_derivers(BAD) == set()
    assert not store.pin_valid(BAD)
    for call in (store.path_info, store.query_references, store.query_referrers,
                 store.query_derivation_outputs, store.dump_path, store.ensure_path,
                 lambda p: store.query_closure([p]), lambda p: store.topo_sort([ok.path, p]),
                 lambda p: store.add_signatures(p, ["k:" + base64.b64encode(b"s").decode()])):
        with pytest.raises(InvalidPath, match=f"'{SD.print(BAD)}'"):
            call(BAD)
    with pytest.raises(InvalidPath, match=f"reference '{SD.print(BAD)}' is not valid"):
        store.add_text("ct-dangling", b"x", [BAD])
    assert not store.is_valid(SD.make_text_path("ct-dangling", Hash.of("sha256", b"x"), [BAD]))
    assert store.is_valid(ok.path)  # still usable


# --- NARs in and out --------------------------------------------------------------------------

def test_nar_import_and_dump(store):
    tree = Directory({b"bin": Directory({b"tool": Regular(True, b"#!/bin/sh\n")}),
                      b"doc": Regular(False, b"contract\n" * 50), b"ln": Symlink(b"bin/tool")})
    nar = dump_node(tree)
    ca = ContentAddress(RECURSIVE, Hash.of("sha256", nar))
    sp = ca.store_path(SD, "ct-imported")
    info = ValidPathInfo(sp, Hash.of("sha256", nar), len(nar), ca=ca.render())
    stream = io.BytesIO(nar + b"TRAILER")
    got = store.add_nar(info, stream)
    assert stream.read() == b"TRAILER"  # exactly the NAR was read
    assert got.with_(registration_time=0) == info
    assert b"".join(store.dump_path(sp)) == nar
    assert store.add_nar(info, io.BytesIO(nar)).path == sp  # again: a no-op

    # Input-addressed, with references and a deriver (trusted: no signature needed).
    drv = store.add_text("x.drv", DRV_TEXT).path
    out_nar = dump_string(f"uses {SD.print(sp)}\n".encode())
    out = ValidPathInfo(SD.parse(DRV_OUT), Hash.of("sha256", out_nar), len(out_nar),
                        frozenset({sp}), drv)
    assert store.add_nar(out, io.BytesIO(out_nar)).with_(registration_time=0) == out
    assert store.query_referrers(sp) == {out.path}
    assert store.query_closure([out.path]) == {out.path, sp}
    assert store.query_closure([out.path], include_derivers=True) == {out.path, sp, drv}
    assert store.query_closure([drv], include_outputs=True) == {drv, out.path, sp}
    assert store.query_valid_derivers(out.path) == {drv}


def test_nar_import_with_bad_metadata_registers_nothing(store):
    nar = dump_string(b"checked contents\n")
    ca = ContentAddress(RECURSIVE, Hash.of("sha256", nar))
    sp = ca.store_path(SD, "ct-checked")
    good = ValidPathInfo(sp, Hash.of("sha256", nar), len(nar), ca=ca.render())
    unsigned = ValidPathInfo(SD.parse("/nix/store/22222222222222222222222222222222-ct-unsigned"),
                             Hash.of("sha256", nar), len(nar))
    cases = [
        (good.with_(nar_hash=Hash.of("sha256", b"something else")), "hash mismatch importing path"),
        (good.with_(nar_size=len(nar) + 8), "size mismatch importing path"),
        (good.with_(ca=ContentAddress(RECURSIVE, Hash.of("sha256", b"x")).render()),
         "ca hash mismatch importing path"),
    ]
    for bad, message in cases:
        with pytest.raises(StoreError, match=message):
            store.add_nar(bad, io.BytesIO(nar))
        assert not store.is_valid(sp)
    with pytest.raises(StoreError, match="lacks a valid signature"):
        store.add_nar(unsigned, io.BytesIO(nar), check_sigs=True)
    assert not store.is_valid(unsigned.path)
    assert sp not in store.query_all_valid_paths()
    # The same connection goes on working, and the right metadata is accepted.
    assert store.add_nar(good, io.BytesIO(nar)).path == sp
    assert store.add_nar(good.with_(ca=None), io.BytesIO(nar)).ca == good.ca  # already valid


def test_add_dump_from_streams(store, tmp_path):
    tree = make_tree(tmp_path)
    nar = nar_of(tree)
    stream = io.BytesIO(nar + b"more")
    info = store.add_dump(stream, "ct-dumped", RECURSIVE, "sha512")
    assert stream.read() == b"more"
    assert info.path == ContentAddress(RECURSIVE, Hash.of("sha512", nar)).store_path(SD, "ct-dumped")
    flat = store.add_dump(io.BytesIO(b"flat bytes"), "ct-flat", FLAT, "sha1")
    assert flat.path == ContentAddress(FLAT, Hash.of("sha1", b"flat bytes")).store_path(SD, "ct-flat")
    assert flat.nar_hash == Hash.of("sha256", dump_string(b"flat bytes"))
    text = store.add_dump(io.BytesIO(b"text"), "ct-text", TEXT, references=[flat.path])
    assert text.path == SD.make_text_path("ct-text", Hash.of("sha256", b"text"), [flat.path])
    assert text.references == {flat.path}


# --- GC, signatures, verification -----------------------------------------------------------------

def test_gc_print_dead_and_delete_an_unrooted_path(backend, store):
    with backend.open() as other:
        junk = other.add_text("ct-junk", b"nobody wants me").path
        base = other.add_text("ct-base", b"base").path
        user = other.add_text("ct-user", f"uses {SD.print(base)}".encode(), [base]).path

    def dead() -> set[str]:
        return set(store.collect_garbage(GCOptions(action=DEAD)).paths)

    # Once the adding connection is gone nothing holds them.
    assert eventually(lambda: {SD.print(junk), SD.print(base), SD.print(user)} <= dead())
    store.pin(user)  # now `user` and, through it, `base` are alive
    live = set(store.collect_garbage(GCOptions(action=LIVE)).paths)
    assert {SD.print(user), SD.print(base)} <= live and SD.print(junk) not in live
    now_dead = dead()
    assert SD.print(junk) in now_dead and not {SD.print(user), SD.print(base)} & now_dead
    with pytest.raises(StoreError, match="since it is still alive"):
        store.collect_garbage(GCOptions(action=DELETE_SPECIFIC, paths=frozenset({base})))
    assert store.is_valid(base)
    result = store.collect_garbage(GCOptions(action=DELETE_SPECIFIC, paths=frozenset({junk})))
    assert result.paths == [SD.print(junk)] and result.bytes_freed > 0
    assert not store.is_valid(junk) and store.is_valid(user) and store.is_valid(base)
    assert SD.print(junk) not in dead()


def test_signatures(store):
    p = store.add_text("ct-signed", b"signed").path
    sig1 = "cache.example.org-1:" + base64.b64encode(bytes(range(64))).decode()
    sig2 = "other-1:" + base64.b64encode(bytes(64)).decode()
    store.add_signatures(p, [sig1])
    assert store.path_info(p).sigs == {sig1}
    store.add_signatures(p, [sig2, sig1])
    assert store.path_info(p).sigs == {sig1, sig2}


def test_verify_and_pins(store):
    p = store.add_text("ct-verified", b"verified").path
    report = store.verify(check_contents=True)
    assert report.ok and report.errors == [] and report.checked >= 1
    assert store.pin_valid(p) and not store.pin_valid(BAD)
    store.ensure_path(p)


def test_derivations(store):
    drv = store.add_text("x.drv", DRV_TEXT)
    assert store.print_path(drv.path) == DRV_PATH and drv.references == frozenset()
    outputs = store.query_derivation_outputs(drv.path)
    assert {k: SD.print(v) for k, v in outputs.items()} == {"out": DRV_OUT, "dev": DRV_DEV}
    assert store.query_valid_derivers(SD.parse(DRV_DEV)) == {drv.path}
    parsed = store.read_derivation(drv.path)
    assert {name: o.path for name, o in parsed.outputs.items()} == {"out": DRV_OUT, "dev": DRV_DEV}
    assert store.query_closure([drv.path], include_outputs=True) >= {drv.path}
    plain = store.add_text("ct-not-a-drv", b"plain").path
    assert store.query_derivation_outputs(plain) == {}


def test_large_paths_stream_both_ways(store, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20) * 9)  # more than one frame, and spooled when dumped
    info = store.add_path(str(big), name="ct-big")
    nar = nar_of(big)
    assert info.nar_hash == Hash.of("sha256", nar) and info.nar_size == len(nar)
    got = Hash.of("sha256", b"".join(store.dump_path(info.path)))
    assert got == info.nar_hash


class _Failing(io.RawIOBase):
    """A stream that fails after ``good`` bytes."""

    def __init__(self, data: bytes, good: int) -> None:
        self._data, self._good, self._pos = data, good, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._pos >= self._good:
            raise OSError(5, "simulated read error")
        n = min(n if n >= 0 else len(self._data), self._good - self._pos)
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out


def test_failed_uploads_register_nothing(backend, store):
    nar = dump_string(b"half of me\n" * 1000)
    ca = ContentAddress(RECURSIVE, Hash.of("sha256", nar))
    sp = ca.store_path(SD, "ct-half")
    with pytest.raises(OSError, match="simulated read error"):
        store.add_dump(_Failing(nar, len(nar) // 2), "ct-half", RECURSIVE)
    flat_path = ContentAddress(FLAT, Hash.of("sha256", b"x" * 5000)).store_path(SD, "ct-half-flat")
    with backend.open() as other:
        # (a flat payload is not self-delimiting: a daemon must never see it end early)
        with pytest.raises(OSError, match="simulated read error"):
            other.add_dump(_Failing(b"x" * 5000, 2500), "ct-half-flat", FLAT)
    with pytest.raises(StoreError):  # BadArchive, whoever finds out
        with backend.open() as third:
            third.add_nar(ValidPathInfo(sp, Hash.of("sha256", nar), len(nar), ca=ca.render()),
                          io.BytesIO(nar[:100] + b"garbage" + nar[107:]))
    with backend.open() as check:
        assert not check.is_valid(sp) and not check.is_valid(flat_path)
        assert check.add_dump(io.BytesIO(nar), "ct-half", RECURSIVE).path == sp


@pytest.mark.parametrize("backend", ["ours", "nix"], indirect=True)  # a daemon's behaviour
def test_daemon_errors_keep_the_connection(backend, store):
    with pytest.raises(DaemonError, match="not allowed to ignore liveness"):
        store.collect_garbage(GCOptions(action=DEAD, ignore_liveness=True))
    assert store.add_text("ct-after-error", b"fine").path
    assert store.daemon_nix_version == "2.8.0"
