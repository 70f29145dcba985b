"""storekeeper's read-only inspection operations (ExtOp 1200–1202) on the wire, in
process: what they answer, and what an untrusted peer is not shown.  Through the CLI
and real users: ``test_cli_daemon.py``, ``test_user_registrations.py``."""

from __future__ import annotations

import io
import json

import pytest
from daemon_util import read_log, run_session

from storekeeper.daemon.trust import PeerInfo
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import ExtOp, WireReader, WireWriter
from storekeeper.store.gc.chain import why_alive
from storekeeper.store.gc.inspect import gc_dry_run
from storekeeper.store.local import LocalStore
from storekeeper.store.optimise import pool_stats
from storekeeper.store.roots import registrations

HELLO_1_34 = WireWriter().u64(0x6E697863).u64(0x122).u64(0).u64(0).take()
OTHER_UID = 4242
SECRET = "elsewhere:/home/other/secret-project/result"


@pytest.fixture
def layout(tmp_path):
    return LocalLayout.chroot(str(tmp_path / "root"))


def ask(store, requests: bytes, trusted: bool, uid: int = 1000) -> WireReader:
    """The daemon's answers to ``requests`` from peer ``uid``, read past the handshake."""
    peer = PeerInfo(1, uid, uid, "someone", "users")
    r = WireReader(io.BytesIO(run_session(store, HELLO_1_34 + requests, trusted=trusted, peer=peer)))
    r.u64(), r.u64(), r.string()  # magic, version, Nix version
    assert read_log(r)[0]
    return r


def test_inspection_ops_answer_as_the_store_and_censor_others_roots(layout):
    with LocalStore(layout) as adder:  # (its temp roots end with it)
        a = adder.add_text("a.txt", b"a" * 3000).path
        b = adder.add_text("b.txt", f"uses {adder.print_path(a)}".encode(), [a]).path
        junk = adder.add_text("junk.txt", b"j" * 5000).path
        registrations.register_roots(adder, OTHER_UID, [(SECRET, b)])
    store = LocalStore(layout)
    requests = (WireWriter().u64(ExtOp.WhyAlive).string(store.print_path(a))
                .u64(ExtOp.GCDryRun)
                .u64(ExtOp.StoreStats)
                .u64(ExtOp.WhyAlive).string(store.print_path(junk)).take())
    answers = {}
    for trusted in (True, False):
        r = ask(store, requests, trusted)
        out = []
        assert read_log(r)[0]
        out.append([(r.string(), r.string()) for _ in range(r.count("chain"))])
        assert read_log(r)[0]
        out.append((r.strings(), r.u64(), r.u64()))
        assert read_log(r)[0]
        out.append(json.loads(r.string()))
        assert read_log(r)[0]
        out.append(r.u64())
        answers[trusted] = out
    chain, dry, stats, unreachable = answers[True]
    assert chain == why_alive(store, a) == [(f"{SECRET} (registered root)", store.print_path(b)),
                                            ("reference", store.print_path(a))]
    local_dry = gc_dry_run(store)
    assert dry == (local_dry.paths, local_dry.bytes_freed, local_dry.apparent_bytes_freed)
    assert dry[0] == [store.print_path(junk)] and dry[2] == 5000
    assert stats == pool_stats(store).to_json()
    assert unreachable == 0
    # an untrusted peer sees the same, but not the name of another user's root
    assert answers[False] == [[("{censored} (registered root)", store.print_path(b)), chain[1]],
                              dry, stats, 0]
    assert store.is_valid(junk)  # the dry runs deleted nothing
    store.close()


def test_why_alive_of_an_invalid_path_is_an_error(layout):
    store = LocalStore(layout)
    nope = "/nix/store/00000000000000000000000000000000-nope"
    r = ask(store, WireWriter().u64(ExtOp.WhyAlive).string(nope).take(), trusted=False)
    ok, msgs = read_log(r)
    assert not ok and msgs[-1].payload.message == f"path '{nope}' is not valid"
    store.close()


def test_space_report_through_the_daemon_is_the_local_report(layout):
    """``du`` through a daemon (ExtOp.SpaceReport): the report the store computes locally,
    masks and root bits included (``--by user``); an untrusted peer is not shown the
    link of another user's registered root, but its bytes are counted the same."""
    from storekeeper.store.du import SpaceReport, by_owner, compute
    with LocalStore(layout) as adder:
        a = adder.add_text("a.txt", b"a" * 30000).path
        b = adder.add_text("b.txt", f"uses {adder.print_path(a)}".encode(), [a]).path
        c = adder.add_text("c.txt", b"c" * 9000).path
        registrations.register_roots(adder, OTHER_UID, [(SECRET, b)])
        registrations.register_roots(adder, 1000, [("mine", c)])
    store = LocalStore(layout)
    requests = (WireWriter().u64(ExtOp.SpaceReport).u64(0).u64(5)
                .u64(ExtOp.SpaceReport).u64(1).u64(5).take())
    for trusted in (True, False):
        r = ask(store, requests, trusted)
        got = []
        for _ in range(2):
            assert read_log(r)[0]
            got.append(json.loads(r.string()))
        for obj, nar in zip(got, (False, True)):
            local = compute(store, nar=nar, top=5)
            back = SpaceReport.from_wire(obj)
            assert by_owner(back) == by_owner(local)
            links = sorted(x.link for x in back.roots)
            if trusted:
                assert obj == local.to_wire()
                assert back.to_json() == local.to_json()
                assert SECRET in links
            else:
                assert SECRET not in links and "{censored}" in links and "mine" in links
                assert back.live_bytes == local.live_bytes and back.masks == local.masks
    assert got[1]["liveBytes"] == sum(store.query_path_info(p).nar_size for p in (a, b, c))
    store.close()
