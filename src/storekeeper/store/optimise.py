"""Store optimisation: identical files in valid paths become hard links to one pool inode.

The pool is ``<store>/.links/<nix32 sha256 of the single file's NAR>``, the
same pool real Nix keeps, so a store optimised by Nix and by us shares one
``.links`` (regular files and, as Nix on Linux does, symlinks).

Invariants:

* **A name is only ever replaced by an inode with the same NAR.**  A file is
  hashed through an fd opened ``O_NOFOLLOW`` relative to its (``O_NOFOLLOW``)
  parent dir; before it is replaced, its identity (inode, size, mtime) is
  checked again.  Before the first link of a pool entry in a run (whoever
  made it), the file and the entry are compared byte for byte.  On any
  mismatch nothing is linked: the entry is re-hashed and removed (with a
  warning) if its contents do not match its name, else the file is reported
  as changed (#14599).
* **Replacement is atomic.**  ``link(.links/H, <store>/.tmp-link-<pid>-<rand>)``
  then ``rename`` over the file: every reader sees the old or the new inode,
  never a missing file.  A temp link is always removed or renamed before the
  file's turn ends (``rename`` onto a name that already is that inode is a
  no-op that leaves the temp behind: we unlink it).  One left by a crash is
  junk that the GC removes.
* **Metadata stays canonical.**  A parent dir is made writable only when a
  ``rename`` is refused, and is put back to mode 0555 and mtime 1 after its
  files are done; file modes and mtimes are untouched (the pool inode carries
  the same canonical metadata, and the executable bit is part of the hash).
* **Pin, then check**: every path is pinned (temp root) and found valid before
  it is touched.  Paths added with ``auto-optimise-store`` are optimised under
  their ``.lock``, before registration (their caller holds them).
* **The pool is a cache.**  ``.links`` missing or partly deleted is rebuilt;
  entries vanishing under us (a GC, a Nix 2.8 optimiser) mean retry; EMLINK
  (too many links to one inode) and ENOSPC on ``.links`` leave the file as it
  is and are counted.
* **Statistics are true.**  ``bytes_freed`` counts ``st_blocks`` of inodes
  whose last link went (an ``O_PATH`` fd kept on the old inode reads
  ``st_nlink == 0`` after the rename), not the sizes of the files relinked;
  what ``.links`` itself grew by is reported beside it (``pool_dir_growth``).

Lock protocol between optimisers and the GC's removal of unused pool entries
(``<state>/optimise.lock`` and ``<state>/optimise.gate``, ``flock``):

* An optimiser holds ``optimise.lock`` **shared** from the moment it looks up
  an existing pool entry until the ``rename`` that gives that entry another
  link, one directory's files at a time (never while hashing, pinning or
  waiting for anything else).  It takes it by locking ``optimise.gate``
  exclusively, then ``optimise.lock`` shared, then releasing the gate.
* The GC (:func:`remove_unused_links`) scans ``.links`` unlocked, then takes
  ``optimise.gate`` exclusively and ``optimise.lock`` exclusively, re-reads
  the link count of each candidate and unlinks it only if it is still 1.
  Holding the gate keeps new optimisers out while it waits, so a stream of
  overlapping shared holders cannot starve it; shared holders never wait for
  the GC, so the wait is bounded by one directory's worth of links.
* So an entry with link count 1 is removed either before an optimiser looks
  it up (the optimiser finds it missing and makes the file the new entry) or
  after the optimiser's ``rename`` (count is 2 again: kept).  A Nix 2.8 GC or
  optimiser does not take these locks: against them we retry when an entry or
  our temp link vanishes between ``link`` and ``rename`` (as Nix master
  does); the worst outcome of their race is a pool entry lost, never a file.
"""

from __future__ import annotations

import array
import errno
import hashlib
import itertools
import os
import queue
import secrets
import stat
import struct
import threading
from contextlib import contextmanager
from hashlib import sha256
from stat import S_ISLNK, S_ISREG, S_IWUSR
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from ..formats.hashes import NIX32_ALPHABET
from ..formats.nar import CLOSE, NAR_MAGIC, padding, regular_header, symlink_node
from ..formats.storepath import StorePath
from .. import fs
from ..fs import clear_immutable
from .canonicalise import MTIME_STORE
from .errors import ReadOnlyStore, StoreError
from ..fs.atomic import write_file_atomic
from .locks import lock_fd, open_lock_file, unlock_fd

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

