"""Substitution queries on the wire, in process (fast tier), against the caches Nix
2.8 wrote (../shared/spec/binary-cache-vectors): which substituters a client may
use, QueryMissing's willSubstitute and sizes, QuerySubstitutablePathInfos,
HasSubstitutes/QuerySubstitutablePaths and WantMassQuery, EnsurePath.  Through real
Nix clients and daemons: ``test_substitute.py``."""

from __future__ import annotations

import io
import os
import shutil

import pytest
from daemon_util import SHARED, read_log, run_session, strip_ansi

from storekeeper.daemon.trust import DaemonConfig, PeerInfo
from storekeeper.formats.narinfo import NarInfo
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import Op, Stderr, WireReader, WireWriter
from storekeeper.store.local import LocalStore

VECTORS = os.path.join(SHARED, "spec", "binary-cache-vectors")
HELLO_1_34 = WireWriter().u64(0x6E697863).u64(0x122).u64(0).u64(0).take()
A = "/nix/store/2qzxavkmc1a53hdc058phqdqyic53b67-a.txt"
B = "/nix/store/abdy0gp06c21k6cn2fd0w9l07x5drjgh-b.txt"
HELLO = "/nix/store/5m5ci15djpxd4bs7xa0208nhkhi6cbp3-hello.txt"


@pytest.fixture
def cache(tmp_path):
    d = str(tmp_path / "cache-zstd")
    shutil.copytree(os.path.join(VECTORS, "nix28-file-zstd"), d)
    return d


@pytest.fixture
def store(tmp_path):
    s = LocalStore(LayoutFor(tmp_path))
    yield s
    s.close()


def LayoutFor(tmp_path) -> LocalLayout:  # noqa: N802 -- reads as a type
    return LocalLayout.chroot(str(tmp_path / "root"))


def narinfo(cache: str, path: str) -> NarInfo:
    from storekeeper.formats.storepath import StoreDir
    with open(os.path.join(cache, os.path.basename(path)[:32] + ".narinfo"), "rb") as f:
        return NarInfo.parse(f.read(), StoreDir("/nix/store"))


def set_options(overrides: dict[str, str], fallback: int = 0) -> bytes:
    w = WireWriter().u64(Op.SetOptions)
    for v in (0, 0, fallback, 3, 1, 0, 0, 0, 0, 0, 1, 1):
        w.u64(v)
    return w.string_map(overrides).take()


def session(store, requests: bytes, trusted: bool, config: DaemonConfig | None = None):
    peer = PeerInfo(1, 1000, 1000, "someone", "users")
    out = run_session(store, HELLO_1_34 + requests, trusted=trusted, config=config, peer=peer)
    r = WireReader(io.BytesIO(out))
    r.u64(), r.u64(), r.string()
    assert read_log(r)[0]
    return r


def texts(msgs) -> list[str]:
    return [strip_ansi(m.payload) for m in msgs if m.kind is Stderr.NEXT]


def query_missing(paths: list[str]) -> bytes:
    return WireWriter().u64(Op.QueryMissing).strings(paths).take()


def test_untrusted_client_cannot_add_a_substituter_not_in_trusted_substituters(store, cache):
    url = f"file://{cache}"
    r = session(store, set_options({"substituters": url}) + query_missing([B]), trusted=False)
    ok, msgs = read_log(r)
    assert ok and f"warning: ignoring untrusted substituter '{url}'" in "".join(texts(msgs))
    ok, _ = read_log(r)
    assert ok
    assert (r.strings(), r.strings(), r.strings(), r.u64(), r.u64()) == ([], [], [B], 0, 0)


def test_trusted_substituter_gives_will_substitute_and_nix_sizes(store, cache):
    url = f"file://{cache}"
    config = DaemonConfig(trusted_substituters=(url + "/",))  # a trailing / is the same URL
    r = session(store, set_options({"substituters": url}) + query_missing([B]), trusted=False,
                config=config)
    ok, msgs = read_log(r)
    assert ok and not texts(msgs)
    assert read_log(r)[0]
    will_build, will_sub, unknown = r.strings(), r.strings(), r.strings()
    infos = [narinfo(cache, p) for p in (A, B)]
    assert (will_build, sorted(will_sub), unknown) == ([], [A, B], [])
    assert r.u64() == sum(i.file_size or 0 for i in infos)
    assert r.u64() == sum(i.nar_size for i in infos)
    assert not store.is_valid(store.store_dir.parse(B))  # a question only


def test_substitutable_path_infos_and_mass_query(store, cache):
    url = f"file://{cache}"
    req = (set_options({"substituters": url})
           + WireWriter().u64(Op.QuerySubstitutablePathInfos).string_map({B: "", HELLO: ""}).take()
           + WireWriter().u64(Op.HasSubstitutes).string(B).take())
    r = session(store, req, trusted=True)
    assert read_log(r)[0]
    assert read_log(r)[0]
    got = {}
    for _ in range(r.u64()):
        path = r.string()
        got[path] = (r.string(), r.strings(), r.u64(), r.u64())
    for p in (B, HELLO):
        ni = narinfo(cache, p)
        assert got[p] == ("", sorted(store.store_dir.print(x) for x in ni.references),
                          ni.file_size, ni.nar_size)
    # Nix's file:// caches say no WantMassQuery: HasSubstitutes does not consult them
    assert read_log(r)[0]
    assert r.u64() == 0
    with open(os.path.join(cache, "nix-cache-info"), "a") as f:
        f.write("WantMassQuery: 1\n")
    req = (set_options({"substituters": url}) + WireWriter().u64(Op.HasSubstitutes).string(B).take()
           + WireWriter().u64(Op.QuerySubstitutablePaths).strings([A, HELLO, B]).take())
    r = session(store, req, trusted=True)
    assert read_log(r)[0]
    assert read_log(r)[0]
    assert r.u64() == 1
    assert read_log(r)[0]
    assert sorted(r.strings()) == sorted([A, B, HELLO])


def test_ensure_path_substitutes_references_first_and_keeps_sigs(store, cache):
    url = f"file://{cache}"
    req = set_options({"substituters": url}) + WireWriter().u64(Op.EnsurePath).string(B).take()
    r = session(store, req, trusted=True)
    assert read_log(r)[0]
    ok, msgs = read_log(r)
    assert ok, msgs
    assert r.u64() == 1
    sd = store.store_dir
    for p in (A, B):
        info = store.query_path_info(sd.parse(p))
        ni = narinfo(cache, p)
        assert info is not None and info.nar_hash == ni.nar_hash and info.sigs == ni.sigs
        assert info.ca == ni.ca and info.references == ni.references


def test_no_substituters_when_the_client_turns_them_off(store, cache):
    url = f"file://{cache}"
    w = WireWriter().u64(Op.SetOptions)
    for v in (0, 0, 0, 3, 1, 0, 0, 0, 0, 0, 1, 0):  # useSubstitutes = 0
        w.u64(v)
    req = w.string_map({"substituters": url}).take() + WireWriter().u64(Op.EnsurePath).string(B).take()
    r = session(store, req, trusted=True)
    assert read_log(r)[0]
    ok, msgs = read_log(r)
    assert not ok and "does not exist and cannot be created" in str(msgs[-1].payload)
