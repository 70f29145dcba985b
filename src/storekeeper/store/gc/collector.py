"""The garbage collector: never deletes a path that is in use.

Protocol and invariants (compatible with Nix 2.8 processes on the same store):

1. The GC holds ``gc.lock`` exclusively for its whole run and serves
   ``gc-socket/socket``.  Any process that pinned a path before we took the
   lock wrote it to its ``temproots/<pid>`` file, which we read after taking
   the lock; any later pin reaches us through the socket and is acknowledged
   only once it is in our temp-root set.
   Temp-root files are read before the permanent roots are scanned, so a
   root handed over from a temp root to a symlink (or to a user's
   registration or lease, which the daemon writes only after pinning) is
   never missed.
2. The reference graph is loaded from one DB snapshot (:mod:`.graph`); liveness is the
   forward closure of the roots over references, plus derivers when
   ``keep-derivations`` and derivation outputs when ``keep-outputs``.
3. Dead paths are deleted referrers-first, in batches.  Before a batch is
   touched its members are checked against the temp-root set and their
   hash parts are published as *pending*: a socket client pinning one of them
   waits until the batch is done (and then finds the path invalid, so it
   re-creates it).  A path found pinned is kept together with its whole
   closure.  A path whose ``.lock`` is held (being added or built) is kept too.
4. **Invalidate before delete**: a batch's rows are removed from the DB in one
   committed transaction before any of its files is unlinked, so a crash
   never leaves a valid path with missing files.
5. Read-only actions (``live``, ``dead``) change nothing on disk: unlike Nix
   2.8 they do not delete stray entries or stale links.
6. A deleting GC frees the reserve (:mod:`..reserve`) before its first write,
   so it works on a full disk, and makes it again when it is done (a request
   served by another's run, :mod:`.share`, writes nothing and leaves it alone).
"""

from __future__ import annotations

import os
import time
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ... import fs
from ...api import DEAD, DELETE_DEAD, DELETE_SPECIFIC, LIVE, GCOptions, GCResult
from ...errors import PathInUse
from ...formats.storepath import StorePath, StorePathError
from ...fs.crash import crash_point
from ..locks import PathLocks, lock_fd, open_lock_unless_read_only_fs
from ..optimise import remove_unused_links
from ..reserve import ensure_reserve, release_reserve, with_reserve
from ..roots import Root, RootFinder
from .graph import Graph, stray_names
from .pinserver import PinServer
from .share import SharedRuns
from .threads import Task

BATCH = 1024
UNLINK_THREADS = 4
SMALL_BATCH = 64
#: threads that share the /proc scan (see RootFinder.runtime_scans)
PROC_THREADS = 4
#: up to this many dead paths, their lock files are looked for one by one
LOCK_LOOKUPS = 256


