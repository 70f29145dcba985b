"""Fleet cache GC (issue 18, docs/CACHE-GC.md): each race of the protocol played out
step by step with a fake clock and hooks (no sleeps), on a file:// cache and on an S3
server (moto, loopback; slow tier).  Each race test checks the closure and content
invariants over the whole cache; one control test shows the same interleaving
breaking them without a lease."""

from __future__ import annotations

import json
import os
import time
from itertools import combinations_with_replacement

import pytest
from gc_cache_util import Graph, clock, present, timings, violations
from test_cache import store_for
from test_cache_s3 import moto  # noqa: F401 -- fixture

from storekeeper.cache import open_cache
from storekeeper.cache.copy import copy_from_cache, copy_to_cache
from storekeeper.cache.gc import (
    Clock,
    Collector,
    Lease,
    audit,
    copy_with_lease,
    live_roots,
    pin,
    put_root,
    read_roots,
    unpin,
)
from storekeeper.cache.gc.objects import CONDEMNED, LEASES, Record
from storekeeper.cli.main import main
from storekeeper.errors import StoreError

KINDS = ["file", pytest.param("s3", marks=pytest.mark.slow)]


@pytest.fixture(params=KINDS)
def url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/cache?compression=none"
    port = request.getfixturevalue("moto")
    import boto3
    mp = request.getfixturevalue("monkeypatch")
    mp.setenv("AWS_ACCESS_KEY_ID", "test")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
    name = f"gc-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                 region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}?endpoint=127.0.0.1:{port}&scheme=http&region=us-east-1&compression=none"


@pytest.fixture
def g(tmp_path):
    return Graph(tmp_path)


def _push(g, url, paths, clk, t, root=None, **kw):
    return copy_with_lease(g.store, open_cache(url), paths, root=root, clock=clk, timings=t,
                           renew_in_background=False, **kw)


def test_gc_keeps_rooted_closures_and_deletes_the_rest(g, url):
    clk, t = clock(), timings()
    _push(g, url, [g.app1], clk, t, root="ci/1")
    _push(g, url, [g.top], clk, t)
    cache = open_cache(url)
    rep = Collector(cache.backend, t, clk).run()
    assert present(cache, g.lib, g.app1, g.app2, g.top) == [True, True, False, False]
    assert (rep.narinfos_deleted, rep.nars_deleted, rep.live) == (2, 2, 2)
    assert violations(cache) == []
    assert not list(cache.backend.list_keys(CONDEMNED)) and not list(cache.backend.list_keys(LEASES))


def test_race_gc_condemns_while_a_writer_checks_presence_lease_seen(g, url):
    """The writer's lease is stored after the GC published but before it re-read: the GC
    spares what the writer relies on (lib), and the writer waited for it."""
    clk, t = clock(), timings()
    _push(g, url, [g.lib], clk, t)                       # lib: in the cache, unrooted
    cache = open_cache(url)
    gc = Collector(cache.backend, t, clk)
    gc.mark()
    gc.publish()
    assert gc.dead == {g.lib.hash_part}

    def on_sleep(_s):  # the writer waits for the collection: let it finish meanwhile
        clk.on_sleep = None
        gc.settle()
        gc.reread()
        gc.sweep()
        gc.finish()
    clk.on_sleep = on_sleep
    r = _push(g, url, [g.app2], clk, t, root="keep")
    assert gc.report.spared == 1 and gc.report.narinfos_deleted == 0
    assert r.skipped == [g.lib] and r.copied == [g.app2]
    assert present(cache, g.lib, g.app2) == [True, True] and violations(cache) == []


def test_race_gc_condemns_while_a_writer_checks_presence_lease_late(g, url):
    """The writer's lease comes after the GC's re-read: the writer sees the condemned set,
    waits until the collection is over, then finds lib gone and uploads it again."""
    clk, t = clock(), timings()
    _push(g, url, [g.lib], clk, t)
    cache = open_cache(url)
    gc = Collector(cache.backend, t, clk)
    gc.mark()
    gc.publish()
    gc.settle()
    gc.reread()
    waits = []

    def on_sleep(_s):
        waits.append(1)
        clk.on_sleep = None
        gc.sweep()
        gc.finish()
    clk.on_sleep = on_sleep
    r = _push(g, url, [g.app2], clk, t, root="keep")
    assert waits == [1] and gc.report.narinfos_deleted == 1
    assert r.copied == [g.lib, g.app2]                  # re-uploaded after the deletion
    assert present(cache, g.lib, g.app2) == [True, True] and violations(cache) == []


