"""The optimiser proper: the per-path walker that links files to the pool (one run's
shared state is :mod:`.run`'s; the invariants are the package docstring's)."""

from __future__ import annotations

import errno
import os
import stat
from hashlib import sha256
from stat import S_ISLNK, S_ISREG, S_IWUSR
from time import monotonic

from ... import fs
from ...formats.nar import symlink_node
from ...fs import clear_immutable
from ...fs.crash import crash_point
from .hashing import (
    _BIG,
    _CHANGED,
    _MAX_PENDING,
    _NAR_MAGIC,
    _O_PATH,
    _O_READ,
    _RETRIES,
    _hash_fd,
    _hash_fd_and_close,
    file_nar_hash,
    nix32_sha256,
)
from .pool import OptimiseStats, PoolLock, _unlink_clearing
from .records import _NO_CTIME
from .replace import _DirState, _equal
from .run import _Run

_RETRY = object()  # an outcome meaning "look the pool entry up again"
# the pool lock is kept over the next directories' links up to this long (package docstring)
_HOLD_SECONDS = 0.05
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
        self._held_since = 0.0

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
            self._held_since = monotonic()

    def _let_go(self, unless_recent: bool) -> None:
        """Release the pool lock (with ``unless_recent``: only once held for
        ``_HOLD_SECONDS``: taking it per directory cost four ``flock`` calls each)."""
        lock = self.lock
        if lock is not None and lock.held and not (
                unless_recent and monotonic() - self._held_since < _HOLD_SECONDS):
            lock.release()

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
        # one batch per directory: fs.dirs yields a directory's files together
        run, stats, found = self.run, self.stats, self._inodes
        pool = run.inodes
        for dfd, rel, files in fs.dirs(base, run.store_fd):
            todo: list[tuple[str, int, os.stat_result | None]] = []
            for name, ino, kind in files:
                if ino in pool:
                    # d_ino is a pool inode: linked already (Nix skips these unread too)
                    stats.files_already_linked += 1
                    found.append(ino)
                elif kind == fs.REG:
                    todo.append((name, ino, None))
                elif kind == fs.LNK:
                    try:
                        todo.append((name, ino, os.stat(name, dir_fd=dfd, follow_symlinks=False)))
                    except FileNotFoundError:
                        self._clean = False
                elif kind == fs.SWAPPED:
                    self._kept()  # a subdirectory swapped for something else mid-walk
                # anything else cannot be in a valid path; Nix ignores it too
            if todo:
                self._batch(dfd, f"{shown}/{rel}" if rel else shown, todo, is_store_dir=False)

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
        """Hash a directory's candidates, then link them (the pool lock taken as needed
        and kept for up to ``_HOLD_SECONDS``, never over a big file's read)."""
        run, stats = self.run, self.stats
        hasher, trust = run.hasher, run.trust
        read_flags = _O_READ | fs.O_NOATIME
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
                try:
                    fd = os.open(name, read_flags, dir_fd=dfd)
                except PermissionError:  # EPERM for O_NOATIME: a file that is not ours
                    fd = fs.open_noatime(name, _O_READ, dfd)
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
                elif st.st_size >= _BIG:
                    self._let_go(unless_recent=False)  # the pool lock is not held over long reads
                    if hasher is not None:
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
                else:
                    hashed.append([name, st, _hash_fd(fd, st)])
            finally:
                if not handed:
                    os.close(fd)
        if pending:
            self._resolve(hashed)
        dir_state = _DirState(dfd, shown, is_store_dir, run.journal)
        link = self._dry_link if run.dry else self._link
        found = self._inodes
        try:
            for name, st, digest in hashed:
                if digest is None:
                    self._changed(f"{shown}/{name}")
                    continue
                stats.files_hashed += 1
                stats.bytes_hashed += st.st_size
                linked = link(dfd, shown, name, st, nix32_sha256(digest), dir_state)
                if linked is None:
                    self._clean = False
                else:
                    found.append(linked)
        finally:
            self._let_go(unless_recent=True)
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
        seen = run.seen
        for _ in range(_RETRIES):
            lfd = run.links_fd()
            known = seen.get(h)
            if known is not None and known in run.verified:
                # made or linked to by this process: no lookup needed (the temp
                # link's inode is checked in _replace; a vanished or replaced
                # entry means the slow path again)
                if known == st.st_ino:
                    stats.files_already_linked += 1
                    return known
                if not (self.lock and self.lock.held):
                    self._hold()
                out = self._replace(dfd, shown, name, st, h, lfd, known, dir_state)
                if out is not _RETRY:
                    return out
                seen.pop(h, None)
                continue
            # Try to make the file the entry first: no lookup (and no lock) needed
            # for the common case of a content seen for the first time.
            out = self._new_entry(dfd, name, st, h, lfd)
            if out is not _EXISTS:
                if out is _RETRY:
                    continue
                if out is not None:
                    seen[h] = out
                return out
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
            out = self._replace(dfd, shown, name, st, h, lfd, pst.st_ino, dir_state)
            if out is not _RETRY:
                if out == pst.st_ino:
                    seen[h] = out
                return out
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
        crash_point("optimise.pooled")
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
                 pino: int, dir_state: "_DirState"):
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
            if tst.st_ino != pino:
                run.pool_disturbed = True
                return _RETRY  # the entry was replaced since we compared it
            crash_point("optimise.linked")
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
                    return pino
                except FileNotFoundError:
                    renamed = True
                stats.files_linked += 1
                crash_point("optimise.renamed")
                run.inodes.add(pino)
                if os.fstat(ffd).st_nlink == 0:
                    freed = True
                    stats.inodes_freed += 1
                    stats.bytes_freed += fst.st_blocks * 512
                    stats.apparent_bytes_freed += fst.st_size
                return pino
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
