"""The ``.links`` pool: its statistics, its lock protocol (package docstring) and the GC's
removal of unused entries."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from ... import fs
from ...api import PoolStats
from ...errors import StoreError
from ...fs import clear_immutable
from ...fs.crash import crash_point
from ..locks import lock_fd, open_lock_file, unlock_fd

if TYPE_CHECKING:
    pass

from .hashing import _O_DIR, GATE_NAME, LINKS_DIR, LOCK_NAME

# --- statistics ---------------------------------------------------------------------

@dataclass
class OptimiseStats:
    """What one run did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    paths: int = 0
    files_linked: int = 0           # names replaced by a link to a pool entry
    bytes_freed: int = 0            # st_blocks * 512 of inodes whose last link went
    apparent_bytes_freed: int = 0   # st_size of those inodes
    inodes_freed: int = 0
    files_already_linked: int = 0   # already the pool inode (or trusted, see trust_link_count)
    files_hashed: int = 0
    bytes_hashed: int = 0
    new_pool_entries: int = 0       # files that became a pool entry themselves
    emlink: int = 0                 # kept: the pool inode has the maximum number of links
    enospc: int = 0                 # kept: .links is full
    corrupt_links_removed: int = 0  # pool entries whose contents did not match their name
    changed_files: int = 0          # files that changed between hashing and linking: kept
    writable_skipped: int = 0
    pool_dir_growth: int = 0        # blocks * 512 that the .links directory itself grew by
    warnings: list[str] = field(default_factory=list)

    def merge(self, other: "OptimiseStats") -> None:
        for k, v in asdict(other).items():
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(self, k, getattr(self, k) + v)

    @property
    def net_bytes_freed(self) -> int:
        return self.bytes_freed - self.pool_dir_growth

    def summary(self) -> str:
        """Nix's line ("X MiB freed by hard-linking N files"), with true bytes."""
        if self.dry_run:
            return (f"{self.bytes_freed / 2**20:.2f} MiB would be freed by hard-linking "
                    f"{self.files_linked} files")
        return f"{self.bytes_freed / 2**20:.2f} MiB freed by hard-linking {self.files_linked} files"

    def to_json(self) -> dict:
        return {"dryRun": self.dry_run, "paths": self.paths, "filesLinked": self.files_linked,
                "bytesFreed": self.bytes_freed, "poolDirGrowth": self.pool_dir_growth,
                "netBytesFreed": self.net_bytes_freed, "apparentBytesFreed": self.apparent_bytes_freed,
                "inodesFreed": self.inodes_freed, "filesAlreadyLinked": self.files_already_linked,
                "filesHashed": self.files_hashed, "bytesHashed": self.bytes_hashed,
                "newPoolEntries": self.new_pool_entries, "emlink": self.emlink,
                "enospc": self.enospc, "corruptLinksRemoved": self.corrupt_links_removed,
                "changedFiles": self.changed_files, "writableSkipped": self.writable_skipped,
                "warnings": self.warnings}


def pool_stats(store) -> PoolStats:
    """Dedup figures from the link counts in ``.links`` (read-only)."""
    links = os.path.join(store.real_store_dir, LINKS_DIR)
    ps = PoolStats()
    try:
        lfd = open_pool(None, links)
    except FileNotFoundError:
        return ps
    unshared = actual = unshared_a = actual_a = 0
    try:
        for e in fs.entries(lfd):
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            ps.distinct_contents += 1
            ps.total_references += st.st_nlink - 1
            ps.unused_entries += st.st_nlink == 1
            disk = st.st_blocks * 512
            unshared += (st.st_nlink - 1) * disk
            actual += disk
            unshared_a += (st.st_nlink - 1) * st.st_size
            actual_a += st.st_size
        overhead = os.fstat(lfd).st_blocks * 512
    finally:
        os.close(lfd)
    ps.bytes_saved = unshared - actual - overhead
    ps.apparent_bytes_saved = unshared_a - actual_a - overhead
    return ps


# --- the lock protocol (module docstring) --------------------------------------------

class PoolLock:
    """One holder's fds on ``optimise.gate`` and ``optimise.lock`` (one per thread:
    ``flock`` locks belong to open file descriptions)."""

    def __init__(self, state_dir: str) -> None:
        self._gate = open_lock_file(os.path.join(state_dir, GATE_NAME))
        try:
            self._lock = open_lock_file(os.path.join(state_dir, LOCK_NAME))
        except BaseException:
            os.close(self._gate)
            raise
        self.held = False

    def acquire_shared(self) -> None:
        lock_fd(self._gate, exclusive=True)
        try:
            lock_fd(self._lock, exclusive=False)
        finally:
            unlock_fd(self._gate)
        self.held = True

    def release(self) -> None:
        if self.held:
            unlock_fd(self._lock)
            self.held = False

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        lock_fd(self._gate, exclusive=True)
        try:
            lock_fd(self._lock, exclusive=True)
            try:
                yield
            finally:
                unlock_fd(self._lock)
        finally:
            unlock_fd(self._gate)

    def close(self) -> None:
        os.close(self._lock)
        os.close(self._gate)


def open_pool(store_fd: int | None, name: str = LINKS_DIR) -> int:
    """Open the ``.links`` pool; it must be ours.  Build users may create entries in
    the store dir: a ``.links`` one of them made first would let them swap pool
    files (and so the contents of every path linked to them) at will."""
    fd = os.open(name, _O_DIR, dir_fd=store_fd)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        shown = name if store_fd is None else LINKS_DIR
        raise StoreError(f"refusing to use the pool '{shown}': it is owned by uid {st.st_uid} "
                         f"(mode {st.st_mode & 0o7777:o}), not by the store's owner; remove it")
    return fd


def remove_unused_links(store, log: Callable[[str], None] | None = None) -> tuple[int, int]:
    """The GC's last step: unlink pool entries with link count 1, under the lock protocol.

    Returns (bytes freed, as Nix counts them: ``st_size`` of the entries
    removed; what hard linking still saves, Nix's formula).
    """
    links = os.path.join(store.real_store_dir, LINKS_DIR)
    try:
        lfd = open_pool(None, links)
    except FileNotFoundError:
        return 0, 0
    try:
        candidates: list[str] = []
        unshared = actual = 0
        for e in fs.entries(lfd):
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_nlink == 1:
                candidates.append(e.name)
            else:
                actual += st.st_size
                unshared += (st.st_nlink - 1) * st.st_size
        freed = 0
        if candidates:
            lock = PoolLock(store.state_dir)
            try:
                with lock.exclusive():
                    for name in candidates:
                        try:
                            st = os.stat(name, dir_fd=lfd, follow_symlinks=False)
                            if st.st_nlink != 1:
                                actual += st.st_size
                                unshared += (st.st_nlink - 1) * st.st_size
                                continue
                            _unlink_clearing(name, lfd)
                        except FileNotFoundError:
                            continue
                        crash_point("gc.pool")
                        freed += st.st_size
            finally:
                lock.close()
        overhead = os.fstat(lfd).st_blocks * 512
        return freed, unshared - actual - overhead
    finally:
        os.close(lfd)


def _unlink_clearing(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except PermissionError:
        # an old store's immutable bit (on the entry or on .links itself)
        if not (clear_immutable(name, dir_fd) | clear_immutable(".", dir_fd)):
            raise
        os.unlink(name, dir_fd=dir_fd)