def test_control_without_a_lease_the_same_interleaving_breaks_the_closure(g, url):
    """The plain copy (no lease) checked presence, then the GC ran: app2 is committed
    with lib gone.  This is the race the protocol closes."""
    clk, t = clock(), timings()
    _push(g, url, [g.lib], clk, t)
    cache = open_cache(url)
    ran = []

    def progress(done, total, nbytes):
        if not ran:  # after the presence check, before app2's narinfo
            ran.append(Collector(cache.backend, t, clk).run())
    copy_to_cache(g.store, cache, [g.app2], progress=progress)
    assert ran[0].narinfos_deleted == 1
    assert violations(cache) == [f"{g.app2.hash_part}.narinfo: reference {g.lib.hash_part} missing"]


def test_race_lease_expires_mid_upload(g, url):
    """The writer stalls past its lease while uploading; a GC that ignores the expired
    lease deletes lib; the writer notices before committing and starts again."""
    clk, t = clock(), timings()
    _push(g, url, [g.lib], clk, t)
    cache = open_cache(url)
    events = []

    def hook(step, actor):
        events.append(step)
        if step == "writer.uploaded" and "writer.lapsed" not in events:
            clk.t += t.lease_ttl + t.skew + 1          # the writer froze
            events.append(Collector(cache.backend, t, clk).run().narinfos_deleted)
    r = _push(g, url, [g.top], clk, t, root="r", hook=hook)
    assert events.count("writer.lapsed") == 1 and 1 in events  # lib was deleted meanwhile
    assert set(r.copied) == {g.lib, g.app2, g.top}
    assert present(cache, g.lib, g.app2, g.top) == [True, True, True] and violations(cache) == []


def test_race_two_gcs_at_once(g, url):
    """Two collections interleaved step by step (one's sweep runs inside the other's first
    delete); the cache is checked before every delete batch of either; a writer that
    came in between is covered against both."""
    clk, t = clock(), timings()
    _push(g, url, [g.app1], clk, t, root="a")
    _push(g, url, [g.top, g.twin_b], clk, t)
    cache = open_cache(url)
    seen = []

    def check(step, actor):
        if step == "gc.delete":
            seen.append(violations(cache))
    g1 = Collector(cache.backend, t, clk, hook=check)
    g2 = Collector(cache.backend, t, clk, hook=check)
    g1.mark()
    g2.mark()
    _push(g, url, [g.twin_b], clk, t, root="b")  # rooted after both marks
    g1.publish()
    g2.publish()
    g1.settle()
    g1.reread()
    g2.reread()

    def check_and_run_g2(step, actor):
        check(step, actor)
        if step == "gc.delete" and not g2.deleted:
            g2.sweep()
            g2.finish()
    g1.hook = check_and_run_g2
    g1.sweep()
    g1.finish()
    assert all(v == [] for v in seen) and len(seen) >= 4
    assert g1.report.spared == g2.report.spared == 1
    assert present(cache, g.lib, g.app1, g.app2, g.top, g.twin_b) == [True, True, False, False, True]
    assert violations(cache) == []
    assert not list(cache.backend.list_keys(CONDEMNED))


def test_race_nar_shared_by_a_live_and_a_dead_narinfo(g, url, tmp_path):
    clk, t = clock(), timings()
    _push(g, url, [g.twin_a], clk, t, root="live")
    _push(g, url, [g.twin_b], clk, t)
    cache = open_cache(url)
    nars = [e.key for e in cache.backend.list_keys("nar/")]
    assert len(nars) == 1                               # one NAR, two narinfos
    rep = Collector(cache.backend, t, clk).run()
    assert (rep.narinfos_deleted, rep.nars_deleted) == (1, 0)
    assert present(cache, g.twin_a, g.twin_b) == [True, False]
    dest = store_for(tmp_path / "dest", "/nix/store")
    copy_from_cache(open_cache(url), dest, [g.twin_a], keys={}, check_sigs=False)
    assert dest.query_valid_paths([g.twin_a]) == {g.twin_a}
    # and once the live one is unpinned, both go
    assert unpin(cache.backend, "live")
    rep = Collector(cache.backend, t, clk).run()
    assert (rep.narinfos_deleted, rep.nars_deleted) == (1, 1)
    assert not list(cache.backend.list_keys("nar/"))