LINKS_DIR = ".links"
TMP_LINK_PREFIX = ".tmp-link-"
LOCK_NAME = "optimise.lock"
GATE_NAME = "optimise.gate"

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in after the type check must not hang the open
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
_SMALL = 1 << 20
_CHUNK = 1 << 20
_BIG = 256 << 10  # files from this size on are hashed by the pool's threads
_MAX_PENDING = 32  # ...with at most this many fds handed over at a time
# errors meaning "the name is not the file we listed any more"
_CHANGED = frozenset({errno.ENOENT, errno.EINVAL, errno.ELOOP, errno.ENXIO, errno.ENOTDIR})
# an entry or temp link that keeps vanishing: give up on that file after this
_RETRIES = 8
_MAX_WARNINGS = 1000
_MTIME_NS = MTIME_STORE * 10**9

_NAR_MAGIC = NAR_MAGIC
_REGULAR_PREFIX = hashlib.sha256(NAR_MAGIC + regular_header(False, 0)[:-8])
_EXECUTABLE_PREFIX = hashlib.sha256(NAR_MAGIC + regular_header(True, 0)[:-8])


def _spread_steps() -> tuple[tuple[int, int, int], ...]:
    # Move 5-bit group i of a 260-bit number from bit 5i to bit 8i (one group
    # per byte) in six mask-and-shift steps: group i moves by 3i = sum of
    # 3*2^k over the bits k of i, highest k first so groups never collide.
    pos = [5 * i for i in range(52)]
    steps = []
    for k in (5, 4, 3, 2, 1, 0):
        keep = move = 0
        for i in range(52):
            if (i >> k) & 1:
                move |= 31 << pos[i]
                pos[i] += 3 << k
            else:
                keep |= 31 << pos[i]
        steps.append((keep, move, 3 << k))
    return tuple(steps)


_SPREAD = _spread_steps()
_NIX32_TABLE = bytes.maketrans(bytes(range(32)), NIX32_ALPHABET.encode())


def nix32_sha256(digest: bytes) -> str:
    """nix32 of a 32-byte digest (same result as ``formats.hashes.nix32_encode``,
    a few big-int operations instead of a loop over 52 characters)."""
    x = int.from_bytes(digest, "little")
    for keep, move, shift in _SPREAD:
        x = (x & keep) | ((x & move) << shift)
    # byte i now holds group i; nix32 prints the highest group first
    return x.to_bytes(52, "big").translate(_NIX32_TABLE).decode()


def file_nar_hash(name, dir_fd: int | None = None,
                  st: os.stat_result | None = None) -> tuple[bytes, os.stat_result] | None:
    """SHA-256 of the NAR of one regular file or symlink (not followed), and its
    stat; None if it is another type or changed while being read (``st``: its
    lstat, if the caller has it)."""
    if st is None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        target = os.fsencode(os.readlink(name, dir_fd=dir_fd))
        return hashlib.sha256(NAR_MAGIC + symlink_node(target)).digest(), st
    if not stat.S_ISREG(st.st_mode):
        return None
    fd = os.open(name, _O_READ, dir_fd=dir_fd)
    try:
        fst = os.fstat(fd)
        if fst.st_ino != st.st_ino or fst.st_dev != st.st_dev:
            return None
        digest = _hash_fd(fd, fst)
    finally:
        os.close(fd)
    return (digest, fst) if digest is not None else None


def _hash_fd_and_close(fd: int, st: os.stat_result) -> bytes | None:
    try:
        return _hash_fd(fd, st)
    finally:
        os.close(fd)


