"""Fetching many paths at once: downloads, decompression and unpacking of independent
paths in worker threads, registration in the caller's thread, in batches.

Rules :func:`fetch_all` keeps (the store's part is :mod:`storekeeper.store.staging`):

* **references first**: a batch is moved to its names only when each reference of
  its paths in the plan is registered, or in a batch registered before it, or in the
  same batch (which the store registers references first in one transaction); the
  batches are committed in the order they were moved;
* **a failure stops its referrers**: a path whose fetch failed, or one of whose
  references failed, is never registered; its staged files are dropped and it is
  reported failed (``on_fail``) so the caller may try another cache (a batch whose
  reference's commit failed fails in its own commit: the reference is not valid);
* **the caller's thread owns the store and the log**: workers only download and
  unpack into the staging area (``stage``); pins, validity, moves, registration and
  every callback happen in the thread that called :func:`fetch_all`; one more thread
  only waits for the sync that makes moved batches durable;
* bounded: at most ``threads`` fetches run, at most :func:`queue_depth` are queued
  (enough to keep the workers busy through a registration's sync), at most
  :data:`MAX_UNSYNCED` paths wait at their names for a sync, and a path is not
  started while one of its references has failed.

A batch is moved to its names once :data:`MIN_BATCH` paths are ready for it, or
nothing more is being fetched, or its first path has waited :data:`MAX_WAIT`
seconds.  Each sync costs the same whatever its size (a ``syncfs``: 40-100 ms here,
more when others write), so registering whatever was ready at once made ~4-path
batches from a ``file://`` cache (127 syncs for 502 paths), and syncing in the
caller's thread kept it from moving the next batch meanwhile: now the batches moved
while a sync runs are synced together by the next one, then registered in one
transaction.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Mapping, Protocol

from ..formats.pathinfo import ValidPathInfo
from ..formats.storepath import StorePath


class Staged(Protocol):
    info: ValidPathInfo

    def discard(self) -> None: ...


class Pending(Protocol):
    """Batches at their names, not yet registered (:class:`storekeeper.store.staging.PendingBatch`)."""

    def joined(self, later: Any) -> Pending: ...
    def sync(self) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class StagingStore(Protocol):
    """What a store offers for batched imports (a LocalStore does)."""

    def stage_nar(self, info: ValidPathInfo, stream: Any) -> Staged: ...
    def begin_staged(self, items: list[Any], pending: Collection[StorePath]) -> Pending: ...


#: paths a registration waits for while more are being fetched (a batch this big is
#: synced with one ``syncfs``: see :func:`storekeeper.fs.atomic.sync_new_trees`)
MIN_BATCH = 32
#: seconds a fetched path may wait for its batch to fill (progress keeps moving on a slow cache)
MAX_WAIT = 0.5
#: paths moved to their names and not yet registered, at most (each holds a lock's fd): while a
#: sync runs, the batches fetched meanwhile are moved to their names, then synced together
MAX_UNSYNCED = 4 * MIN_BATCH

#: seconds a thread may hold the GIL while another waits, during :func:`fetch_all`
SWITCH_INTERVAL = 0.0002


@dataclass
class Job:
    path: StorePath
    references: frozenset[StorePath]  # those in the plan (others must be valid already)
    stage: Callable[[], Staged]        # a worker's part: fetch, check, unpack


def fetch_threads(jobs: int, caches: Iterable[Any]) -> int:
    """Threads for ``jobs`` fetches at once: reading a local (``file://``) cache is
    decoding and unpacking, work for the CPUs (and the GIL), so at most one per core
    (2 threads on 2 cores copied 1 GiB / 2001 paths in 0.3–0.6 s less than 3 or 4, in
    each of three interleaved rounds: bench/RESULTS.md, lead's figures of stop 24); a
    remote one waits on the network, so ``jobs``."""
    if all(str(getattr(c, "url", "")).startswith("file://") for c in caches):
        return max(1, min(jobs, os.cpu_count() or 1))
    return max(1, jobs)


def queue_depth(threads: int) -> int:
    """Fetches queued or running at once.  The caller's thread submits them, so while it
    syncs a batch (a ``syncfs``: 40-70 ms here, under load) the workers have only these:
    with ``2 * threads`` (8 for a ``file://`` cache on 2 CPUs) they sat idle for most of
    each sync; two batches' worth keeps them going (staged trees wait on disk, not in
    memory)."""
    return max(2 * max(1, threads), 2 * MIN_BATCH)


def can_stage(store: object) -> bool:
    return callable(getattr(store, "stage_nar", None)) and callable(getattr(store, "begin_staged", None))


def fetch_all(store: StagingStore, jobs: Mapping[StorePath, Job], threads: int,
              on_start: Callable[[StorePath], None] = lambda p: None,
              on_done: Callable[[StorePath], None] = lambda p: None,
              on_fail: Callable[[StorePath, BaseException | None], None] = lambda p, e: None,
              ) -> set[StorePath]:
    """Run ``jobs`` (in references-first order) and register what they stage; the
    paths registered.  ``on_fail(path, error)``: error None when a reference failed."""
    order = list(jobs)
    depth = queue_depth(threads)
    index = {p: i for i, p in enumerate(order)}
    installed: set[StorePath] = set()
    failed: set[StorePath] = set()
    ready: dict[StorePath, Staged] = {}
    ready_at: dict[StorePath, float] = {}
    running: dict[Future[Staged], StorePath] = {}
    # batches moved to their names: being synced (by ``syncer``), and the ones moved
    # since, waiting for the next sync (each group is committed before the next one)
    syncing: tuple[list[StorePath], Pending, Future[None]] | None = None
    moved: tuple[list[StorePath], Pending] | None = None
    nxt = 0

    def fail(p: StorePath, e: BaseException | None) -> None:
        failed.add(p)
        on_fail(p, e)

    def collect(done: set[Future[Any]]) -> None:
        for fut in done:
            if fut not in running:
                continue  # (the sync's)
            p = running.pop(fut)
            try:
                ready[p] = fut.result()
                ready_at[p] = time.monotonic()
            except Exception as e:  # this path only: its referrers follow it
                fail(p, e)

    def commit_synced() -> None:
        nonlocal syncing
        assert syncing is not None
        paths, pending, fut = syncing
        syncing = None
        try:
            fut.result()
            pending.commit()
        except Exception as e:
            pending.abort()
            for p in paths:
                fail(p, e)
            return
        installed.update(paths)
        for p in paths:
            on_done(p)

    interval = sys.getswitchinterval()
    # the workers hold the GIL between their C calls: this thread, blocking in many
    # short syscalls (renames, locks, closes), gets it back sooner
    sys.setswitchinterval(min(interval, SWITCH_INTERVAL))
    with ThreadPoolExecutor(max(1, threads)) as pool, ThreadPoolExecutor(1) as syncer:
        try:
            while nxt < len(order) or running or ready or syncing or moved:
                while nxt < len(order) and len(running) < depth:
                    p = order[nxt]
                    nxt += 1
                    if jobs[p].references & failed:
                        fail(p, None)
                        continue
                    on_start(p)
                    running[pool.submit(jobs[p].stage)] = p
                # (finished fetches are collected by the wait below: scanning all running
                # ones and sorting all ready ones on every turn was a tenth of this
                # thread's GIL time, which the workers wait for)
                if syncing and syncing[2].done():
                    commit_synced()
                if moved and not syncing:
                    syncing = (*moved, syncer.submit(moved[1].sync))
                    moved = None
                for p in [p for p in ready if jobs[p].references & failed]:
                    ready.pop(p).discard()
                    fail(p, None)
                # registered before any batch chosen now: those being synced or moved
                earlier = [*(syncing[0] if syncing else ()), *(moved[0] if moved else ())]
                now = time.monotonic()
                first = min((ready_at[p] for p in ready), default=now)
                batch: list[StorePath] = []
                # (a batch can be due only if this holds: it is a subset of ``ready``)
                due = bool(ready) and (len(ready) >= MIN_BATCH or not running
                                       or now - first >= MAX_WAIT)
                if due:
                    chosen = installed | set(earlier)
                    for p in sorted(ready, key=index.__getitem__):  # references first
                        if jobs[p].references <= chosen:
                            batch.append(p)
                            chosen.add(p)
                oldest = min((ready_at[p] for p in batch), default=now)
                if (batch and len(earlier) < MAX_UNSYNCED
                        and (len(batch) >= MIN_BATCH or not running or now - oldest >= MAX_WAIT)):
                    items = [ready.pop(p) for p in batch]
                    try:
                        pending = store.begin_staged(items, earlier)
                    except Exception as e:
                        for p in batch:
                            fail(p, e)
                        continue
                    moved = (moved[0] + batch, moved[1].joined(pending)) if moved else (batch, pending)
                elif running or syncing:
                    timeout: float | None = None
                    if batch and len(earlier) < MAX_UNSYNCED:
                        timeout = max(0.0, oldest + MAX_WAIT - now)
                    elif ready and not due:
                        timeout = max(0.0, first + MAX_WAIT - now)
                    waiting: list[Future[Any]] = [*running]
                    if syncing:
                        waiting.append(syncing[2])
                    collect(wait(waiting, timeout, return_when=FIRST_COMPLETED)[0])
                elif ready and nxt >= len(order) and not moved:
                    # waiting for references that will never come: not a valid plan
                    for p in list(ready):
                        ready.pop(p).discard()
                        fail(p, None)
        finally:
            if syncing:  # (only when failing: a normal end commits everything)
                try:
                    syncing[2].result()
                except BaseException:
                    pass
                syncing[1].abort()
            if moved:
                moved[1].abort()
            for fut in running:
                fut.cancel()
            for fut in running:
                if not fut.cancelled():
                    try:
                        fut.result().discard()
                    except BaseException:  # already failing: only clean up
                        pass
            for staged in ready.values():
                staged.discard()
            sys.setswitchinterval(interval)
    return installed