def test_nar_grace_defers_the_nar_of_a_dead_narinfo(g, url):
    clk, t = clock(), timings(nar_grace=3600.0)
    _push(g, url, [g.app1], clk, t)
    cache = open_cache(url)
    rep = Collector(cache.backend, t, clk).run()
    assert (rep.narinfos_deleted, rep.nars_deleted, rep.nars_deferred) == (2, 0, 2)
    clk.t += 1800
    assert Collector(cache.backend, t, clk).run().nars_deleted == 0
    clk.t += 1801
    rep = Collector(cache.backend, t, clk).run()
    assert rep.nars_deleted == 2 and not list(cache.backend.list_keys("nar/"))
    assert not list(cache.backend.list_keys("gc/deferred/"))


def test_roots_ttl_and_keep_last_n(g, url):
    clk, t = clock(), timings()
    cache = open_cache(url)
    _push(g, url, [g.app1], clk, t, root="main/1")
    clk.t += 10
    _push(g, url, [g.top], clk, t, root="main/2", keep=1)
    _push(g, url, [g.twin_a], clk, t, root="pr-7", root_ttl=100)
    live, dead = live_roots(read_roots(cache.backend), clk.now(), t.skew)
    assert sorted(r.key for r in live) == ["gc/roots/main/2", "gc/roots/pr-7"]
    clk.t += 100 + t.skew + 1
    rep = Collector(cache.backend, t, clk).run()
    assert present(cache, g.lib, g.app1, g.app2, g.top, g.twin_a) == [True, False, True, True, False]
    assert rep.narinfos_deleted == 2 and violations(cache) == []


def test_half_finished_uploads_go_after_the_temp_grace(g, url):
    clk, t = clock(), timings(temp_grace=1000.0)
    cache = open_cache(url)
    _push(g, url, [g.lib], clk, t, root="r")
    cache.backend.put("nar/0000000000000000000000000000000000000000000000000000.nar", b"half")
    if url.startswith("file://"):
        tmp = os.path.join(url[7:].split("?")[0], "nar", ".x.nar.tmp-1-ab")
        open(tmp, "w").write("partial")
    stale = Record("gc/leases/dead-writer", paths=[g.lib.base], expires=clk.now() + 10)
    cache.backend.put(stale.key, stale.to_json())
    dead_gc = Record("gc/condemned/dead-gc", narinfos=[g.lib.hash_part], deadline=clk.now() + 10)
    cache.backend.put(dead_gc.key, dead_gc.to_json())
    assert Collector(cache.backend, t, clk).run().nars_deleted == 0   # young: maybe in flight
    assert len(list(cache.backend.list_keys("gc/"))) == 3              # root, lease, condemned
    clk.t = time.time() + 1001  # S3's LastModified is the server's real time
    rep = Collector(cache.backend, t, clk).run()
    assert rep.nars_deleted == 1 and present(cache, g.lib) == [True]
    assert rep.others_deleted == (1 if url.startswith("file://") else 0)
    assert [e.key for e in cache.backend.list_keys("nar/")] != [] and violations(cache) == []
    assert [e.key for e in cache.backend.list_keys("gc/")] == ["gc/roots/r"]  # stale ones went


def test_dry_run_bytes_are_exact(g, url):
    clk, t = clock(), timings()
    _push(g, url, [g.app1], clk, t, root="r")
    _push(g, url, [g.top, g.twin_b], clk, t)
    cache = open_cache(url)
    before = {e.key: e.size for e in cache.backend.list_keys("")}
    dry = Collector(cache.backend, t, clk).run(dry_run=True)
    assert {e.key: e.size for e in cache.backend.list_keys("")} == before  # changed nothing
    rep = Collector(cache.backend, t, clk).run()
    after = {e.key for e in cache.backend.list_keys("")}
    gone = sum(size for k, size in before.items() if k not in after)
    assert dry.bytes_freed == rep.bytes_freed == gone > 0
    assert (dry.narinfos_deleted, dry.nars_deleted) == (rep.narinfos_deleted, rep.nars_deleted) == (3, 3)


def test_max_freed_stops_after_a_batch_and_keeps_the_closure(g, url):
    clk, t = clock(), timings()
    _push(g, url, [g.top], clk, t)
    cache = open_cache(url)
    rep = Collector(cache.backend, t, clk, max_freed=1).run()
    assert rep.stopped == "max-freed" and rep.narinfos_deleted == 1
    assert present(cache, g.lib, g.app2, g.top) == [True, True, False]   # referrer went first
    assert violations(cache) == []


def test_gc_stops_at_its_deadline(g, url):
    clk, t = clock(), timings()
    _push(g, url, [g.top], clk, t)
    cache = open_cache(url)
    gc = Collector(cache.backend, t, clk)
    gc.mark()
    gc.publish()
    gc.settle()
    gc.reread()
    clk.t = gc.deadline - t.skew  # the writers stop waiting for it now: so must it
    gc.sweep()
    assert gc.report.stopped == "deadline" and gc.report.narinfos_deleted == 0


