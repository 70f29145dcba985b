"""Entry points: optimise a whole store (one process or several walkers) or one path."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from ...formats.storepath import StorePath
from ..reserve import naming

if TYPE_CHECKING:
    pass

from .hashing import _MAX_WARNINGS, _O_DIR, LINKS_DIR
from .journal import recover
from .pool import OptimiseStats
from .records import _NO_CTIME, _links_id, _load_done, _record, _Records, _save_run
from .run import _check_writable, _preload, _Reaper, _Run
from .worker import _Worker

# --- entry points ---------------------------------------------------------------------

def _threads(n: int | None) -> int:
    if n is not None:
        return max(1, n)
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 4))
    except AttributeError:  # pragma: no cover
        return max(1, min(os.cpu_count() or 1, 4))



def optimise_store(store, dry_run: bool = False, trust_link_count: bool = False,
                   progress: Callable[[int, int], None] | None = None,
                   log: Callable[[str], None] | None = None,
                   threads: int | None = None, processes: int | None = None) -> OptimiseStats:
    """``nix-store --optimise``: link every file of every valid path into the pool.

    ``trust_link_count``: a file with more than one link whose inode is not in
    the pool is taken as linked (by something else) and skipped unhashed.
    ``dry_run``: change nothing, report what a run would link and free.
    ``progress(done, total)`` is called after each path (after each chunk of
    paths with several processes); ``log`` gets warnings.
    ``threads``: hashing threads for big files (default: the CPUs, up to 4).
    ``processes``: walkers (default: the CPUs, up to 4, for a run with at least
    ``_PARALLEL_MIN`` paths to walk; a dry run always has one).
    The ``.links`` directory's own growth during the run is reported as
    ``pool_dir_growth`` (``net_bytes_freed`` subtracts it): a pool of many
    entries costs blocks of its own.
    """
    links = os.path.join(store.real_store_dir, LINKS_DIR)
    before = _dir_bytes(links)
    with naming(store.real_store_dir):  # a full or read-only disk: say which (a write to an fd does not)
        stats = _optimise(store, dry_run, trust_link_count, progress, log, threads, processes)
    if not dry_run:
        stats.pool_dir_growth = _dir_bytes(links) - before
    return stats


def _dir_bytes(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _optimise(store, dry_run: bool, trust_link_count: bool, progress, log, threads: int | None,
              processes: int | None) -> OptimiseStats:
    if not dry_run:
        _check_writable(store)
        recover(store.real_store_dir, store.state_dir)  # what a killed run left half-done
    links = os.path.join(store.real_store_dir, LINKS_DIR)
    links_id, records = _load_done(store.state_dir)
    # .links unchanged since the records were written: their inodes are all
    # still there, no readdir of the whole pool needed to check them
    inodes = None if links_id != (0, 0, 0) and links_id == _links_id(links) else _preload(links)
    prefix = len(store.store_dir.path) + 1
    rows = store.db.conn.execute("select id, path from ValidPaths").fetchall()
    ids = {p[prefix:prefix + 32].encode(): rowid for rowid, p in rows}
    total = OptimiseStats(dry_run=dry_run)
    bases = sorted(p[prefix:] for _, p in rows)
    # Paths whose record holds are only looked at (one stat), never touched.
    todo = _skip_done(store, bases, ids, records, inodes, total)
    if todo:
        if inodes is None:
            inodes = _preload(links)
        # Pin every path we will walk, then ask which are valid ("pin, then check").
        if not store.read_only:
            add = store.temp_roots.add
            sd = store.store_dir.path
            for base in todo:
                add(f"{sd}/{base}")
        ids = {p[prefix:prefix + 32].encode(): rowid
               for rowid, p in store.db.conn.execute("select id, path from ValidPaths")}
        todo = [b for b in todo if b[:32].encode() in ids]
    nprocs = 1 if dry_run else processes if processes is not None else (
        _threads(None) if len(todo) >= _PARALLEL_MIN else 1)
    if nprocs > 1 and len(todo) > 1:
        return _optimise_in_processes(store, todo, bases, ids, inodes or set(), trust_link_count,
                                      progress, log, threads, min(nprocs, len(todo)), total)
    run = _Run(store, inodes or set(), dry_run, trust_link_count, log)
    nthreads = _threads(threads)
    if nthreads > 1 and todo:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 -- not for a no-op run
        run.hasher = ThreadPoolExecutor(nthreads, thread_name_prefix="optimise-hash")
    if not dry_run and todo:
        run.reaper = _Reaper()
    done: _Records = {}
    w = _Worker(run)
    try:
        # One thread walks and links: with several, short syscalls hand the GIL
        # back and forth (measured: more CPU, not less time).  Big files are
        # hashed by `run.hasher`, released inodes freed by `run.reaper`.
        for n, base in enumerate(todo, 1):
            rec = w.path(base)
            if rec is not None:
                _record(done, ids, base, rec)
            if progress is not None:
                progress(len(bases) - len(todo) + n, len(bases))
    finally:
        w.close()
        run.close()
        total.merge(w.stats)
        if not dry_run and todo:
            _save_run(store, done, ids, total, run.pool_disturbed)
    total.paths = len(bases)
    total.warnings = run.warnings
    if dry_run:
        for count, nlink, blocks, size in run.replaced.values():
            if count >= nlink:
                total.inodes_freed += 1
                total.bytes_freed += blocks * 512
                total.apparent_bytes_freed += size
    return total


# --- several walkers ---------------------------------------------------------------
#
# One process walks and links at about one core (the GIL: threads do not help
# with many short syscalls).  A big run forks walkers that take chunks of paths
# from a shared queue; the pool's lock protocol and the retries on vanished
# entries already make concurrent optimisers safe, so walkers need nothing
# more between them.  They inherit the parent's temp roots (its pins hold while
# it waits for them) and never touch the database.  On an error every walker
# finishes the chunk it is in (no temp link left behind) and takes no more.

_PARALLEL_MIN = 256  # paths to walk before forking pays off
_CHUNK_PATHS = 32
_child: tuple | None = None  # (run, worker, stop event) in a walker process
_fork_args: tuple | None = None  # what a walker process starts from


def _walker_init() -> None:
    global _child
    store, inodes, trust, threads, stop = _fork_args  # type: ignore[misc]
    run = _Run(store, inodes, False, trust, None)
    nthreads = _threads(threads)
    if nthreads > 1:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 -- only when threaded
        run.hasher = ThreadPoolExecutor(nthreads, thread_name_prefix="optimise-hash")
    run.reaper = _Reaper()
    _child = (run, _Worker(run), stop)


def _walk_chunk(bases: list[str]) -> tuple[OptimiseStats, dict, list[str], bool]:
    run, w, stop = _child  # type: ignore[misc]
    w.stats = OptimiseStats()
    run.warnings = []
    done: dict[str, tuple] = {}
    if stop.is_set():
        return w.stats, done, [], False
    try:
        for base in bases:
            rec = w.path(base)
            if rec is not None:
                done[base] = rec
    finally:
        if w.lock is not None:
            w.lock.release()
    return w.stats, done, run.warnings, run.pool_disturbed


def _optimise_in_processes(store, todo: list[str], bases: list[str], ids: dict[bytes, int],
                           inodes: set[int], trust: bool, progress, log, threads: int | None,
                           nprocs: int, total: OptimiseStats) -> OptimiseStats:
    import multiprocessing  # noqa: PLC0415 -- costly, and only for a multi-process run
    global _fork_args
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    _fork_args = (store, inodes, trust, max(1, _threads(threads) // nprocs), stop)
    chunks = [todo[k:k + _CHUNK_PATHS] for k in range(0, len(todo), _CHUNK_PATHS)]
    done: _Records = {}
    warnings: list[str] = []
    disturbed = False
    walked = 0
    pool = ctx.Pool(nprocs, initializer=_walker_init)
    try:
        try:
            for stats, recs, warns, dist in pool.imap_unordered(_walk_chunk, chunks):
                total.merge(stats)
                disturbed |= dist
                for w in warns:
                    if len(warnings) < _MAX_WARNINGS:
                        warnings.append(w)
                    if log:
                        log(f"warning: {w}")
                for base, rec in recs.items():
                    _record(done, ids, base, rec)
                walked += _CHUNK_PATHS
                if progress is not None:
                    progress(len(bases) - len(todo) + min(walked, len(todo)), len(bases))
        except BaseException:
            stop.set()  # the walkers finish their chunks and take no more
            raise
        finally:
            pool.close()
            pool.join()
    finally:
        _fork_args = None
        _save_run(store, done, ids, total, disturbed)
    total.paths = len(bases)
    total.warnings = warnings
    return total


def _skip_done(store, bases: list[str], valid: dict[bytes, int], records: _Records,
               inodes: set[int] | None, total: OptimiseStats) -> list[str]:
    """The paths that need a walk: all but those whose done-record still holds
    (``inodes`` None: .links is unchanged, every recorded inode is in it)."""
    if not records:
        return bases
    todo = []
    sfd = os.open(store.real_store_dir, _O_DIR)
    try:
        for base in bases:
            hp = base[:32].encode()
            rec = records.get(hp)
            if rec is not None and rec[0] == valid.get(hp):
                try:
                    st = os.stat(base, dir_fd=sfd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                if (st is not None and st.st_ino == rec[1]
                        and (rec[2] == _NO_CTIME or st.st_ctime_ns == rec[2])
                        and (inodes is None or inodes.issuperset(rec[3]))):
                    total.files_already_linked += len(rec[3])
                    continue
            todo.append(base)
    finally:
        os.close(sfd)
    return todo


def optimise_path(store, sp: StorePath, inodes: set[int] | None = None,
                  log: Callable[[str], None] | None = None) -> OptimiseStats:
    """Optimise one path (``auto-optimise-store`` passes an empty ``inodes``, as Nix does).

    The caller holds the path: pinned and found valid, or (a new path) locked
    and not yet registered.
    """
    _check_writable(store)
    run = _Run(store, set() if inodes is None else inodes, False, False, log)
    w = _Worker(run)
    try:
        w.path(sp.base)
    finally:
        w.close()
        run.close()
    w.stats.paths = 1
    w.stats.warnings = run.warnings
    return w.stats
