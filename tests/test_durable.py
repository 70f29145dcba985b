"""Durable registration: the sync comes before the rows, and concurrent registrations
share a ``syncfs`` that began after their writes (store/durable.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from storekeeper.formats.url import LocalLayout
from storekeeper.store import durable
from storekeeper.store.durable import SyncCoordinator
from storekeeper.store.local import LocalStore
from storekeeper.store.settings import StoreSettings


def _rows(store: LocalStore) -> int:
    return store.db.conn.execute("select count(*) from ValidPaths").fetchone()[0]


def test_a_small_path_is_fsynced_file_by_file_before_its_row_exists(tmp_path, monkeypatch):
    store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def watching_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), _rows(store)))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", watching_fsync)
    monkeypatch.setattr(durable, "sync_filesystem", lambda p: pytest.fail("no syncfs for 3 entries"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"data\n")
    info = store.add_path(str(src))
    real = store.real_path(info.path)
    assert {p for p, _ in synced} == {real, f"{real}/sub", f"{real}/sub/f", store.real_store_dir}
    assert {rows for _, rows in synced} == {0}  # all before the row was written
    assert _rows(store) == 1
    store.close()


def test_a_big_batch_waits_for_a_syncfs_before_its_row_exists(tmp_path, monkeypatch):
    store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    seen: list[int] = []
    real = durable.sync_filesystem
    monkeypatch.setattr(durable, "sync_filesystem", lambda p: (seen.append(_rows(store)), real(p)))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(70):
        (src / f"f{i}").write_bytes(b"%d\n" % i)
    store.add_path(str(src))
    store.add_text("t", b"text")  # (small: fsynced, no syncfs)
    assert seen == [0]
    assert _rows(store) == 2
    store.close()


def test_without_fsync_store_paths_nothing_is_synced(tmp_path, monkeypatch):
    settings = StoreSettings().with_settings([("fsync-store-paths", "false")])
    store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")), settings=settings)
    calls = []
    monkeypatch.setattr(store.syncer, "sync_new", lambda paths: calls.append(1))
    store.add_text("t", b"text")
    assert calls == []
    store.close()


def _counting(monkeypatch, delay: float) -> list[float]:
    """Make syncfs slow and record when each one began."""
    began: list[float] = []

    def fake_syncfs(path: str) -> None:
        began.append(time.monotonic())
        time.sleep(delay)
    monkeypatch.setattr(durable, "sync_filesystem", fake_syncfs)
    return began


def test_concurrent_callers_share_one_syncfs(tmp_path, monkeypatch):
    began = _counting(monkeypatch, 0.3)
    coord = SyncCoordinator(str(tmp_path), str(tmp_path / "state"))
    # first caller starts a syncfs; eight arrive while it runs: they cannot count on
    # it (it began before them), so exactly one more syncfs covers all eight
    first = threading.Thread(target=coord.sync)
    first.start()
    while not began:
        time.sleep(0.005)
    calls = [threading.Thread(target=coord.sync) for _ in range(8)]
    for t in calls:
        t.start()
    for t in [first, *calls]:
        t.join()
    assert len(began) == 2
    coord.close()


def test_a_sync_that_began_before_the_call_does_not_count(tmp_path, monkeypatch):
    began = _counting(monkeypatch, 0.0)
    coord = SyncCoordinator(str(tmp_path), str(tmp_path / "state"))
    for _ in range(3):
        coord.sync()  # serial callers: each needs its own
    assert len(began) == 3
    coord.close()


def test_damaged_counters_never_skip_a_sync(tmp_path, monkeypatch):
    began = _counting(monkeypatch, 0.0)
    state = tmp_path / "state"
    (state / "storekeeper").mkdir(parents=True)
    # "completed" far ahead of "next": a caller must still sync
    (state / "storekeeper" / "sync.gen").write_bytes((5).to_bytes(8, "little") + (10**9).to_bytes(8, "little"))
    coord = SyncCoordinator(str(tmp_path), str(state))
    coord.sync()
    coord.sync()
    assert len(began) == 2
    coord.close()


_CHILD = """
import sys, time
from storekeeper.store import durable
def fake(path):
    with open(sys.argv[2], "a") as f:
        f.write("s\\n")
    time.sleep(0.5)
durable.sync_filesystem = fake
c = durable.SyncCoordinator(sys.argv[1], sys.argv[1] + "/state")
print("ready", flush=True)
sys.stdin.read(1)
c.sync()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs processes")
def test_processes_share_syncs(tmp_path):
    """Across processes (daemon connections): 6 callers released together need at most 2
    syncfs (one may have begun before some of them arrived), not 6."""
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), str(log)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(6)]
    for p in procs:
        assert p.stdout.readline() == b"ready\n"  # (all imported and waiting)
    for p in procs:
        p.stdin.write(b"x")
        p.stdin.close()
    for p in procs:
        assert p.wait(30) == 0
    n = log.read_text().count("s")
    assert 1 <= n <= 3
