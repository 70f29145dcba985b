"""Copying closures between a store and a binary cache (``storekeeper copy``).

To a cache (spec §10, with storekeeper's stricter rules): the closure of the given
paths, minus those the cache has (asked of the cache itself, never of a local
cache of it), is compressed (in parallel when the store's NARs may be read from
several threads), NARs are uploaded in any order, narinfos strictly references
first, each after its own NAR.

From a cache: the closure is discovered through the narinfos' references,
signatures are checked (spec §5.3) unless the cache is ``?trusted=1`` or
``check_sigs`` is off, and paths are added references first, each NAR checked
while it streams.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, cast

from ..api import Store
from ..errors import InvalidPath, StoreError
from ..formats.narinfo import NarInfo
from ..formats.pathinfo import ValidPathInfo
from ..formats.signatures import PublicKey, is_trusted
from ..formats.storepath import StorePath
from ..queries import references_first
from .backends import CacheError
from .binary import BinaryCache, Prepared
from .fetch import Job, Staged, StagingStore, can_stage, fetch_all, fetch_threads

#: progress(paths done or skipped, paths in the closure, NAR bytes copied)
Progress = Callable[[int, int, int], None]


@dataclass
class CopyResult:
    copied: list[StorePath] = field(default_factory=list)
    skipped: list[StorePath] = field(default_factory=list)  # already there
    nar_bytes: int = 0      # uncompressed NAR bytes copied
    file_bytes: int = 0     # compressed bytes transferred (to: written; from: read)
    uploaded_nars: int = 0  # to: NAR files written (not shared with one already there)

    def to_json(self, print_path: Callable[[StorePath], str]) -> dict:
        return {"copied": [print_path(p) for p in self.copied],
                "skipped": [print_path(p) for p in self.skipped],
                "narBytes": self.nar_bytes, "fileBytes": self.file_bytes,
                "uploadedNars": self.uploaded_nars}


def nar_chunks(store: Store, sp: StorePath) -> Iterable[bytes | memoryview]:
    """The NAR of ``sp`` for :meth:`BinaryCache.prepare` (which takes each chunk at
    once): a local store's as views of one reused buffer, no copy per chunk."""
    views = getattr(store, "dump_path_views", None)
    return views(sp) if views is not None else store.dump_path(sp)


def closure_order(store: Store, paths: Iterable[StorePath]
                  ) -> tuple[list[StorePath], dict[StorePath, ValidPathInfo]]:
    """The closure of ``paths`` references first (``reversed(store.topo_sort(closure))``)
    and each path's info: one query per path, where closure, sort and infos asked
    three."""
    infos: dict[StorePath, ValidPathInfo] = {}
    queue = deque(paths)
    while queue:
        p = queue.popleft()
        if p not in infos:
            info = infos[p] = store.path_info(p)
            queue.extend(info.references)
    within = infos.keys()
    order = references_first(sorted(infos), lambda p: sorted(infos[p].references & within),
                             store.store_dir.print)
    return order, infos


def copy_to_cache(store: Store, cache: BinaryCache, paths: Iterable[StorePath],
                  jobs: int = 1, log: Callable[[str], None] | None = None,
                  tmp_dir: str | None = None, progress: Progress | None = None) -> CopyResult:
    """Copy the closure of ``paths`` into ``cache``.  ``jobs`` > 1 compresses in threads;
    only for stores whose ``dump_path`` streams may be read from other threads (a local
    store's are; a daemon connection's are not)."""
    sd = store.store_dir
    cache.check_store_dir(sd, create=True)
    order, infos = closure_order(store, paths)  # references first
    present = cache.has(order)
    result = CopyResult(skipped=[p for p in order if p in present])
    todo = [p for p in order if p not in present]

    def prepare_and_upload(p: StorePath, chunks: Iterable[bytes | memoryview]
                           ) -> tuple[Prepared, bool]:
        prep = cache.prepare(sd, infos[p], chunks, tmp_dir)
        return prep, cache.upload(prep)

    batch: list[tuple[Prepared, bool]] = []

    def flush() -> None:
        # one barrier per batch: its NARs durable, then its narinfos in order
        written = cache.commit_batch([prep for prep, _ in batch], present)
        for (prep, uploaded), w in zip(batch, written):
            _record(cache, prep, uploaded, w, result, log)
        batch.clear()
        if progress:
            progress(len(result.copied) + len(result.skipped), len(order), result.nar_bytes)

    if jobs > 1 and len(todo) > 1:
        with ThreadPoolExecutor(jobs) as pool:
            # the store is asked in this thread (pins, validity); the NAR is read there
            futures: deque[Future[tuple[Prepared, bool]]] = deque()
            queue = deque(todo)
            try:
                while queue or futures:
                    while queue and len(futures) < BATCH + 2 * jobs:
                        p = queue.popleft()
                        futures.append(pool.submit(prepare_and_upload, p, nar_chunks(store, p)))
                    batch.append(futures.popleft().result())
                    while futures and futures[0].done():
                        batch.append(futures.popleft().result())
                    # one barrier per BATCH narinfos; the workers go on meanwhile
                    if len(batch) >= BATCH or not (queue or futures):
                        flush()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        for p in todo:
            batch.append(prepare_and_upload(p, nar_chunks(store, p)))
            if progress:
                progress(len(result.copied) + len(result.skipped) + len(batch), len(order),
                         result.nar_bytes + sum(prep.narinfo.nar_size for prep, _ in batch))
            if len(batch) >= BATCH:
                flush()
        if batch:
            flush()
    cache.backend.barrier()
    return result