def test_pin_and_unpin(g, url):
    clk, t = clock(), timings()
    _push(g, url, [g.app1], clk, t)
    cache = open_cache(url)
    with pytest.raises(StoreError, match="cannot pin .*app2"):
        pin(cache, "x", [g.app2], clk, t)
    assert read_roots(cache.backend) == []             # a failed pin leaves no root
    pin(cache, "x", [g.app1], clk, t)
    assert Collector(cache.backend, t, clk).run().narinfos_deleted == 0
    assert unpin(cache.backend, "x") and not unpin(cache.backend, "x")
    assert Collector(cache.backend, t, clk).run().narinfos_deleted == 2


def test_audit_finds_and_repairs_what_a_plain_writer_lost(g, url):
    clk, t = clock(), timings()
    cache = open_cache(url)
    copy_to_cache(g.store, cache, [g.top])              # a plain writer: no lease
    put_root(cache.backend, "r", [g.top.base], clk)
    cache.backend.delete_many([g.lib.hash_part + ".narinfo"])
    nar = cache.narinfo(g.store.store_dir, g.top).url
    cache.backend.delete_many([nar])
    rep = audit(cache, clock=clk, timings=t)
    assert rep.missing_refs == [(g.app2.base, g.lib.hash_part)]
    assert rep.missing_nars == [(g.top.base, nar)]
    rep = audit(cache, g.store, repair=True, clock=clk, timings=t)
    assert sorted(rep.repaired) == sorted([g.lib.base, g.top.base]) and rep.unrepaired == []
    assert audit(cache, clock=clk, timings=t).problems == 0 and violations(cache) == []


FAST = ["--settle", "0.05", "--lease-ttl", "0.1", "--skew", "0", "--margin", "0", "--nar-grace", "0"]


def test_cli_copy_root_pin_gc_audit(tmp_path, capsys, monkeypatch):

    monkeypatch.delenv("NIX_REMOTE", raising=False)
    root = str(tmp_path / "root")

    def sk(*args):
        code = main(["--store", root, *args])
        out = capsys.readouterr()
        return code, out.out, out.err
    src = tmp_path / "f"
    src.write_text("payload")
    code, out, _ = sk("add", str(src))
    p = out.strip()
    src.write_text("other")
    q = sk("add", str(src))[1].strip()
    cache = f"file://{tmp_path}/c"
    assert sk("copy", "--to", cache, "--root", "ci/1", "--keep", "1", "-q", p)[0] == 0
    assert sk("copy", "--to", cache, "-q", q)[0] == 0
    code, out, _ = sk("cache", "roots", "--json", cache)
    assert [(r["name"], r["paths"], r["live"]) for r in json.loads(out)] == [
        ("ci/1", [p.rsplit("/", 1)[1]], True)]
    code, out, _ = sk("cache", "gc", "--dry-run", "--json", cache, *FAST)
    dry = json.loads(out)
    assert (dry["narinfosDeleted"], dry["narsDeleted"], dry["dryRun"]) == (1, 1, True)
    code, out, _ = sk("cache", "gc", "--json", cache, *FAST)
    assert json.loads(out)["bytesFreed"] == dry["bytesFreed"] > 0
    assert sk("cache", "audit", cache)[0] == 0
    assert sk("cache", "pin", cache, "x", q)[0] == 1          # gone: cannot pin
    code, _, err = sk("cache", "unpin", cache, "nope")
    assert code != 0 and err.startswith("error: ") and "no root 'nope'" in err
    assert sk("cache", "unpin", cache, "ci/1")[0] == 0
    code, out, _ = sk("cache", "gc", cache, *FAST)
    assert "deleted 1 narinfos, 1 NARs" in out
    code, _, err = sk("cache", "gc", cache, "--settle", "1", "--lease-ttl", "600")
    assert code != 0 and "settle period" in err


# --- every interleaving of one writer and one collection ------------------------------

WRITER_POINTS = ["start", "lease.taken", "writer.checked", "writer.nars_leased", "writer.uploaded",
                 "writer.committed", "writer.rooted", "writer.done"]
GC_STEPS = ["mark", "publish", "reread", "sweep"]


def _placements():
    """Every way to run the GC's 4 steps, in order, at the writer's 8 hook points."""

    return list(combinations_with_replacement(range(len(WRITER_POINTS)), len(GC_STEPS)))


