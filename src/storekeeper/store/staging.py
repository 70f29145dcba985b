"""Importing many NARs at once: unpacked in any thread, installed in batches.

A :class:`StagedNar` is one path's files, unpacked from its NAR, checked (NarHash,
NarSize, content address) and canonicalised at a new name in the store's
:class:`StagingArea`, not yet at the path's name.  Staging
touches neither the database nor the temp roots, so callers run it in worker threads
(downloads and decompression of independent paths side by side).

:func:`begin_staged` and :class:`PendingBatch` keep LocalStore's invariants for a
whole batch, in the store's own thread: each path is pinned *before* its validity is
checked, locked and renamed to its name (a rename keeps the canonical metadata); then
the batch is synced once (one ``syncfs`` for a big batch instead of an fsync per file;
this part may run in another thread, beside the next batch's renames) and registered
in one transaction.  A path is registered only with all its references valid or in
the same batch, so a path whose reference failed is never registered; a batch that
fails is removed whole (never unregistered files at a path's name) and the caller may
retry its paths one by one.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from typing import TYPE_CHECKING, Collection, Iterable

from ..errors import BadArchive, InvalidPath
from ..formats import nar as narfmt
from ..formats.pathinfo import ValidPathInfo
from ..formats.storepath import StorePath
from ..formats.streams import Readable, ReadAhead, SelfChecking
from ..fs import remove_tree
from ..fs.narfs import nar_hash_path
from ..queries import references_first
from .canonicalise import canonicalise_paths
from .incoming import mismatch, restore_checked
from .locks import PathLocks, lock_fd
from .optimise import optimise_path
from .reserve import naming

if TYPE_CHECKING:
    from .local import LocalStore

TEMP_DIR_PREFIX = "tmp-sk-"


class StagingArea:
    """A private scratch dir inside the store (``tmp-sk-<pid>-…``, 0700, ``flock``-ed
    while it exists, so a GC leaves it and what is in it alone and no one else reaches
    its trees) shared by all the trees a process is staging in a store: each gets a new
    name in it, and the dir is removed when its last tree is installed or discarded.
    One dir, not one per path: making, locking and removing a dir per path were ~10
    syscalls of the store's thread per path, each waiting for the GIL held by the
    unpacking workers (a third of that thread's time in a ``copy --from``).  A forked
    child makes its own."""

    def __init__(self, store_dir: str) -> None:
        self._store_dir = store_dir
        self._lock = threading.Lock()
        self._dir: str | None = None
        self._fd = -1
        self._pid = -1
        self._live = 0  # trees named and not yet released
        self._names = itertools.count()

    def new_tree(self) -> str:
        """A new name for a tree (any thread); :meth:`release` it once it is gone."""
        with self._lock:
            if self._pid != os.getpid() or self._dir is None:
                self._open()
            self._live += 1
            assert self._dir is not None
            return os.path.join(self._dir, f"x{next(self._names)}")

    def release(self) -> None:
        """A tree of :meth:`new_tree` is gone (moved to its path, or removed)."""
        with self._lock:
            self._live -= 1
            if not self._live and self._pid == os.getpid():
                self.close()

    def _open(self) -> None:
        # (a forked child leaves its parent's dir and fd alone: they are the parent's)
        path = os.path.join(self._store_dir, f"{TEMP_DIR_PREFIX}{os.getpid()}-{os.urandom(8).hex()}")
        os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            lock_fd(fd, exclusive=True)
        except BaseException:
            os.close(fd)
            os.rmdir(path)
            raise
        self._dir, self._fd, self._pid, self._live = path, fd, os.getpid(), 0

    def close(self) -> None:
        """Remove the dir and whatever is left in it (a store being closed)."""
        if self._pid != os.getpid() or self._dir is None:
            return
        try:
            remove_tree(self._dir)
        finally:
            os.close(self._fd)
            self._dir, self._fd, self._pid = None, -1, -1


class StagedNar:
    """One path unpacked and checked in the store's :class:`StagingArea` (module
    docstring).  :meth:`discard` removes it, unless :meth:`installed`."""

    def __init__(self, info: ValidPathInfo, area: StagingArea) -> None:
        self.info = info
        self._area = area
        self.tree: str | None = area.new_tree()

    def installed(self) -> None:
        """The tree was renamed to its path: no longer in the area."""
        if self.tree is not None:
            self.tree = None
            self._area.release()

    def discard(self) -> None:
        tree, self.tree = self.tree, None
        if tree is not None:
            try:
                remove_tree(tree)
            finally:
                self._area.release()


def stage_nar(store: LocalStore, info: ValidPathInfo, stream: Readable) -> StagedNar:
    """Unpack ``stream`` (the NAR of ``info``) and check it; any thread (no DB)."""
    staged = StagedNar(info, store.staging_area)
    try:
        assert staged.tree is not None
        staged.info = restore_verified(store, info, stream, staged.tree)
        # here, in the worker: the store's thread registering batches was mostly
        # waiting for the GIL around these few thousand chmod/utime/listxattr calls
        canonicalise_paths([staged.tree])
        return staged
    except BaseException:
        staged.discard()
        raise


def restore_verified(store: LocalStore, info: ValidPathInfo, stream: Readable,
                     tree: str) -> ValidPathInfo:
    """Unpack the NAR of ``info`` from ``stream`` at ``tree`` (a new name in a scratch
    dir) and check it against ``info`` (NarHash, NarSize, content address): BadArchive
    in Nix's words otherwise.  Returns ``info`` with the NAR's size and its sha256
    hash (what the database records)."""
    # a stream that checks this NarHash and NarSize itself (a binary cache's): a
    # second sha256 of every byte was a fifth of a copy's CPU time; it holds only this
    # NAR, so it may be read ahead
    checker = (stream if isinstance(stream, SelfChecking)
               and stream.checks == (info.nar_hash, info.nar_size) else None)
    reader = ReadAhead(stream) if checker is not None else narfmt.HashingReader(stream, info.nar_hash.algo)
    with naming(store.real_store_dir):
        restore_checked(reader, tree)
    if checker is not None:
        checker.finish()  # (raises unless it was the NAR of ``info``)
    got = info.nar_hash if isinstance(reader, ReadAhead) else reader.hash()
    where = f"importing path '{store.print_path(info.path)}'"
    if got != info.nar_hash:
        raise BadArchive(mismatch("hash", where, info.nar_hash.typed("nix32"), got.typed("nix32")))
    if info.nar_size and reader.size != info.nar_size:
        raise BadArchive(mismatch("size", where, info.nar_size, reader.size))
    if info.ca:
        store._check_ca(info, tree, where, got)
    if info.nar_hash.algo != "sha256":
        info = info.with_(nar_hash=nar_hash_path(tree)[0])
    return info.with_(nar_size=reader.size)


class PendingBatch:
    """Batches at their paths' names, pinned and locked, not yet registered.  :meth:`sync`
    (any thread: a fetch runs it beside the next batches' renames) makes their files
    durable, then :meth:`commit` (the store's thread) registers them in one transaction;
    until then, or on :meth:`abort`, their files are removed if anything fails (never
    unregistered files at a path's name once the locks are released)."""

    def __init__(self, store: LocalStore, infos: list[ValidPathInfo], reals: list[str],
                 locks: list[PathLocks]) -> None:
        self._store = store
        self.infos = infos
        self._reals = reals
        self._locks = locks
        self._synced = False

    def joined(self, later: PendingBatch) -> PendingBatch:
        """This batch and ``later`` (registered after it) as one: one sync, one commit."""
        return PendingBatch(self._store, self.infos + later.infos, self._reals + later._reals,
                            self._locks + later._locks)

    def sync(self) -> None:
        if self._reals and self._store.settings.fsync_store_paths:
            with naming(self._store.real_store_dir):
                self._store.syncer.sync_new(self._reals)
        self._synced = True

    def commit(self) -> None:
        assert self._synced, "commit before sync"
        try:
            if self.infos:
                self._store.register_valid_paths(self.infos, references_pinned=True, synced=True)
        except BaseException:
            self.abort()
            raise
        self._release(delete=True)

    def abort(self) -> None:
        try:
            for real in self._reals:
                remove_tree(real)
        finally:
            self._release(delete=False)

    def _release(self, delete: bool) -> None:
        locks, self._locks = self._locks, []
        for lock in locks:
            lock.delete_on_release = delete
            lock.release()


def begin_staged(store: LocalStore, items: Iterable[StagedNar],
                 pending: Collection[StorePath] = ()) -> PendingBatch:
    """Pin, check, lock and rename a batch (references before referrers, or in it, or in
    ``pending``: the batch committed before this one, whose registration checks those);
    the store's thread only.  Paths found valid already are skipped (their staged copy
    dropped).  Every item is discarded when this returns, moved to its name or not.

    Pins, validity checks and the references' checks are one append and one query
    for the whole batch, not one each per path: each syscall of this thread waits for
    the GIL held by the unpacking workers, and this thread set the pace of a copy."""
    items = list(items)
    try:
        store._check_writable()
        valid = store.pin_valid_all(s.info.path for s in items)  # pin, then check
        batch = {s.info.path: s for s in items if s.info.path not in valid}
        order = references_first(sorted(batch), lambda p: batch[p].info.references & batch.keys(),
                                 store.print_path)
        locks = PathLocks()
        reals: list[str] = []
        try:
            locks.lock([store.real_path(p) for p in batch])
            now_valid = store.db.valid_among([store.print_path(p) for p in batch])
            todo = [batch[p] for p in order if store.print_path(p) not in now_valid]
            outside = {r for s in todo for r in s.info.references} - batch.keys() - set(pending)
            missing = outside - store.pin_valid_all(outside)
            for s in todo:
                if s.info.references & missing:
                    ref = min(s.info.references & missing)
                    raise InvalidPath(f"cannot add '{store.print_path(s.info.path)}': its reference "
                                      f"'{store.print_path(ref)}' is not valid")
            with naming(store.real_store_dir):
                for s in todo:
                    real = store.real_path(s.info.path)
                    assert s.tree is not None
                    try:
                        os.rename(s.tree, real)
                    except OSError as e:  # something (invalid) at its name: replaced
                        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR,
                                           errno.EISDIR):
                            raise
                        remove_tree(real)
                        os.rename(s.tree, real)
                    reals.append(real)
                    s.installed()
            if store.settings.auto_optimise_store:
                for s in todo:
                    optimise_path(store, s.info.path, set())
            return PendingBatch(store, [s.info for s in todo], reals, [locks])
        except BaseException:
            PendingBatch(store, [], reals, [locks]).abort()
            raise
    finally:
        for s in items:
            s.discard()
