"""Fetching many paths at once (storekeeper.cache.fetch, store.staging): references
registered before referrers, a failed path never lets a referrer be registered, each
path pinned before it is registered, nothing left in the store's scratch space; the
same through ``copy --from`` and through daemon-side substitution (Substituters)."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from storekeeper.build.logger import NullLogger
from storekeeper.build.substitute import Substituters, SubstituteSettings
from storekeeper.cache import open_cache
from storekeeper.cache.copy import copy_from_cache, copy_to_cache
from storekeeper.cache.fetch import MAX_UNSYNCED, Job, fetch_all, queue_depth
from storekeeper.errors import StoreError
from storekeeper.formats.storepath import StorePath
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore
from storekeeper.store.staging import TEMP_DIR_PREFIX

# --- the scheduler alone ----------------------------------------------------------------

class _Staged:
    def __init__(self, path: StorePath, log: list) -> None:
        self.path = path
        self.log = log

    def discard(self) -> None:
        self.log.append(self.path)


class _Pending:
    def __init__(self, store: "_Store", items: list[_Staged]) -> None:
        self.store, self.paths, self.synced = store, [s.path for s in items], False

    def joined(self, later: "_Pending") -> "_Pending":
        assert not self.synced and not later.synced
        self.paths += later.paths
        return self

    def sync(self) -> None:  # (any thread)
        time.sleep(self.store.sync_seconds * random.random())
        self.synced = True

    def commit(self) -> None:
        assert threading.current_thread() is threading.main_thread() and self.synced
        for p in self.paths:
            assert self.store.refs[p] <= self.store.valid, (p, self.store.refs[p] - self.store.valid)
            self.store.valid.add(p)
        self.store.batches.append(self.paths)
        self.store.outstanding -= len(self.paths)

    def abort(self) -> None:
        self.store.aborted.append(self.paths)


class _Store:
    """Records batches; refuses one whose references are not registered before it."""

    def __init__(self, refs: dict[StorePath, frozenset[StorePath]]) -> None:
        self.refs = refs
        self.valid: set[StorePath] = set()
        self.batches: list[list[StorePath]] = []
        self.aborted: list[list[StorePath]] = []
        self.sync_seconds = 0.002
        self.begun = 0
        self.outstanding = self.most_outstanding = 0  # paths moved, not yet registered

    def begin_staged(self, items: list[_Staged], pending) -> _Pending:
        assert threading.current_thread() is threading.main_thread()
        self.begun += 1
        self.outstanding += len(items)
        self.most_outstanding = max(self.most_outstanding, self.outstanding)
        names = {s.path for s in items}
        for s in items:  # references: registered, in the batch committed before, or in this one
            assert self.refs[s.path] <= self.valid | set(pending) | names
            s.discard()
        return _Pending(self, items)


def _dag(n: int, seed: int) -> dict[StorePath, frozenset[StorePath]]:
    rnd = random.Random(seed)
    paths = [StorePath(f"{i:032d}-p{i}") for i in range(n)]
    return {p: frozenset(rnd.sample(paths[:i], min(i, rnd.randint(0, 3)))) for i, p in enumerate(paths)}


def _run(refs, bad: set[StorePath], threads: int):
    discarded: list[StorePath] = []
    started: list[StorePath] = []
    failed: dict[StorePath, BaseException | None] = {}

    def stage_of(p: StorePath):
        def stage() -> _Staged:
            time.sleep(random.random() / 500)  # finish out of order
            if p in bad:
                raise StoreError(f"broken {p}")
            return _Staged(p, discarded)
        return stage
    store = _Store(refs)
    jobs = {p: Job(p, refs[p], stage_of(p)) for p in refs}  # references first already
    done: list[StorePath] = []
    installed = fetch_all(store, jobs, threads, started.append, done.append,  # type: ignore[arg-type]
                          lambda p, e: failed.setdefault(p, e))
    return store, installed, done, failed, discarded, started


@pytest.mark.parametrize("seed", range(4))
def test_references_are_registered_before_referrers(seed):
    refs = _dag(60, seed)
    store, installed, done, failed, discarded, _ = _run(refs, set(), threads=6)
    assert installed == set(refs) == store.valid and not failed
    assert sorted(done) == sorted(refs) and len(done) == len(set(done))
    assert sorted(discarded) == sorted(refs)  # each staged copy dropped once
    assert len(store.batches) < len(refs)     # some batching happened


def test_batches_moved_during_a_slow_sync_are_synced_and_registered_together():
    refs = _dag(400, 11)
    store = _Store(refs)
    store.sync_seconds = 0.05

    def stage(p: StorePath) -> _Staged:
        time.sleep(0.002)
        return _Staged(p, [])
    jobs = {p: Job(p, refs[p], (lambda p=p: stage(p))) for p in refs}
    installed = fetch_all(store, jobs, 4)  # type: ignore[arg-type]
    assert installed == set(refs) == store.valid and not store.aborted
    assert len(store.batches) < store.begun  # joined while a sync ran
    assert store.most_outstanding <= MAX_UNSYNCED + queue_depth(4)


def _referrers(refs, of: set[StorePath]) -> set[StorePath]:
    out = set(of)
    for p in refs:  # references first: one pass is enough
        if refs[p] & out:
            out.add(p)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_a_failed_path_never_lets_a_referrer_be_registered(seed):
    refs = _dag(60, seed)
    rnd = random.Random(seed)
    bad = set(rnd.sample(sorted(refs)[:30], 2))
    store, installed, done, failed, discarded, started = _run(refs, bad, threads=4)
    lost = _referrers(refs, bad)
    assert installed == set(refs) - lost == store.valid
    assert set(failed) == lost
    # (a bad path that refers to the other one fails as a referrer, never started)
    assert all(isinstance(failed[p], StoreError) or p in _referrers(refs, bad - {p}) for p in bad)
    assert all(failed[p] is None for p in lost - bad)
    # staged copies of paths that were not installed are dropped too
    assert set(discarded) <= set(started) and len(discarded) == len(set(discarded))
    assert set(started) - set(discarded) <= bad


def test_a_failing_batch_fails_its_paths_and_stops_their_referrers():
    refs = _dag(30, 7)

    class Refusing(_Store):
        def begin_staged(self, items, pending):
            if any(s.path == StorePath(f"{5:032d}-p5") for s in items):
                for s in items:
                    s.discard()
                raise OSError("disk full")
            return super().begin_staged(items, pending)
    store = Refusing(refs)
    failed: dict = {}
    jobs = {p: Job(p, refs[p], (lambda p=p: _Staged(p, []))) for p in refs}
    installed = fetch_all(store, jobs, 3, on_fail=lambda p, e: failed.setdefault(p, e))  # type: ignore[arg-type]
    assert StorePath(f"{5:032d}-p5") in failed
    assert installed == store.valid
    assert not _referrers(refs, set(failed)) & installed


# --- with a real store and a file:// cache ----------------------------------------------

def _closure(tmp_path, n: int = 12):
    src = LocalStore(LocalLayout.chroot(str(tmp_path / "src")))
    leaves = [src.add_text(f"leaf{i}", os.urandom(3000 + i) + b"x" * 5000).path for i in range(n)]
    mid = src.add_text("mid", b"mid", leaves[: n // 2]).path
    top = src.add_text("top", b"top", [mid, *leaves[n // 2:]]).path
    url = f"file://{tmp_path}/cache?compression=zstd"
    copy_to_cache(src, open_cache(url), [top], jobs=3)
    return src, leaves, mid, top, url


def _break_nar(url: str, store: LocalStore, victim: StorePath, donor: StorePath) -> None:
    cache = open_cache(url)
    root = url.removeprefix("file://").split("?")[0]
    bad, good = (cache.narinfo(store.store_dir, p) for p in (victim, donor))
    assert bad is not None and good is not None
    os.chmod(os.path.join(root, bad.url), 0o644)
    with open(os.path.join(root, good.url), "rb") as f, open(os.path.join(root, bad.url), "wb") as g:
        g.write(f.read())


def _scratch_left(store: LocalStore) -> list[str]:
    return [n for n in os.listdir(store.real_store_dir) if n.startswith(TEMP_DIR_PREFIX)]


def _pinned(store: LocalStore) -> set[str]:
    with open(store.temp_roots.file_path, "rb") as f:
        return set(f.read().decode().split("\0")) - {""}


def test_copy_from_in_parallel_pins_before_registering(tmp_path):
    src, leaves, mid, top, url = _closure(tmp_path)
    dst = LocalStore(LocalLayout.chroot(str(tmp_path / "dst")))
    seen: list[StorePath] = []
    real = dst.begin_staged

    def checking(items, pending):
        batch = real(items, pending)
        commit = batch.commit

        def committing():
            for info in batch.infos:  # pinned before it becomes valid
                assert dst.print_path(info.path) in _pinned(dst)
                assert not dst.is_valid(info.path)
                seen.append(info.path)
            commit()
        batch.commit = committing  # type: ignore[method-assign]
        return batch
    dst.begin_staged = checking  # type: ignore[method-assign]
    result = copy_from_cache(open_cache(url), dst, [top], keys={}, jobs=4)
    assert sorted(seen) == sorted([*leaves, mid, top]) == sorted(result.copied)
    for p in seen:
        assert dst.path_info(p).nar_hash == src.path_info(p).nar_hash
        assert dst.query_references(p) == src.query_references(p)
    assert not _scratch_left(dst)


def test_copy_from_in_parallel_with_a_corrupt_nar(tmp_path):
    src, leaves, mid, top, url = _closure(tmp_path)
    _break_nar(url, src, leaves[0], leaves[1])
    dst = LocalStore(LocalLayout.chroot(str(tmp_path / "dst")))
    with pytest.raises(StoreError, match="leaf0"):
        copy_from_cache(open_cache(url), dst, [top], keys={}, jobs=4)
    assert not dst.is_valid(leaves[0]) and not dst.is_valid(mid) and not dst.is_valid(top)
    assert all(dst.is_valid(p) for p in leaves[1:])  # the independent paths are in
    assert not _scratch_left(dst)


class _Log(NullLogger):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def log(self, level: int, message: str) -> None:
        self.lines.append(message)


def test_substitution_falls_through_to_the_next_cache_per_path(tmp_path):
    src, leaves, mid, top, url = _closure(tmp_path)
    second = f"file://{tmp_path}/second?compression=xz"
    copy_to_cache(src, open_cache(second), [top])
    _break_nar(url, src, leaves[0], leaves[1])
    dst = LocalStore(LocalLayout.chroot(str(tmp_path / "dst")))
    log = _Log()
    subs = Substituters(dst, SubstituteSettings(substituters=(url, second), require_sigs=False,
                                                max_substitution_jobs=4), log)
    try:
        assert subs.realise(top)
    finally:
        subs.close()
    for p in [*leaves, mid, top]:
        assert dst.path_info(p).nar_hash == src.path_info(p).nar_hash
        assert dst.print_path(p) in _pinned(dst)
    errors = [line for line in log.lines if line.startswith("error:")]
    assert len(errors) == 1 and "leaf0" in errors[0], log.lines
    assert not _scratch_left(dst)


def test_substitution_of_a_path_no_cache_has_intact(tmp_path):
    src, leaves, mid, top, url = _closure(tmp_path)
    _break_nar(url, src, leaves[0], leaves[1])
    dst = LocalStore(LocalLayout.chroot(str(tmp_path / "dst")))
    log = _Log()
    subs = Substituters(dst, SubstituteSettings(substituters=(url,), require_sigs=False,
                                                max_substitution_jobs=4), log)
    try:
        assert not subs.realise(top)
    finally:
        subs.close()
    assert not dst.is_valid(leaves[0]) and not dst.is_valid(mid) and not dst.is_valid(top)
    assert all(dst.is_valid(p) for p in leaves[1:])
    assert any("some references of path" in line and "-mid'" in line for line in log.lines), log.lines
    assert not _scratch_left(dst)


# --- copy --to: NARs compressed in the cache's own directory ----------------------------

def test_copy_to_leaves_no_temp_files_and_readable_nars(tmp_path):
    src, leaves, mid, top, url = _closure(tmp_path)
    nar_dir = tmp_path / "cache" / "nar"
    names = os.listdir(nar_dir)
    assert len(names) == len(leaves) + 2
    assert not [n for n in names if n.startswith(".")]
    assert all(os.stat(nar_dir / n).st_mode & 0o777 == 0o644 for n in names)
    dst = LocalStore(LocalLayout.chroot(str(tmp_path / "dst")))
    copy_from_cache(open_cache(url), dst, [top], keys={}, jobs=1)
    assert dst.is_valid(top)


def test_copy_to_a_damaged_path_leaves_no_temp_file(tmp_path):
    src = LocalStore(LocalLayout.chroot(str(tmp_path / "src")))
    paths = [src.add_text(f"t{i}", b"x" * (1000 + i)).path for i in range(6)]
    real = src.real_path(paths[3])
    os.chmod(real, 0o644)
    with open(real, "ab") as f:
        f.write(b"damage")
    cache = open_cache(f"file://{tmp_path}/c?compression=xz")
    with pytest.raises(StoreError, match="corrupt"):
        copy_to_cache(src, cache, paths, jobs=3)
    cache.close()
    assert not [n for n in os.listdir(tmp_path / "c" / "nar") if n.startswith(".")]
    assert not (tmp_path / "c" / f"{paths[3].hash_part}.narinfo").exists()