def _hash_fd(fd: int, st: os.stat_result) -> bytes | None:
    size = st.st_size
    h = (_EXECUTABLE_PREFIX if st.st_mode & stat.S_IXUSR else _REGULAR_PREFIX).copy()
    h.update(size.to_bytes(8, "little"))
    if size < _SMALL:
        data = os.read(fd, size + 1)  # one byte more: a file that grew is noticed
        if len(data) != size:
            return None
        h.update(data)
    else:
        left = size
        while left:
            chunk = os.read(fd, min(left, _CHUNK))
            if not chunk:
                return None
            left -= len(chunk)
            h.update(chunk)  # hashlib drops the GIL on big buffers: threads overlap
        if os.read(fd, 1):
            return None
    h.update(padding(size) + CLOSE)
    return h.digest()


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


@dataclass
class PoolStats:
    """The pool as its link counts describe it (``storekeeper stats``)."""

    distinct_contents: int = 0   # entries in .links
    total_references: int = 0    # store names sharing those inodes: sum of (nlink - 1)
    unused_entries: int = 0      # nlink 1: only the pool holds them (the next GC removes them)
    bytes_saved: int = 0         # on disk: sum (nlink-1)*blocks - sum blocks - .links dir blocks
    apparent_bytes_saved: int = 0  # the same in st_size (Nix's "currently hard linking saves")

    def to_json(self) -> dict:
        return {"distinctContents": self.distinct_contents, "totalReferences": self.total_references,
                "unusedEntries": self.unused_entries, "bytesSaved": self.bytes_saved,
                "apparentBytesSaved": self.apparent_bytes_saved}


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
    and queue are bounded, so open fds stay far below RLIMIT_NOFILE.
    """

    BATCH = 16

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
        self.dry = dry_run
        self.trust = trust_link_count
        self._log = log
        self.mutex = threading.Lock()
        self.warnings: list[str] = []
        self.tmp_prefix = f"{TMP_LINK_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
        self.counter = itertools.count()
        # dry run: entries that would be created (hash name -> inode) and, per
        # inode, [names that would be replaced, nlink, blocks, size]
        self.vpool: dict[str, int] = {}
        self.replaced: dict[int, list[int]] = {}
        self.vremoved: set[str] = set()  # corrupt entries a real run would have removed
        self.store_fd = os.open(self.real, _O_DIR)
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
        for fd in self._old_fds:
            os.close(fd)
        self._old_fds = []
        self._links_fd = None


_RETRY = object()  # an outcome meaning "look the pool entry up again"
_EXISTS = object()  # the pool already has an entry for this hash


class _Worker:
    """One thread's share of a run: its own stats, lock fds and fds to close.

    Per file the outcome is the pool inode the name ends up on, or None if it
    stays as it is (EMLINK, ENOSPC, a mismatch, a change under us).
    """

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.stats = OptimiseStats(dry_run=run.dry)
        self.lock: PoolLock | None = None
        self._to_close: list[int] = []
        # the path being walked: pool inodes of its files, and whether every
        # file ended up on one (then the path is recorded as done)
        self._inodes: list[int] = []
        self._clean = True

    def _close_later(self, fd: int) -> None:
        reaper = self.run.reaper
        if reaper is None:
            os.close(fd)
            return
        self._to_close.append(fd)
        if len(self._to_close) >= reaper.BATCH:
            reaper.hand_over(self._to_close)
            self._to_close = []

    def close(self) -> None:
        fds, self._to_close = self._to_close, []
        for fd in fds:
            os.close(fd)
        if self.lock is not None:
            self.lock.release()
            self.lock.close()
            self.lock = None

    def _hold(self) -> None:
        if self.lock is None:
            self.lock = PoolLock(self.run.store.state_dir)
        if not self.lock.held:
            self.lock.acquire_shared()

    def _kept(self) -> None:
        self._clean = False

    # --- walking ---

    def path(self, base: str) -> tuple[int, int, list[int]] | None:
        """Optimise one store path; if every file is now on a pool inode, return
        (top inode, top ctime, those inodes) for the done-record."""
        run = self.run
        self._inodes = []
        self._clean = True
        try:
            st = os.stat(base, dir_fd=run.store_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None  # valid but missing: verify's business, not ours
        shown = os.path.join(run.real, base)
        if not stat.S_ISDIR(st.st_mode):
            if st.st_ino in run.inodes and st.st_nlink > 1:
                self.stats.files_already_linked += 1
                self._inodes.append(st.st_ino)
            elif S_ISREG(st.st_mode) or S_ISLNK(st.st_mode):
                self._batch(run.store_fd, run.real, [(base, st.st_ino, st if S_ISLNK(st.st_mode) else None)],
                            is_store_dir=True)
        else:
            self._tree(base, shown)
        if not self._clean or run.dry:
            return None
        try:
            top = os.stat(base, dir_fd=run.store_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return top.st_ino, top.st_ctime_ns if stat.S_ISDIR(top.st_mode) else _NO_CTIME, self._inodes

    def _tree(self, base: str, shown: str) -> None:
        # one batch per directory: the walker yields a directory's files together
        d: fs.Node | None = None
        todo: list[tuple[str, int, os.stat_result | None]] = []
        for ev, node in fs.walk(base, self.run.store_fd):
            if ev == fs.ENTRY:
                if d is not None and node.parent_fd == d.fd:
                    self._entry(node, todo)
                else:
                    self._kept()  # a subdirectory swapped for something else mid-walk
                continue
            if d is not None and todo:
                self._batch(d.fd, d.show(shown), todo, is_store_dir=False)  # type: ignore[arg-type]
                todo = []
            d = node if ev == fs.ENTER else None

    def _entry(self, node: fs.Node, todo: list[tuple[str, int, os.stat_result | None]]) -> None:
        e = node.entry
        if e is None:  # swapped for a file or a link after listing
            self._kept()
            return
        ino = e.inode()
        if ino in self.run.inodes:
            # d_ino is a pool inode: linked already (Nix skips these unread too)
            self.stats.files_already_linked += 1
            self._inodes.append(ino)
        elif node.kind == fs.REG:
            todo.append((e.name, ino, None))
        elif node.kind == fs.LNK:
            try:
                todo.append((e.name, ino, e.stat(follow_symlinks=False)))
            except FileNotFoundError:
                self._clean = False
        # anything else cannot be in a valid path; Nix ignores it too

    def _writable(self, shown: str) -> None:
        self.stats.writable_skipped += 1
        self._clean = False
        self.run.warn(f"skipping suspicious writable file '{shown}'")

    def _trusted(self) -> None:
        self.stats.files_already_linked += 1
        self._clean = False  # not known to be in the pool

    def _changed(self, shown: str) -> None:
        self.stats.changed_files += 1
        self._clean = False
        self.run.warn(f"file '{shown}' changed or vanished while being hashed; not linked")

    def _batch(self, dfd: int, shown: str, todo: list[tuple[str, int, os.stat_result | None]],
               is_store_dir: bool) -> None:
        """Hash a directory's candidates (unlocked), then link them (locked as needed)."""
        run, stats = self.run, self.stats
        hasher, trust = run.hasher, run.trust
        hashed: list = []  # [name, stat, digest or a future of it]
        pending = 0
        for name, ino, lst in todo:
            try:
                if lst is not None:  # a symlink: its NAR is its target
                    if trust and lst.st_nlink > 1:
                        self._trusted()
                        continue
                    target = os.fsencode(os.readlink(name, dir_fd=dfd))
                    hashed.append([name, lst, sha256(_NAR_MAGIC + symlink_node(target)).digest()])
                    continue
                fd = os.open(name, _O_READ, dir_fd=dfd)
            except OSError as e:
                if e.errno not in _CHANGED:
                    raise
                self._changed(f"{shown}/{name}")
                continue
            handed = False
            try:
                st = os.fstat(fd)
                if st.st_ino != ino or not S_ISREG(st.st_mode):
                    self._changed(f"{shown}/{name}")
                elif st.st_mode & S_IWUSR:
                    self._writable(f"{shown}/{name}")
                elif trust and st.st_nlink > 1:
                    self._trusted()
                elif hasher is not None and st.st_size >= _BIG:
                    # big files are hashed by the pool's threads (reads and hashlib
                    # drop the GIL), in parallel with each other and with this loop
                    hashed.append([name, st, hasher.submit(_hash_fd_and_close, fd, st)])
                    handed = True
                    pending += 1
                    if pending >= _MAX_PENDING:  # bound the fds handed over
                        self._resolve(hashed)
                        pending = 0
                else:
                    hashed.append([name, st, _hash_fd(fd, st)])
            finally:
                if not handed:
                    os.close(fd)
        if pending:
            self._resolve(hashed)
        dir_state = _DirState(dfd, is_store_dir)
        link = self._dry_link if run.dry else self._link
        found = self._inodes
        try:
            for name, st, digest in hashed:
                if digest is None:
                    self._changed(f"{shown}/{name}")
                    continue
                stats.files_hashed += 1
                stats.bytes_hashed += st.st_size
                ino = link(dfd, shown, name, st, nix32_sha256(digest), dir_state)
                if ino is None:
                    self._clean = False
                else:
                    found.append(ino)
        finally:
            if self.lock is not None:
                self.lock.release()
            if not run.dry:
                dir_state.restore()

    @staticmethod
    def _resolve(hashed: list) -> None:
        for item in hashed:
            if not isinstance(item[2], (bytes, type(None))):
                item[2] = item[2].result()

    # --- linking one file ---

    def _link(self, dfd: int, shown: str, name: str, st: os.stat_result, h: str,
              dir_state: "_DirState") -> int | None:
        run, stats = self.run, self.stats
        for _ in range(_RETRIES):
            lfd = run.links_fd()
            # Try to make the file the entry first: no lookup (and no lock) needed
            # for the common case of a content seen for the first time.
            out = self._new_entry(dfd, name, st, h, lfd)
            if out is not _EXISTS:
                if out is _RETRY:
                    continue
                return out  # type: ignore[return-value]
            if not (self.lock and self.lock.held):
                # From this lookup until the rename the entry must not be GC'd
                # (module docstring).
                self._hold()
            try:
                pst = os.stat(h, dir_fd=lfd, follow_symlinks=False)
            except FileNotFoundError:
                run.pool_disturbed = True
                continue  # removed meanwhile: make the file the entry
            if pst.st_ino == st.st_ino:
                run.inodes.add(st.st_ino)
                stats.files_already_linked += 1
                return st.st_ino
            if pst.st_ino not in run.verified:
                if not self._same_contents(dfd, shown, name, st, h, lfd, pst):
                    return None
                run.verified.add(pst.st_ino)
            out = self._replace(dfd, shown, name, st, h, lfd, pst, dir_state)
            if out is not _RETRY:
                return out  # type: ignore[return-value]
        run.warn(f"gave up linking '{shown}/{name}': its pool entry kept changing")
        return None

    def _new_entry(self, dfd: int, name: str, st: os.stat_result, h: str, lfd: int):
        """Make the file itself the pool entry (``_EXISTS`` if there is one)."""
        run, stats = self.run, self.stats
        try:
            os.link(name, h, src_dir_fd=dfd, dst_dir_fd=lfd, follow_symlinks=False)
        except FileExistsError:
            return _EXISTS
        except FileNotFoundError:
            if os.fstat(lfd).st_nlink == 0:
                run.reopen_links(lfd)  # .links was deleted under us: rebuild it
                return _RETRY
            return None  # the file itself is gone
        except OSError as e:
            if e.errno == errno.ENOSPC:
                stats.enospc += 1  # ext4's dir index is full: this content stays unshared
                return None
            if e.errno == errno.EMLINK:
                stats.emlink += 1
                return None
            if e.errno == errno.EPERM and (clear_immutable(name, dfd) | clear_immutable(".", lfd)):
                return _RETRY
            raise
        run.inodes.add(st.st_ino)
        run.verified.add(st.st_ino)
        stats.new_pool_entries += 1
        return st.st_ino

    def _same_contents(self, dfd: int, shown: str, name: str, st: os.stat_result, h: str,
                       lfd: int, pst: os.stat_result) -> bool:
        """Byte comparison before the first link to an entry; on a mismatch nothing is linked."""
        run, stats = self.run, self.stats
        if (stat.S_IFMT(pst.st_mode) == stat.S_IFMT(st.st_mode) and pst.st_size == st.st_size
                and (pst.st_mode ^ st.st_mode) & stat.S_IXUSR == 0  # part of the NAR too
                and _equal(name, dfd, st, h, lfd, pst)):
            return True
        # Which side is wrong?  The entry's name is its hash: re-hash it.
        try:
            got = file_nar_hash(h, lfd)
        except FileNotFoundError:
            return False  # gone already; the next file with this content recreates it
        if got is None or nix32_sha256(got[0]) != h:
            stats.corrupt_links_removed += 1
            if run.dry:
                with run.mutex:
                    run.vremoved.add(h)
                run.warn(f"pool entry '{run.links}/{h}' is corrupt (its contents do not match its "
                         "name); a real run removes it")
                return False
            run.warn(f"removing corrupted link '{run.links}/{h}' (its contents do not match its name; "
                     "'nix-store --verify --check-contents' finds any path already linked to it)")
            try:
                if os.stat(h, dir_fd=lfd, follow_symlinks=False).st_ino == pst.st_ino:
                    _unlink_clearing(h, lfd)
            except FileNotFoundError:
                pass
            run.inodes.discard(pst.st_ino)
        else:
            stats.changed_files += 1
            run.warn(f"file '{shown}/{name}' changed since it was hashed; not linked")
        return False

    def _replace(self, dfd: int, shown: str, name: str, st: os.stat_result, h: str, lfd: int,
                 pst: os.stat_result, dir_state: "_DirState"):
        """link the entry to a temp name in the store, rename that over the file."""
        run, stats = self.run, self.stats
        tmp = f"{run.tmp_prefix}{next(run.counter)}"
        sfd = run.store_fd
        try:
            os.link(h, tmp, src_dir_fd=lfd, dst_dir_fd=sfd, follow_symlinks=False)
        except FileNotFoundError:
            run.pool_disturbed = True
            return _RETRY  # the entry vanished (a GC that does not take our lock)
        except OSError as e:
            if e.errno == errno.EMLINK:
                stats.emlink += 1
                return None
            if e.errno == errno.EPERM and clear_immutable(h, lfd):
                return _RETRY
            raise
        renamed = False
        try:
            try:
                tst = os.stat(tmp, dir_fd=sfd, follow_symlinks=False)
            except FileNotFoundError:
                return _RETRY  # swept as junk by a GC
            if tst.st_ino != pst.st_ino:
                run.pool_disturbed = True
                return _RETRY  # the entry was replaced since we compared it
            # An O_PATH fd on the file being replaced: its identity now, and
            # after the rename whether its last link went (st_nlink 0).
            ffd = os.open(name, _O_PATH, dir_fd=dfd)
            freed = False
            try:
                fst = os.fstat(ffd)
                if (fst.st_ino, fst.st_size, fst.st_mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
                    stats.changed_files += 1
                    run.warn(f"file '{shown}/{name}' changed since it was hashed; not linked")
                    return None
                if fst.st_ino == tst.st_ino:
                    stats.files_already_linked += 1
                    return fst.st_ino
                if not dir_state.rename(tmp, sfd, name):
                    return _RETRY  # the temp link was swept by a GC
                try:
                    # rename onto a name that already is this inode does nothing
                    os.unlink(tmp, dir_fd=sfd)
                    renamed = True
                    stats.files_already_linked += 1
                    return pst.st_ino
                except FileNotFoundError:
                    renamed = True
                stats.files_linked += 1
                run.inodes.add(pst.st_ino)
                if os.fstat(ffd).st_nlink == 0:
                    freed = True
                    stats.inodes_freed += 1
                    stats.bytes_freed += fst.st_blocks * 512
                    stats.apparent_bytes_freed += fst.st_size
                return pst.st_ino
            finally:
                if freed:
                    self._close_later(ffd)  # the blocks are released at this close
                else:
                    os.close(ffd)
        finally:
            if not renamed:
                try:
                    os.unlink(tmp, dir_fd=sfd)
                except FileNotFoundError:
                    pass

    def _dry_link(self, dfd: int, shown: str, name: str, st: os.stat_result, h: str,
                  dir_state: "_DirState") -> int | None:
        run, stats = self.run, self.stats
        lfd = run.links_fd()
        pst = None
        if lfd >= 0 and h not in run.vremoved:
            try:
                pst = os.stat(h, dir_fd=lfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
        with run.mutex:
            target = pst.st_ino if pst is not None else run.vpool.get(h)
            if target is None:
                run.vpool[h] = st.st_ino
                run.inodes.add(st.st_ino)
                stats.new_pool_entries += 1
                return st.st_ino
        if target == st.st_ino:
            stats.files_already_linked += 1
            return target
        if pst is not None and pst.st_ino not in run.verified:
            if not self._same_contents(dfd, shown, name, st, h, lfd, pst):
                return None
            run.verified.add(pst.st_ino)
        stats.files_linked += 1
        with run.mutex:
            rec = run.replaced.setdefault(st.st_ino, [0, st.st_nlink, st.st_blocks, st.st_size])
            rec[0] += 1
        return target


class _DirState:
    """A directory whose entries are being replaced: made writable only if a rename
    is refused, and put back to canonical mode and mtime afterwards."""

    def __init__(self, dfd: int, is_store_dir: bool) -> None:
        self.dfd = dfd
        self.is_store_dir = is_store_dir  # the store dir's own metadata is not ours to touch
        self.touched = False
        self.chmodded = False

    def rename(self, tmp: str, sfd: int, name: str) -> bool:
        """rename; False if the temp link vanished (swept by a GC)."""
        for attempt in range(3):
            try:
                os.rename(tmp, name, src_dir_fd=sfd, dst_dir_fd=self.dfd)
                self.touched = True
                return True
            except FileNotFoundError:
                return False
            except PermissionError as e:
                if attempt == 2 or self.is_store_dir:
                    raise
                if e.errno == errno.EACCES:
                    # not root (or no CAP_DAC_OVERRIDE): u+w for the rename only
                    os.fchmod(self.dfd, 0o755)
                    self.chmodded = True
                    self.touched = True
                elif not (clear_immutable(name, self.dfd) | clear_immutable(".", self.dfd)
                          | clear_immutable(tmp, sfd)):
                    raise
        return False  # pragma: no cover

    def restore(self) -> None:
        if self.is_store_dir or not self.touched:
            return
        if self.chmodded:
            os.fchmod(self.dfd, 0o555)
        os.utime(self.dfd, ns=(os.fstat(self.dfd).st_atime_ns, _MTIME_NS))


def _equal(name: str, dfd: int, st: os.stat_result, h: str, lfd: int, pst: os.stat_result) -> bool:
    if stat.S_ISLNK(st.st_mode):
        try:
            return os.readlink(name, dir_fd=dfd) == os.readlink(h, dir_fd=lfd)
        except OSError:
            return False
    try:
        a = os.open(name, _O_READ, dir_fd=dfd)
    except OSError:
        return False
    try:
        try:
            b = os.open(h, _O_READ, dir_fd=lfd)
        except OSError:
            return False
        try:
            if os.fstat(a).st_ino != st.st_ino or os.fstat(b).st_ino != pst.st_ino:
                return False
            left = st.st_size
            while left:
                n = min(left, _CHUNK)
                x, y = _read_n(a, n), _read_n(b, n)
                if x != y or len(x) != n:
                    return False
                left -= n
            return not os.read(a, 1) and not os.read(b, 1)
        finally:
            os.close(b)
    finally:
        os.close(a)


def _read_n(fd: int, n: int) -> bytes:
    data = os.read(fd, n)
    while len(data) < n:
        more = os.read(fd, n - len(data))
        if not more:
            break
        data += more
    return data


# --- entry points ---------------------------------------------------------------------

def _threads(n: int | None) -> int:
    if n is not None:
        return max(1, n)
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 4))
    except AttributeError:  # pragma: no cover
        return max(1, min(os.cpu_count() or 1, 4))


