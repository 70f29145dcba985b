"""``copy --to`` under a lease (docs/CACHE-GC.md, "The writer", W1–W7).

The copy itself is :mod:`storekeeper.cache.copy`'s (same narinfos, same NARs, same
closure invariant); what this adds is the order: lease, then condemned sets, then
presence; NAR keys leased before their existence is asked; the lease checked before
every narinfo batch, and the whole copy started again under a new lease when it
lapsed.  Only caches that can be listed (``file://``, ``s3://``) take part; an
``http(s)://`` cache gets the plain copy.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

from ...api import Store
from ...formats.pathinfo import ValidPathInfo
from ...formats.storepath import StorePath
from ..backends import Backend, CacheError, FileBackend
from ..binary import BinaryCache, Prepared
from ..copy import BATCH, CopyResult, Progress, _record, closure_order, copy_to_cache, nar_chunks
from ..s3 import S3Backend
from .leases import Lease, wait_collections
from .objects import Clock, Hook, Timings, no_hook
from .roots import put_root, root_key

#: how often a copy starts again under a new lease before giving up
ATTEMPTS = 3


class _Lapsed(Exception):
    """The lease may have been ignored by a collection: start again."""


def takes_part(backend: Backend) -> bool:
    """Whether the cache can be collected (listed and deleted from), so writers lease."""
    return isinstance(backend, (FileBackend, S3Backend))


def copy_with_lease(store: Store, cache: BinaryCache, paths: Iterable[StorePath], *,
                    root: str | None = None, root_ttl: float | None = None,
                    keep: int | None = None, timings: Timings | None = None,
                    clock: Clock | None = None, hook: Hook = no_hook, jobs: int = 1,
                    log: Callable[[str], None] | None = None, tmp_dir: str | None = None,
                    progress: Progress | None = None, renew_in_background: bool = True
                    ) -> CopyResult:
    """Copy the closure of ``paths`` into ``cache`` as a lease-holding writer; with ``root``,
    pin ``paths`` under that name before the lease is dropped."""
    paths = list(paths)
    if root is not None:
        root_key(root)  # a bad name fails before anything is uploaded
    if not takes_part(cache.backend):
        if root is not None:
            raise CacheError(f"binary cache '{cache.url}' cannot hold roots (only file:// and s3://)")
        return copy_to_cache(store, cache, paths, jobs=jobs, log=log, tmp_dir=tmp_dir,
                             progress=progress)
    timings = timings or Timings()
    clock = clock or Clock()
    sd = store.store_dir
    cache.check_store_dir(sd, create=True)
    order, infos = closure_order(store, paths)  # references first
    for _attempt in range(ATTEMPTS):
        lease = Lease(cache.backend, timings, clock, hook)
        lease.take(p.base for p in order)                                    # W1
        if renew_in_background:
            lease.start_renewing()
        try:
            result = _push(store, cache, order, infos, lease, hook, jobs, log, tmp_dir, progress)
            if root is not None:                                               # W6
                if lease.lapsed():
                    raise _Lapsed
                put_root(cache.backend, root, [p.base for p in paths], clock, root_ttl, keep)
                hook("writer.rooted", lease)
        except _Lapsed:
            hook("writer.lapsed", lease)
            lease.drop()
            continue
        except BaseException:
            lease.drop()
            raise
        lease.drop()                                                           # W7
        hook("writer.done", result)
        return result
    raise CacheError(f"copy to '{cache.url}': the lease lapsed {ATTEMPTS} times "
                     f"(uploads slower than the lease TTL of {timings.lease_ttl:g} s?)")


def _push(store: Store, cache: BinaryCache, order: list[StorePath],
          infos: dict[StorePath, ValidPathInfo], lease: Lease, hook: Hook,
          jobs: int, log: Callable[[str], None] | None, tmp_dir: str | None,
          progress: Progress | None) -> CopyResult:
    backend, timings, clock = cache.backend, lease.timings, lease.clock
    sd = store.store_dir
    wait_collections(backend, clock, timings, narinfos={p.hash_part for p in order}, hook=hook)  # W2
    present = cache.has(order)                                                # W3
    hook("writer.checked", present)
    result = CopyResult(skipped=[p for p in order if p in present])
    todo = [p for p in order if p not in present]
    batches = [todo[i:i + BATCH] for i in range(0, len(todo), BATCH)]
    # The next batches are compressed while this one is leased, uploaded and committed
    # (its barrier waits on the disk): the workers never wait for the store's thread.
    # Uploads get their own threads, not queued behind those compressions.
    pool = ThreadPoolExecutor(jobs, thread_name_prefix="sk-nar") if jobs > 1 else None
    uploader = ThreadPoolExecutor(jobs, thread_name_prefix="sk-upload") if jobs > 1 else None
    ahead: deque[list[Future[Prepared]]] = deque()
    queued = 0

    def prepare(p: StorePath) -> Future[Prepared]:
        fut: Future[Prepared] = Future()
        try:
            fut.set_result(cache.prepare(sd, infos[p], nar_chunks(store, p), tmp_dir))
        except BaseException as e:  # (raised where the result is taken)
            fut.set_exception(e)
        return fut
    try:
        for _ in batches:
            while queued < len(batches) and len(ahead) < (LOOKAHEAD if pool is not None else 1):
                b = batches[queued]
                queued += 1
                # the store is asked in this thread (pins, validity); the NAR read in a worker
                ahead.append([pool.submit(cache.prepare, sd, infos[p], nar_chunks(store, p), tmp_dir)
                              for p in b] if pool is not None else [prepare(p) for p in b])
            futures = ahead.popleft()
            preps: list[Prepared] = []
            try:
                for f in futures:
                    preps.append(f.result())
                keys = {prep.narinfo.url for prep in preps}
                lease.add_nars(keys)                                          # W4
                wait_collections(backend, clock, timings, nars=keys, hook=hook)
                hook("writer.nars_leased", keys)
                uploaded = (list(uploader.map(cache.upload, preps)) if uploader is not None
                            else [cache.upload(prep) for prep in preps])
            except BaseException:
                ahead.appendleft(futures)  # (its temp files are removed below)
                raise
            batch = [prep.narinfo.path for prep in preps]
            hook("writer.uploaded", batch)
            if lease.lapsed():                                                # W5
                raise _Lapsed
            written = cache.commit_batch(preps, present)
            for prep, up, w in zip(preps, uploaded, written):
                _record(cache, prep, up, w, result, log)
            hook("writer.committed", batch)
            if progress:
                progress(len(result.copied) + len(result.skipped), len(order), result.nar_bytes)
    except BaseException:
        _discard(ahead)
        raise
    finally:
        for p_ in (pool, uploader):
            if p_ is not None:
                p_.shutdown()
    backend.barrier()
    return result


#: batches handed to the workers ahead of the one being committed, so a slow barrier
#: (its fsyncs wait for the disk) does not idle them
LOOKAHEAD = 4


def _discard(ahead: deque[list[Future[Prepared]]]) -> None:
    """After a failure (or a lapsed lease): the temp files of prepared NARs not uploaded."""
    for futures in ahead:
        for f in futures:
            f.cancel()
    for futures in ahead:
        for f in futures:
            if not f.cancelled() and f.exception() is None:
                _unlink(f.result().tmp)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