#: narinfos committed after one durability barrier
BATCH = 64


def _record(cache: BinaryCache, prep: Prepared, uploaded: bool, written: bool,
            result: CopyResult, log: Callable[[str], None] | None) -> None:
    ni = prep.narinfo
    if log and written:
        log(f"copied path '{ni.store_dir.print(ni.path)}' to '{cache.url}'")
    (result.copied if written else result.skipped).append(ni.path)
    if written:
        result.nar_bytes += ni.nar_size
        if uploaded:
            result.uploaded_nars += 1
            result.file_bytes += ni.file_size or 0


def closure_in_cache(cache: BinaryCache, store: Store, paths: Iterable[StorePath]
                     ) -> dict[StorePath, NarInfo]:
    """The narinfos of the closure of ``paths`` in ``cache`` (an error names a missing one)."""
    sd = store.store_dir
    found: dict[StorePath, NarInfo] = {}
    wanted = set(paths)
    while wanted:
        got = cache.narinfos(sd, sorted(wanted))
        for p in sorted(wanted - set(got)):
            raise InvalidPath(f"path '{sd.print(p)}' is not valid in binary cache '{cache.url}'")
        found.update(got)
        wanted = {r for ni in got.values() for r in ni.references} - set(found)
    return found


def _topo(infos: Mapping[StorePath, NarInfo]) -> list[StorePath]:
    """References first; deterministic."""
    return references_first(sorted(infos), lambda p: sorted(infos[p].references),
                            lambda p: infos[p].store_dir.print(p))


def copy_from_cache(cache: BinaryCache, store: Store, paths: Iterable[StorePath],
                    keys: Mapping[str, PublicKey], check_sigs: bool = True,
                    store_checks_sigs: bool = False,
                    log: Callable[[str], None] | None = None,
                    progress: Progress | None = None, jobs: int = 1) -> CopyResult:
    """Copy the closure of ``paths`` from ``cache`` into ``store``.  ``jobs`` > 1: a
    store that stages (a local one) gets ``jobs`` paths fetched at once (:mod:`.fetch`).

    ``check_sigs``: refuse paths that are neither content-addressed nor signed by one of
    ``keys`` (unless the cache is ``?trusted=1``), before anything is downloaded.
    ``store_checks_sigs`` is passed on to ``add_nar`` (a daemon checks them itself)."""
    sd = store.store_dir
    cache.check_store_dir(sd)
    infos = closure_in_cache(cache, store, paths)
    order = _topo(infos)
    valid = store.query_valid_paths(order)
    result = CopyResult(skipped=[p for p in order if p in valid])
    todo = [p for p in order if p not in valid]
    if check_sigs:
        for p in todo:
            if not signed_enough(cache, infos[p], keys):
                raise StoreError(f"cannot add path '{sd.print(p)}' because it lacks a valid "
                                 f"signature (none of its signatures is by a key in "
                                 f"'trusted-public-keys'; cache '{cache.url}')")
    if jobs > 1 and len(todo) > 1 and can_stage(store):
        _fetch_parallel(cache, store, [infos[p] for p in todo], jobs, result, log,
                        progress=progress and (lambda: progress(
                            len(result.copied) + len(result.skipped), len(order), result.nar_bytes)))
        return result
    if cache.threads > 1 and len(todo) > 1:
        _add_prefetched(cache, store, [infos[p] for p in todo], store_checks_sigs, result, log,
                        progress=progress and (lambda: progress(
                            len(result.copied) + len(result.skipped), len(order), result.nar_bytes)))
        return result
    for p in todo:
        ni = infos[p]
        if log:
            log(f"copying path '{sd.print(p)}' from '{cache.url}'")
        import_nar(cache, store, ni, store_checks_sigs)
        _count(result, ni)
        if progress:
            progress(len(result.copied) + len(result.skipped), len(order), result.nar_bytes)
    return result


def signed_enough(cache: BinaryCache, ni: NarInfo, keys: Mapping[str, PublicKey]) -> bool:
    """May ``ni`` be taken from ``cache`` when signatures are required (spec §5.3): the
    cache is ``?trusted=1``, or the path is content-addressed or signed by one of ``keys``.
    The one rule of ``copy --from`` and of substitution (daemon and local CLI)."""
    return cache.params.trusted or is_trusted(ni.store_dir, ni.path_info(), keys)