def _interleave(tmp_path, at):
    g = Graph(tmp_path)
    url = f"file://{tmp_path}/cache?compression=none"
    clk, t = clock(), timings()
    _push(g, url, [g.app1, g.twin_b], clk, t)            # all unrooted: all dead at the mark
    cache = open_cache(url)
    gc = Collector(cache.backend, t, clk)
    steps = {"mark": gc.mark, "publish": lambda: (gc.publish(), gc.settle()),
             "reread": gc.reread, "sweep": lambda: (gc.sweep(), gc.finish())}
    todo = list(zip(at, GC_STEPS))

    def run_due(point):
        while todo and WRITER_POINTS[todo[0][0]] == point:
            steps[todo.pop(0)[1]]()

    def on_sleep(_s):  # the writer waits for the collection: it runs to its end meanwhile
        while todo:
            steps[todo.pop(0)[1]]()
    clk.on_sleep = on_sleep
    run_due("start")
    _push(g, url, [g.top, g.twin_a], clk, t, root="r", hook=lambda step, _a: run_due(step))
    on_sleep(0)
    bad = violations(cache)
    missing = [p.base for p in (g.lib, g.app2, g.top, g.twin_a) if not present(cache, p)[0]]
    return bad, missing


def test_every_interleaving_sample(tmp_path):
    """Every 32nd placement (the full set is the slow test below)."""
    for n, at in enumerate(_placements()[::32]):
        bad, missing = _interleave(tmp_path / str(n), at)
        assert (bad, missing) == ([], []), at


@pytest.mark.slow
def test_every_interleaving_of_a_writer_and_a_collection(tmp_path):
    for n, at in enumerate(_placements()):
        bad, missing = _interleave(tmp_path / str(n), at)
        assert (bad, missing) == ([], []), at


def test_lease_renews_in_the_background_and_drop_removes_it(tmp_path):
    """Real time, bounded (~0.5 s): a lease of 0.3 s renewed every 0.1 s outlives its TTL."""

    cache = open_cache(f"file://{tmp_path}/c")
    lease = Lease(cache.backend, timings(lease_ttl=0.3, skew=0.0, margin=0.05), Clock())
    lease.take(["x" * 32 + "-p"])
    first = lease.expires
    lease.start_renewing()
    time.sleep(0.5)
    assert lease.expires > first + 0.2 and not lease.lapsed()
    lease.drop()
    assert list(cache.backend.list_keys(LEASES)) == []


@pytest.mark.slow
@pytest.mark.parametrize("at", list(combinations_with_replacement(range(3), 4)))
def test_every_interleaving_of_a_pin_and_a_collection(tmp_path, at):
    """A pin either fails cleanly (no root left) or its closure survives the collection."""
    g = Graph(tmp_path)
    url = f"file://{tmp_path}/cache?compression=none"
    clk, t = clock(), timings()
    _push(g, url, [g.app1], clk, t)
    cache = open_cache(url)
    gc = Collector(cache.backend, t, clk)
    steps = [gc.mark, lambda: (gc.publish(), gc.settle()), gc.reread, lambda: (gc.sweep(), gc.finish())]
    todo = list(zip(at, steps))
    points = ["start", "pin.stored", "end"]

    def run_due(point):
        while todo and points[todo[0][0]] == point:
            todo.pop(0)[1]()

    def on_sleep(_s):
        while todo:
            todo.pop(0)[1]()
    clk.on_sleep = on_sleep
    run_due("start")
    try:
        pin(cache, "p", [g.app1], clk, t, hook=lambda step, _a: run_due(step))
        pinned = True
    except StoreError:
        pinned = False
    run_due("end")
    on_sleep(0)
    assert violations(cache) == []
    if pinned:
        assert present(cache, g.lib, g.app1) == [True, True]
    else:
        assert read_roots(cache.backend) == [] and gc.report.narinfos_deleted == 2


def test_file_cache_never_lists_or_deletes_through_a_link(tmp_path):
    """A shared cache dir: someone swaps gc/ for a link to elsewhere; a collector's
    listing and deletions stay inside the cache (fd-relative, no link followed)."""
    from storekeeper.cache.backends import FileBackend
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    cache = tmp_path / "cache"
    (cache / "nar").mkdir(parents=True)
    (cache / "nar" / "a.nar").write_bytes(b"nar")
    os.symlink(outside, cache / "gc")
    b = FileBackend(str(cache))
    assert [e.key for e in b.list_keys()] == ["nar/a.nar"]
    assert list(b.list_keys("gc/")) == []
    b.delete_many(["gc/precious", "nar/a.nar"] + [f"gc/x{i}" for i in range(70)])
    assert (outside / "precious").read_bytes() == b"keep me"
    assert not (cache / "nar" / "a.nar").exists()
