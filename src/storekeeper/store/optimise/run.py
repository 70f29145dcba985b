"""One optimiser run's shared state: the pool inodes, the hasher threads, the fd reaper."""


from __future__ import annotations

import itertools
import os
import queue
import threading
from typing import TYPE_CHECKING, Callable

from ... import fs
from ...errors import ReadOnlyStore

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

from .hashing import (
    _MAX_WARNINGS,
    _O_DIR,
    LINKS_DIR,
    TMP_LINK_PREFIX,
)
from .journal import Journal
from .pool import open_pool

# --- the optimiser --------------------------------------------------------------------


def _check_writable(store) -> None:
    store._check_writable()  # read-only=true, or a read-only mount
    if os.statvfs(store.real_store_dir).f_flag & os.ST_RDONLY:  # (a store not doing the check)
        raise ReadOnlyStore(f"store '{store.real_store_dir}' is read-only (it is on a read-only mount)")


def _preload(links: str) -> set[int]:
    """Inode numbers of the pool (d_ino from readdir: no stat per entry)."""
    try:
        fd = open_pool(None, links)
    except FileNotFoundError:
        return set()
    try:
        return {e.inode() for e in fs.entries(fd)}
    finally:
        os.close(fd)


class _Reaper:
    """Closes the last fds on released inodes in background threads.

    Freeing an inode's blocks happens at its last close and can wait on the
    device (ext4 mounted with ``discard`` discards synchronously): that is
    most of a first run's wall time.  Workers hand over fds in batches and
    several closers overlap those waits while the workers go on.  Batches
    and queue are bounded, so open fds stay far below RLIMIT_NOFILE (at most
    (depth + nthreads + 1) * BATCH = 576).  A batch is 64 fds, not a handful:
    each hand-over wakes a closer thread that then competes with the worker
    for the GIL, and that switch cost more than the closes (profiled: 16 per
    batch spent a sixth of the worker's time in the queue's notify).
    """

    BATCH = 64

    def __init__(self, nthreads: int = 4, depth: int = 4) -> None:
        self._q: queue.Queue[list[int] | None] = queue.Queue(depth)
        self._threads = [threading.Thread(target=self._loop, name=f"optimise-close-{i}", daemon=True)
                         for i in range(nthreads)]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while True:
            fds = self._q.get()
            if fds is None:
                return
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def hand_over(self, fds: list[int]) -> None:
        self._q.put(fds)

    def join(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()


class _Run:
    """State shared by the worker threads of one run."""

    def __init__(self, store, inodes: set[int], dry_run: bool, trust_link_count: bool,
                 log: Callable[[str], None] | None) -> None:
        self.store = store
        self.real = store.real_store_dir
        self.links = os.path.join(self.real, LINKS_DIR)
        self.inodes = inodes        # pool inodes (set.add / `in` are atomic under the GIL)
        self.verified: set[int] = set()  # pool inodes byte-compared with a file this run
        # hash name -> the pool inode this process made or linked a file to this run:
        # a content seen again goes straight to the replacing link (no failed
        # link() and no stat of the entry; the temp link's inode is checked)
        self.seen: dict[str, int] = {}
        self.dry = dry_run
        self.trust = trust_link_count
        self._log = log
        self.mutex = threading.Lock()
        self.warnings: list[str] = []
        self.tmp_prefix = f"{TMP_LINK_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-"
        self.counter = itertools.count()
        # dry run: entries that would be created (hash name -> inode) and, per
        # inode, [names that would be replaced, nlink, blocks, size]
        self.vpool: dict[str, int] = {}
        self.replaced: dict[int, list[int]] = {}
        self.vremoved: set[str] = set()  # corrupt entries a real run would have removed
        self.store_fd = os.open(self.real, _O_DIR)
        self.journal = Journal(store.state_dir)
        self._links_fd: int | None = None
        # fds on .links dirs replaced during the run: closed only at the end,
        # since another thread may still be using one (a reused fd number
        # would point a link() at the wrong directory)
        self._old_fds: list[int] = []
        self.reaper: _Reaper | None = None
        self.hasher: ThreadPoolExecutor | None = None
        # entries vanished or were replaced under us during the run: the run
        # does not vouch for .links in its done-records (see there)
        self.pool_disturbed = False

    def links_fd(self) -> int:
        """An fd on ``.links`` (-1 in a dry run of a store without one)."""
        fd = self._links_fd
        if fd is not None:
            return fd
        with self.mutex:
            if self._links_fd is None:
                self._open_links()
            return self._links_fd  # type: ignore[return-value]

    def reopen_links(self, stale: int) -> None:
        """``.links`` was deleted under us: make a new one (unless another thread did)."""
        with self.mutex:
            if self._links_fd == stale:
                self._open_links()

    def _open_links(self) -> None:
        if self._links_fd is not None:
            self.pool_disturbed = True
        if not self.dry:
            try:
                os.mkdir(LINKS_DIR, 0o755, dir_fd=self.store_fd)
            except FileExistsError:
                pass
        try:
            fd = open_pool(self.store_fd)
        except FileNotFoundError:
            if not self.dry:
                raise
            fd = -1  # dry run without a pool: every lookup misses
        if fd >= 0:
            self._old_fds.append(fd)
        self._links_fd = fd

    def warn(self, msg: str) -> None:
        with self.mutex:
            if len(self.warnings) < _MAX_WARNINGS:
                self.warnings.append(msg)
            if self._log:
                self._log(f"warning: {msg}")

    def close(self) -> None:
        if self.hasher is not None:
            self.hasher.shutdown()
            self.hasher = None
        if self.reaper is not None:
            self.reaper.join()
            self.reaper = None
        os.close(self.store_fd)
        self.journal.close()
        for fd in self._old_fds:
            os.close(fd)
        self._old_fds = []
        self._links_fd = None