def import_nar(cache: BinaryCache, store: Store, ni: NarInfo, check_sigs: bool) -> None:
    """Download ``ni``'s NAR and add it to ``store``, checked while it streams (NarHash,
    NarSize, FileHash): the one import step of ``copy --from`` and of substitution."""
    stream = cache.open_nar(ni)
    try:
        store.add_nar(ni.path_info(), stream, check_sigs=check_sigs)
        stream.finish()
    finally:
        stream.close()


def _count(result: CopyResult, ni: NarInfo) -> None:
    result.copied.append(ni.path)
    result.nar_bytes += ni.nar_size
    result.file_bytes += ni.file_size or 0


def stage_from(cache: BinaryCache, store: StagingStore, ni: NarInfo) -> Callable[[], Staged]:
    """A worker's part of fetching ``ni``: download, decode and check it, unpack it into
    the store's scratch space (a :mod:`.fetch` job)."""
    def run() -> Staged:
        stream = cache.open_nar(ni)
        try:
            staged = store.stage_nar(ni.path_info(), stream)
            try:
                stream.finish()
            except BaseException:
                staged.discard()
                raise
            return staged
        finally:
            stream.close()
    return run


def make_room(store: object, nis: Iterable[NarInfo]) -> None:
    """The auto-GC check a one-by-one ``add_nar`` makes, once for the whole batch
    of ``nis`` (staging in threads does not make it: it is the store thread's)."""
    auto_gc = getattr(store, "auto_gc", None)
    if auto_gc is not None:
        auto_gc(sum(ni.nar_size for ni in nis))


def _fetch_parallel(cache: BinaryCache, store: Store, nis: list[NarInfo], jobs: int,
                    result: CopyResult, log: Callable[[str], None] | None,
                    progress: Callable[[], None] | None = None) -> None:
    sstore = cast(StagingStore, store)
    byp = {ni.path: ni for ni in nis}
    plan = {ni.path: Job(ni.path, ni.references & byp.keys() - {ni.path},
                         stage_from(cache, sstore, ni)) for ni in nis}
    errors: list[tuple[StorePath, BaseException]] = []
    make_room(store, nis)

    def started(p: StorePath) -> None:
        # (the store pins each path of a batch before it checks, moves and registers it)
        if log:
            log(f"copying path '{store.store_dir.print(p)}' from '{cache.url}'")

    def done(p: StorePath) -> None:
        _count(result, byp[p])
        if progress:
            progress()

    def failed(p: StorePath, e: BaseException | None) -> None:
        if e is not None:
            errors.append((p, e))
    fetch_all(sstore, plan, fetch_threads(jobs, [cache]), started, done, failed)
    if errors:
        p, e = errors[0]
        if isinstance(e, StoreError):
            raise e
        raise StoreError(f"copying '{store.store_dir.print(p)}' from '{cache.url}': {e}") from e


#: NARs downloaded ahead of the one being added (remote caches)
PREFETCH = 8


def _download(cache: BinaryCache, ni: NarInfo, tmp_dir: str | None) -> str:
    """Download, decode and check one NAR into a temp file (a worker thread's part)."""
    fd, tmp = tempfile.mkstemp(prefix="sk-nar-", dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            stream = cache.open_nar(ni)
            try:
                while chunk := stream.read(1 << 20):
                    out.write(chunk)
                stream.finish()
            finally:
                stream.close()
        return tmp
    except BaseException:
        os.unlink(tmp)
        raise


def _add_prefetched(cache: BinaryCache, store: Store, nis: list[NarInfo], store_checks_sigs: bool,
                    result: CopyResult, log: Callable[[str], None] | None,
                    tmp_dir: str | None = None,
                    progress: Callable[[], None] | None = None) -> None:
    """Remote caches: NARs are fetched (and checked) in threads, up to PREFETCH ahead, and
    added to the store in this thread, references first."""
    with ThreadPoolExecutor(min(PREFETCH, cache.threads)) as pool:
        futures = deque((ni, pool.submit(_download, cache, ni, tmp_dir)) for ni in nis[:PREFETCH])
        rest = deque(nis[PREFETCH:])
        try:
            while futures:
                ni, fut = futures.popleft()
                if rest:
                    nxt = rest.popleft()
                    futures.append((nxt, pool.submit(_download, cache, nxt, tmp_dir)))
                tmp = fut.result()
                try:
                    if log:
                        log(f"copying path '{ni.store_dir.print(ni.path)}' from '{cache.url}'")
                    with open(tmp, "rb") as nar:
                        store.add_nar(ni.path_info(), nar, check_sigs=store_checks_sigs)
                finally:
                    os.unlink(tmp)
                _count(result, ni)
                if progress:
                    progress()
        except BaseException:
            for _, pending in futures:
                pending.cancel()
            for _, pending in futures:
                if not pending.cancelled():
                    try:
                        os.unlink(pending.result())
                    except BaseException:  # already failing: only clean up
                        pass
            raise


__all__ = ["CacheError", "CopyResult", "closure_in_cache", "copy_from_cache", "copy_to_cache",
           "import_nar", "signed_enough"]