# --- done-records: paths known to be fully linked -----------------------------------
#
# ``<state>/optimised-paths`` remembers, per valid path, that every file of it
# was on a pool inode after a run: (ValidPaths id, inode of the path's top
# entry and, for a directory, its ctime; the pool inodes).  The next run skips
# such a path unwalked only if its row id and top entry are unchanged (it was
# not deleted, re-added or repaired) and every recorded inode is still in
# ``.links``: a deleted or partly deleted pool makes the path be walked again
# and the pool rebuilt.  Checking that needs the pool's inodes (a readdir of
# ``.links``), except when ``.links`` itself is unchanged (same inode and
# ctime: no entry added or removed) since the end of the run that wrote the
# file.  Losing the file only costs time.

DONE_NAME = "optimised-paths"
_DONE_MAGIC = b"skopt-3\n"
# magic, record count, .links (dev, inode, ctime) at the end of the writing
# run (zeros: not to be trusted), the records, then all their inodes (u64 each)
_DONE_HEAD = struct.Struct("<8sQQQq")
_DONE_REC = struct.Struct("<32sQQqQQ")  # hash part, row id, top inode, top ctime, first, count
_NO_CTIME = -1  # a single-file path: its ctime moves with every link to its (pool) inode

_Records = dict[bytes, tuple[int, int, int, object]]


