"""Full GCs queued behind a running one share the next run (storekeeper.store.gc.share):
each returns, nothing in use is deleted, a queued request gets the result of a run that
started after it arrived, and never that of one that was already running."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import subprocess
import sys

import pytest
from conftest import needs_nix, nix_env
from daemon_util import start_daemon, stop_process

from storekeeper.api import DELETE_DEAD, GCOptions
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

WAITING = "waiting for the big garbage collector lock..."
SERVED = "a garbage collection that started after this request has done it"


def _started(root: str) -> int:
    with LocalStore(LocalLayout.chroot(root)) as s:
        path = os.path.join(s.state_dir, "gc-share", "started")
    try:
        with open(path) as f:
            return json.loads(f.readline())["seq"]
    except FileNotFoundError:
        return 0


def _gc(root: str, q, tag: str, opts: GCOptions | None = None) -> None:
    def log(msg: str) -> None:
        if msg == WAITING:
            q.put((tag, "waiting"))
    with LocalStore(LocalLayout.chroot(root)) as s:
        r = s.collect_garbage(opts or GCOptions(action=DELETE_DEAD), log=log)
    q.put((tag, (sorted(r.paths), r.bytes_freed, any(m.startswith(SERVED) for m in r.messages))))


def _add_and_exit(root: str, name: str, q) -> None:
    with LocalStore(LocalLayout.chroot(root)) as s:
        q.put(s.print_path(s.add_text(name, name.encode()).path))


def _results(q, tags: set[str]) -> dict:
    out: dict = {}
    while set(out) != tags:
        tag, what = q.get(timeout=60)
        if what != "waiting":
            out[tag] = what
    return out


def test_queued_full_gcs_share_one_run(tmp_path):
    root = str(tmp_path / "a")
    with LocalStore(LocalLayout.chroot(root)) as s:
        dead = [s.print_path(s.add_text(f"dead{i}", b"x" * (100 + i)).path) for i in range(3)]
        rooted = s.add_text("rooted", b"r").path
        os.symlink(s.print_path(rooted), os.path.join(s.state_dir, "gcroots", "r"))
        late = s.print_path(s.add_text("late", b"l").path)
        late_root = os.path.join(s.state_dir, "gcroots", "late")
        os.symlink(late, late_root)
        gc_lock = os.path.join(s.state_dir, "gc.lock")
    pinner = LocalStore(LocalLayout.chroot(root))  # in use: never deleted
    pinned = pinner.add_text("pinned", b"p").path
    before = _started(root)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    # a collection is running (as a Nix GC would hold it: no record of ours)
    fd = os.open(gc_lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    procs = [ctx.Process(target=_gc, args=(root, q, f"gc{k}")) for k in range(3)]
    held = ctx.Process(target=_gc, args=(root, q, "budget", GCOptions(action=DELETE_DEAD, max_freed=2**40)))
    try:
        for p in procs:
            p.start()
        waiting = set()
        while len(waiting) < 3:
            tag, what = q.get(timeout=60)
            assert what == "waiting"
            waiting.add(tag)
        # dead after every request arrived: the run that serves them sees it dead too
        os.unlink(late_root)
        held.start()  # (a byte budget: never shared, runs itself)
        assert q.get(timeout=60) == ("budget", "waiting")
        fcntl.flock(fd, fcntl.LOCK_UN)
        got = _results(q, {"gc0", "gc1", "gc2", "budget"})
        assert pinner.is_valid(pinned) and os.path.exists(pinner.real_path(pinned))
        assert pinner.is_valid(rooted)
    finally:
        os.close(fd)
        pinner.close()
        for p in [*procs, held]:
            p.join(30)
    runs = [got[t] for t in ("gc0", "gc1", "gc2")]
    ran = [r for r in runs if not r[2]]
    # one of the three ran; the other two were served by it and were told its result
    assert len(ran) == 1 and all(r[:2] == ran[0][:2] for r in runs)
    deleted_by = {tuple(got["budget"][0]), tuple(ran[0][0])}
    assert set(dead) | {late} == set().union(*deleted_by)
    assert _started(root) == before + 1  # the budget run is not numbered: it serves no one


def _gc_paused_after_its_roots(root: str, q, go) -> None:
    def log(msg: str) -> None:
        if msg == "deleting garbage...":
            q.put(("first", "roots found"))
            go.wait(60)
    with LocalStore(LocalLayout.chroot(root)) as s:
        r = s.collect_garbage(GCOptions(action=DELETE_DEAD), log=log)
    q.put(("first", (sorted(r.paths), r.bytes_freed, False)))


def test_request_arriving_during_a_run_is_not_served_by_it(tmp_path):
    root = str(tmp_path / "a")
    with LocalStore(LocalLayout.chroot(root)) as s:
        old = s.print_path(s.add_text("old", b"old").path)
    ctx = multiprocessing.get_context("fork")
    q, go = ctx.Queue(), ctx.Event()
    first = ctx.Process(target=_gc_paused_after_its_roots, args=(root, q, go))
    first.start()
    try:
        assert q.get(timeout=60) == ("first", "roots found")
        # dead now, but not in the running collection's view of the store
        adder = ctx.Process(target=_add_and_exit, args=(root, "new", q))
        adder.start()
        new = q.get(timeout=60)
        adder.join(30)
        second = ctx.Process(target=_gc, args=(root, q, "second"))
        second.start()
        assert q.get(timeout=60) == ("second", "waiting")
        go.set()
        got = _results(q, {"first", "second"})
        second.join(30)
    finally:
        go.set()
        first.join(30)
    assert got["first"][0] == [old]
    assert got["second"][0] == [new] and not got["second"][2]  # it ran itself
    with LocalStore(LocalLayout.chroot(root)) as s:
        assert not s.is_valid(s.parse_path(new))


def test_a_record_from_another_boot_serves_no_one(tmp_path):
    root = str(tmp_path / "a")
    with LocalStore(LocalLayout.chroot(root)) as s:
        s.collect_garbage(GCOptions(action=DELETE_DEAD))
        share = os.path.join(s.state_dir, "gc-share")
        for name in ("started", "done"):
            with open(os.path.join(share, name)) as f:
                head, _, body = f.read().partition("\n")
            rec = json.loads(head)
            assert rec["boot"]
            rec.update(boot="another-boot", seq=1000)
            with open(os.path.join(share, name), "w") as f:
                f.write(json.dumps(rec) + "\n" + body)
        dead = s.print_path(s.add_text("d", b"d").path)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    fd = os.open(os.path.join(share, "..", "gc.lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    p = ctx.Process(target=_gc, args=(root, q, "gc"))
    p.start()
    try:
        assert q.get(timeout=60) == ("gc", "waiting")
        fcntl.flock(fd, fcntl.LOCK_UN)
        got = _results(q, {"gc"})
    finally:
        os.close(fd)
        p.join(30)
    assert got["gc"][0] == [dead] and not got["gc"][2]
    assert _started(root) == 1


@needs_nix
@pytest.mark.nix
def test_real_clients_queued_behind_a_gc_through_the_daemon(tmp_path):
    """Three real `nix-store --gc` through our daemon, queued behind a running collection:
    all return the same honest summary, one ran, and the rooted path stays."""
    root, sock = str(tmp_path / "root"), str(tmp_path / "d.sock")
    env = nix_env(str(tmp_path))
    proc = start_daemon("ours", root, sock, env)
    try:
        env["NIX_REMOTE"] = f"unix://{sock}?root={root}"
        added = []
        for i in range(4):
            (tmp_path / f"f{i}").write_text(f"file {i}\n" * (i + 1))
            added.append(subprocess.run(["nix-store", "--add", str(tmp_path / f"f{i}")], env=env,
                                        capture_output=True, text=True, check=True).stdout.strip())
        subprocess.run(["nix-store", "-r", added[0], "--add-root", str(tmp_path / "result"), "--indirect"],
                       env=env, capture_output=True, check=True)
        with LocalStore(LocalLayout.chroot(root)) as s:
            gc_lock = os.path.join(s.state_dir, "gc.lock")
        before = _started(root)
        fd = os.open(gc_lock, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            clients = [subprocess.Popen(["nix-store", "--gc"], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True) for _ in range(3)]
            for c in clients:  # each has asked, and waits
                assert c.stderr is not None and c.stderr.readline().strip() == WAITING
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        outs = [c.communicate(timeout=60) for c in clients]
        assert all(c.returncode == 0 for c in clients), outs
        assert {o for o, _ in outs} == {outs[0][0]} and outs[0][0].startswith("3 store paths deleted, ")
        assert sum(SERVED in e for _, e in outs) == 2
        assert _started(root) == before + 1
        with LocalStore(LocalLayout.chroot(root)) as s:
            assert s.is_valid(s.parse_path(added[0]))
            assert not any(s.is_valid(s.parse_path(p)) for p in added[1:])
    finally:
        stop_process(proc)


def test_runtime_scan_in_parts_finds_what_one_scan_finds(tmp_path):
    from storekeeper.store.roots import RootFinder
    root = str(tmp_path / "a")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "x").write_text("x")
    with LocalStore(LocalLayout.chroot(root)) as s:
        d = s.add_path(str(tmp_path / "tree")).path
        f = s.add_text("opened", b"o").path
        sd, real, state = s.store_dir, s.real_store_dir, s.state_dir
        cwd, held = s.real_path(d), s.real_path(f)
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
                             "print('ok', flush=True); time.sleep(60)", held],
                            cwd=cwd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ok\n"
        finder = RootFinder(sd, real, state)
        one = {(r.path, r.link) for r in finder.runtime_roots()}
        assert (d, f"/proc/{proc.pid}/cwd") in one
        assert any(p == f and link.startswith(f"/proc/{proc.pid}/fd/") for p, link in one)
        for n in (2, 3, 4):
            parts = [scan() for scan in finder.runtime_scans(n)]
            assert len(parts) == n
            assert {(r.path, r.link) for part in parts for r in part} == one
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("lookups", [256, 0])  # a lock file looked for per path / in a listing
def test_dead_path_whose_lock_is_held_is_kept(tmp_path, monkeypatch, lookups):
    from storekeeper.store.gc import collector
    from storekeeper.store.locks import PathLocks
    monkeypatch.setattr(collector, "LOCK_LOOKUPS", lookups)
    root = str(tmp_path / "a")
    with LocalStore(LocalLayout.chroot(root)) as s:
        base = s.add_text("base", b"base").path
        busy = s.add_text("busy", s.print_path(base).encode(), [base]).path
        free = s.add_text("free", b"free").path
    held = PathLocks()
    with LocalStore(LocalLayout.chroot(root)) as s:
        assert held.lock([s.real_path(busy)])  # (being repaired or built right now)
        try:
            r = s.collect_garbage(GCOptions(action=DELETE_DEAD))
        finally:
            held.release()
        assert r.paths == [s.print_path(free)]
        assert s.is_valid(busy) and s.is_valid(base)  # kept with what it refers to