class GarbageCollector(PinServer):
    """One garbage collection of ``store`` (module docstring); the pins that reach it
    while it runs come through :class:`~.pinserver.PinServer`."""

    def __init__(self, store, log: Callable[[str], None] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        super().__init__(store.store_dir, store.state_dir, log or (lambda msg: None))
        self.store = store
        self.progress = progress or (lambda done, total: None)
        self._total = 0

    # --- the collection ----------------------------------------------------------------

    def collect(self, opts: GCOptions) -> GCResult:
        store = self.store
        deleting = opts.action in (DELETE_DEAD, DELETE_SPECIFIC)
        if deleting:
            store._check_writable()
        keep_outputs, keep_derivations = opts.keep_outputs, opts.keep_derivations
        if opts.action == DELETE_SPECIFIC and opts.ignore_liveness:
            keep_outputs = keep_derivations = False
        result = GCResult()
        db_dir = store.layout.db_dir
        shared = SharedRuns.for_request(store, opts)
        # (6.) first, so that every write below has room; a request that may be
        # served by another's run (.share) only once it runs itself
        freed = deleting and shared is None
        if freed:
            release_reserve(db_dir)
        gc_fd = with_reserve(db_dir, lambda: open_lock_unless_read_only_fs(
            os.path.join(store.state_dir, "gc.lock"), store.read_only))
        # (read before the lock is asked for: see .share)
        arrived = shared.last_started() if shared is not None else 0
        try:
            if gc_fd is not None and not lock_fd(gc_fd, exclusive=True, wait=False):
                if not opts.wait_for_lock:
                    self._note(result, "a garbage collection is already running")
                    return result
                self.log("waiting for the big garbage collector lock...")
                if shared is None:
                    lock_fd(gc_fd, exclusive=True)
                elif (served := shared.wait(gc_fd, arrived)) is not None:
                    self._note(served, "a garbage collection that started after this request "
                                       "has done it (its deleted paths are this request's)")
                    return served
            if opts.only_if is not None and not opts.only_if():
                return result
            if shared is not None:
                release_reserve(db_dir)
                freed = True
                shared.start()  # (before any root is read)
            if gc_fd is not None:  # (None: nothing can pin or write on a read-only file system)
                self._start_server()
            finder = RootFinder(store.store_dir, store.real_store_dir, store.state_dir,
                                indirect_grace=store.settings.indirect_root_grace,
                                runtime_mode=store.settings.runtime_roots)
            # Temp roots *before* permanent ones: a process that pins a path,
            # links a permanent root to it and exits is then seen one way or
            # the other.  (Nix 2.8 reads them the other way round and can lose
            # a path handed over between its two scans.)
            roots: list[Root] = list(finder.temp_roots(cleanup=deleting))
            with self._cond:
                self._temp_hashes.update(r.path.hash_part for r in roots)
            # The /proc scan (mostly waiting on the kernel) runs beside the
            # root walk and the graph load, in parts: it is the longest part of
            # a GC on a busy machine, and every GC queued behind this one waits.
            runtime = [] if opts.ignore_liveness else [Task(scan) for scan in finder.runtime_scans(PROC_THREADS)]
            # So does the listing of the store directory that a report of dead
            # paths needs (a million entries; the graph load mostly runs in
            # SQLite, without the GIL).
            listing = Task(os.listdir, store.real_store_dir) \
                if opts.action == DEAD and not opts.specific else None
            try:
                if not opts.ignore_liveness:
                    self.log("finding garbage collector roots...")
                    roots += finder.permanent_roots(cleanup=deleting)
                    roots += finder.user_roots(cleanup=deleting)
                graph = Graph(store.db)
            finally:  # (never leave a thread behind)
                found = [task.result() for task in runtime]
            for part in found:
                roots += part
            # as Nix does, while the roots are found (stale links, unreadable roots)
            for m in finder.messages:
                self._note(result, m)
            sd = store.store_dir
            alive = graph.marks()
            root_paths = {sd.print(r.path) for r in roots}
            graph.closure([i for i in map(graph.id_of_path, sorted(root_paths)) if i is not None],
                          alive, keep_outputs, keep_derivations)
            with self._cond:
                temp = sorted(self._temp_hashes)
            pinned = [i for h in temp for i in graph.ids_of_hash(f"{sd.path}/{h}")]
            graph.closure(pinned, alive, keep_outputs, keep_derivations)

            # Nix 2.8 says which kind of pass this is (not for deleteSpecific, nor maxFreed 0)
            if opts.action != DELETE_SPECIFIC and opts.max_freed > 0:
                self.log("deleting garbage..." if deleting else "determining live/dead paths...")
            if opts.action == LIVE:
                _, live = graph.select(alive, 1, ids=False)
                if opts.specific:
                    wanted = set(map(sd.print, opts.paths))
                    live = [p for p in live if p in wanted]
                result.paths = live
                return result
            dead_ids, dead_paths = graph.select(alive, 0, ids=opts.action != DEAD or opts.specific)
            candidates = self._candidates(graph, alive, dead_ids, opts, sd)
            if opts.action == DEAD:
                if candidates is None:
                    assert listing is not None
                    result.paths = dead_paths + self._invalid_entries(dry=True, entries=listing.result())
                else:
                    result.paths = [p for i, p in zip(dead_ids, dead_paths) if candidates[i]]
                return result
            # a dead path's name by id: its place in (dead_ids, dead_paths)
            where = array("I", bytes(4 * graph.size))
            for k, i in enumerate(dead_ids):
                where[i] = k
            self._name = lambda i: dead_paths[where[i]]
            if candidates is None:
                candidates = graph.marks()
                for i in dead_ids:
                    candidates[i] = 1
            order = graph.referrers_first(dead_ids, candidates)
            del candidates
            self._total = len(order)
            self._delete(graph, order, alive, opts, result, keep_outputs, keep_derivations)
            if opts.action == DELETE_DEAD and not opts.specific \
                    and result.bytes_freed <= opts.max_freed:
                self._invalid_entries(dry=False, result=result)
            if deleting:
                self._remove_unused_links(result)
            if shared is not None:
                shared.finish(result)
            return result
        finally:
            self._stop_server()
            if gc_fd is not None:
                os.close(gc_fd)
            if freed:
                ensure_reserve(db_dir, store.settings.gc_reserved_space)

    def _note(self, result: GCResult, message: str) -> None:
        """A message Nix prints at this point: logged now, and kept in ``result.messages``."""
        result.messages.append(message)
        self.log(message)

    def _candidates(self, graph: Graph, alive: bytearray, dead_ids: array, opts: GCOptions,
                    sd) -> bytearray | None:
        """The marks of the paths to delete; None for "every dead path"."""
        if opts.action != DELETE_SPECIFIC and not opts.specific:
            return None
        wanted: set[int] = set()
        for sp in opts.paths:
            i = graph.id_of_path(sd.print(sp))
            if i is not None:  # (not valid: nothing to do)
                wanted.add(i)
        if opts.delete_referrers:
            stack = list(wanted)
            while stack:
                for r in graph.referrers_of(stack.pop()):
                    if r not in wanted:
                        wanted.add(r)
                        stack.append(r)
        out = graph.marks()
        if opts.action != DELETE_SPECIFIC:
            # The dead part of the set: those dead paths all of whose referrers go too
            # (an alive path, or one a kept path refers to, is skipped, not an error).
            keep = {i for i in wanted if not alive[i]}
            referrers = {i: graph.referrers_of(i) for i in keep}
            changed = True
            while changed:
                changed = False
                for i in list(keep):
                    if any(r != i and r not in keep for r in referrers[i]):
                        keep.discard(i)
                        changed = True
            for i in keep:
                out[i] = 1
            return out
        for i in wanted:
            # deletable only if dead and every (transitive) referrer is deleted with it
            stack, seen = [i], {i}
            while stack:
                j = stack.pop()
                if alive[j] or j not in wanted:
                    raise PathInUse(f"Cannot delete path '{graph.path_of_id(i)}' since it is still alive. "
                                    "To find out why, use: nix-store --query --roots")
                for r in graph.referrers_of(j):
                    if r != j and r not in seen:
                        seen.add(r)
                        stack.append(r)
            out[i] = 1
        return out

    def _delete(self, graph: Graph, order: array, alive: bytearray, opts: GCOptions,
                result: GCResult, keep_outputs: bool, keep_derivations: bool) -> None:
        # Which dead paths have a lock file: one listing of the store for many, a
        # look per path for a few (a busy daemon's GC deletes a handful of paths,
        # and listing a store of any size costs more than that).
        self._lock_files = {n for n in os.listdir(self.store.real_store_dir) if n.endswith(".lock")} \
            if len(order) > LOCK_LOOKUPS else None
        # every dead path is unlinked relative to one fd of the store directory
        self._store_fd = fs.open_dir(self.store.real_store_dir)
        try:
            with ThreadPoolExecutor(max_workers=UNLINK_THREADS, thread_name_prefix="gc-unlink") as ex:
                self._unlinker = ex
                self._delete_loop(graph, order, alive, opts, result, keep_outputs, keep_derivations)
        finally:
            os.close(self._store_fd)

    def _delete_loop(self, graph: Graph, order: array, alive: bytearray, opts: GCOptions,
                     result: GCResult, keep_outputs: bool, keep_derivations: bool) -> None:
        """Two batches in flight: the next one is invalidated while the files of
        the previous one are unlinked.  Both stay *pending* until their files are gone."""
        sd = self.store.store_dir
        # with a byte budget, stop as soon as it is spent (Nix checks after every path)
        budget = opts.max_freed < 2**64 - 1
        batch_size = 1 if budget else BATCH
        pos = 0
        inflight: _Batch | None = None
        try:
            while True:
                # checked after every path, the last one too (as Nix does)
                if result.bytes_freed > opts.max_freed:
                    self._note(result, f"deleted more than {opts.max_freed} bytes; stopping")
                    return
                if pos >= len(order):
                    return
                batch: list[int] = []
                with self._cond:
                    while pos < len(order) and len(batch) < batch_size:
                        i = order[pos]
                        pos += 1
                        if alive[i]:
                            continue
                        p = self._name(i)
                        if p[len(sd.path) + 1:][:32] in self._temp_hashes:
                            graph.closure([i], alive, keep_outputs, keep_derivations)
                            continue
                        batch.append(i)
                    hashes = {self._name(i)[len(sd.path) + 1:][:32] for i in batch}
                    self._pending |= hashes
                current = _Batch(hashes)
                try:
                    self._start_batch(graph, batch, alive, keep_outputs, keep_derivations, current)
                except BaseException:
                    self._finish_batch(graph, current, result)
                    raise
                if inflight is not None:
                    previous, inflight = inflight, None
                    self._finish_batch(graph, previous, result)
                if budget:
                    self._finish_batch(graph, current, result)
                else:
                    inflight = current
        finally:
            if inflight is not None:
                self._finish_batch(graph, inflight, result)

    def _start_batch(self, graph: Graph, batch: list[int], alive: bytearray, keep_outputs: bool,
                     keep_derivations: bool, b: "_Batch") -> None:
        """Lock what needs locking, invalidate (one transaction), start unlinking."""
        store, sd = self.store, self.store.store_dir
        go: list[int] = []
        for i in batch:
            base = self._name(i)[len(sd.path) + 1:]
            real = os.path.join(store.real_store_dir, base)
            # Only a path someone holds a lock file for can be in use by a
            # locker (a repair or a build); anyone who locks it later must
            # pin it first, and that pin waits for this batch.  So the lock
            # is taken only where a lock file exists, sparing a create and
            # an unlink per dead path.
            if (base + ".lock" in self._lock_files) if self._lock_files is not None \
                    else os.path.lexists(real + ".lock"):
                pl = PathLocks()
                if not pl.lock([real], wait=False):
                    # being created or built right now: keep it and what it needs
                    graph.closure([i], alive, keep_outputs, keep_derivations)
                    continue
                pl.delete_on_release = True
                b.locks.append(pl)
            go.append(i)
        go = [i for i in go if not alive[i]]
        if not go:
            return
        with store.db.transaction() as conn:
            # Set-wise: the Refs rows of the batch go first, so the per-row
            # foreign-key work on ValidPaths is only the "restrict" probe that
            # proves nothing outside the batch still refers to these paths.
            # (Slices stay under old SQLite's limit of 999 parameters.)
            for sql in ("delete from Refs where referrer in ({})", "delete from ValidPaths where id in ({})"):
                for k in range(0, len(go), 900):
                    part = go[k:k + 900]
                    conn.execute(sql.format(",".join("?" * len(part))), part)
        crash_point("gc.invalidated")
        # Unlinking is syscall-bound and releases the GIL: a few threads keep
        # the file system busier than one (the rows are already gone).  One
        # task per slice of the batch, not per path: futures cost more than
        # unlinking a small file.
        b.ids = go
        names = [self._name(i)[len(sd.path) + 1:] for i in go]
        if len(names) <= SMALL_BATCH:
            # A few paths (a GC on a busy daemon): unlinked here, at once; starting
            # a thread costs more than that, and waits for a CPU on a loaded machine.
            done: Future = Future()
            try:
                done.set_result(_delete_trees(self._store_fd, names))
            except Exception as e:  # noqa: BLE001 -- raised by _finish_batch, as from a thread
                done.set_exception(e)
            b.futures = [done]
            return
        # contiguous slices: each thread keeps to its own stretch of the inode table
        step = -(-len(names) // UNLINK_THREADS)
        b.futures = [self._unlinker.submit(_delete_trees, self._store_fd, names[k:k + step])
                     for k in range(0, len(names), step)]

    def _finish_batch(self, graph: Graph, b: "_Batch", result: GCResult) -> None:
        try:
            freed = [n for f in b.futures for n in f.result()]
            if b.ids:
                crash_point("gc.unlinked")
            for i, n in zip(b.ids, freed):
                p = self._name(i)
                self.log(f"deleting '{p}'")
                result.bytes_freed += n
                result.paths.append(p)
            self.progress(len(result.paths), self._total)
        finally:
            for pl in b.locks:
                pl.release()
            with self._cond:
                self._pending -= b.hashes
                self._cond.notify_all()

    def _invalid_entries(self, dry: bool, result: GCResult | None = None,
                         entries: list[str] | None = None) -> list[str]:
        """Store-dir entries that are not valid paths (leftovers, junk); deleted unless in use."""
        store, sd = self.store, self.store.store_dir
        names: list[str] = []
        if entries is None:
            entries = os.listdir(store.real_store_dir)
        strays = stray_names(store.db, sd, entries)
        for name in entries:
            if name == ".links" or name not in strays:
                continue
            full = os.path.join(store.real_store_dir, name)
            try:
                is_path = StorePath.from_base(name, lax=True)
            except StorePathError:
                is_path = None
            with self._cond:
                if is_path is not None and is_path.hash_part in self._temp_hashes:
                    continue
                if not dry and is_path is not None:
                    # a pin of this hash now waits until we are done with the entry
                    self._pending = {is_path.hash_part}
            try:
                if _in_use(full):
                    continue
                if is_path is not None and not name.endswith(".lock"):
                    names.append(f"{sd.path}/{name}")
                if dry or result is None:
                    continue
                if name.endswith(".lock"):
                    _remove_lock_file(full)
                    continue
                # An adder re-creating this path holds its lock: leave the entry to it.
                locks = PathLocks()
                if is_path is not None and not locks.lock([full], wait=False):
                    continue
                try:
                    result.bytes_freed += delete_tree(full)
                    crash_point("gc.junk")
                finally:
                    locks.delete_on_release = True
                    locks.release()
            finally:
                with self._cond:
                    self._pending = set()
                    self._cond.notify_all()
        return names

    def _remove_unused_links(self, result: GCResult) -> None:
        # under the optimiser's lock protocol (see store.optimise)
        self.log("deleting unused links...")
        freed, saving = remove_unused_links(self.store)
        result.bytes_freed += freed
        self.log(f"note: currently hard linking saves {saving / 2**20:.2f} MiB")


@dataclass
class _Batch:
    """Dead paths invalidated together; pending (pins wait) until their files are gone."""
    hashes: set[str]
    ids: list[int] = field(default_factory=list)
    futures: list = field(default_factory=list)
    locks: list[PathLocks] = field(default_factory=list)


def _delete_trees(store_fd: int, names: list[str]) -> list[int]:
    freed = []
    for n in names:
        freed.append(fs.remove_tree(n, dir_fd=store_fd))
        crash_point("gc.deleted")
    return freed


SCRATCH_GRACE_SECONDS = 300


def _in_use(path: str) -> bool:
    """A scratch dir of a running add (locked, or too new to be locked yet), or a held ``.lock``."""
    name = os.path.basename(path)
    if not (name.startswith("tmp-") or name.endswith(".lock")):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if not lock_fd(fd, exclusive=True, wait=False):
            return True
        # its creator makes it, then locks it: a fresh one may not be locked yet
        return name.startswith("tmp-") and time.time() - os.fstat(fd).st_mtime < SCRATCH_GRACE_SECONDS
    finally:
        os.close(fd)


def _remove_lock_file(path: str) -> None:
    """Remove a ``.lock`` entry nobody holds; a squatter (a directory, a link) goes too."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError:
        fs.remove_tree(path)  # not a lock file at all: nobody can hold it
        return
    try:
        if lock_fd(fd, exclusive=True, wait=False) and fs.kind_of(os.fstat(fd).st_mode) == fs.REG:
            try:
                os.unlink(path)
            except (FileNotFoundError, IsADirectoryError):
                return  # swapped meanwhile: the next collection looks again
            os.write(fd, b"d")
    finally:
        os.close(fd)


def delete_tree(path: str) -> int:
    """Delete a store entry (a file tree that may be read-only, and that a build
    user may be changing under us); return the bytes Nix would count as freed.
    See :func:`storekeeper.fs.remove_tree`."""
    return fs.remove_tree(path)