def _load_done(state_dir: str) -> tuple[tuple[int, int, int], _Records]:
    try:
        with open(os.path.join(state_dir, DONE_NAME), "rb") as f:
            data = f.read()
    except OSError:
        return (0, 0, 0), {}
    try:
        magic, n, dev, ino, ctime = _DONE_HEAD.unpack_from(data, 0)
        if magic != _DONE_MAGIC:
            return (0, 0, 0), {}
        start = _DONE_HEAD.size + n * _DONE_REC.size
        recs = _DONE_REC.iter_unpack(data[_DONE_HEAD.size:start])
        inodes = memoryview(data)[start:].cast("Q")
        out: _Records = {}
        for hp, rowid, top, top_ctime, first, count in recs:
            if first + count > len(inodes):
                return (0, 0, 0), {}  # truncated: trust none of it
            out[hp] = (rowid, top, top_ctime, inodes[first:first + count])
        return (dev, ino, ctime), out
    except (struct.error, TypeError, ValueError):
        return (0, 0, 0), {}


def _links_id(links: str) -> tuple[int, int, int]:
    try:
        st = os.lstat(links)
    except FileNotFoundError:
        return (0, 0, 0)
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _save_done(store, new: _Records, valid: dict[bytes, int], trust_links: bool) -> None:
    state_dir = store.state_dir
    links = os.path.join(store.real_store_dir, LINKS_DIR)
    lock = PoolLock(state_dir)
    try:
        # the gate serialises writers: two runs at once both keep their records
        lock_fd(lock._gate, exclusive=True)
        merged = {hp: rec for hp, rec in _load_done(state_dir)[1].items() if valid.get(hp) == rec[0]}
        merged.update(new)
        # read after our last change to .links: any later one changes its ctime
        dev, ino, ctime = _links_id(links) if trust_links else (0, 0, 0)
        head = [_DONE_HEAD.pack(_DONE_MAGIC, len(merged), dev, ino, ctime)]
        inodes = array.array("Q")
        for hp, (rowid, top, top_ctime, inos) in merged.items():
            head.append(_DONE_REC.pack(hp, rowid, top, top_ctime, len(inodes), len(inos)))
            inodes.extend(inos)  # type: ignore[arg-type]
        write_file_atomic(os.path.join(state_dir, DONE_NAME), b"".join(head) + inodes.tobytes(), 0o644)
    finally:
        lock.close()


def _record(done: _Records, ids: dict[bytes, int], base: str, rec: tuple) -> None:
    """Add a walked path's done-record ((top inode, top ctime, pool inodes) from the walk)."""
    hp = base[:32].encode()
    done[hp] = (ids[hp], rec[0], rec[1], array.array("Q", rec[2]))


def _save_run(store, done: _Records, ids: dict[bytes, int], total: OptimiseStats,
              disturbed: bool) -> None:
    # a run that removed pool entries itself (or saw them vanish) does not vouch for .links
    _save_done(store, done, ids, trust_links=not (total.corrupt_links_removed or disturbed))


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
        from concurrent.futures import ThreadPoolExecutor  # (not imported for a no-op run)
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
        from concurrent.futures import ThreadPoolExecutor
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
    import multiprocessing
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
                        and (inodes is None or inodes.issuperset(rec[3]))):  # type: ignore[arg-type]
                    total.files_already_linked += len(rec[3])  # type: ignore[arg-type]
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
