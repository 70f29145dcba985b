"""LocalStore: a Nix store on this machine's file system (custom store dir or chroot root).

Invariants this class keeps (on top of those of :class:`StoreDB`,
:class:`TempRoots`, :class:`PathLocks` and :mod:`canonicalise`):

* **Pin, then check.**  Whenever an operation finds a path valid and then
  relies on it (skipping an add because the path exists, registering a path
  whose references must stay valid, dumping, verifying), it takes a temp root
  for the path *before* the validity check: :meth:`pin_valid` is the one way
  to ask.  A GC that starts after the pin sees the root in our temproots file;
  one already running is told through its socket before we go on.
* **A valid path is complete and canonical.**  New content is written under a
  temp dir inside the store (``tmp-sk-<pid>-<rand>``, mode 0700, ``flock``-ed
  while in use), canonicalised, then renamed into place under the path's
  ``.lock``, and only then registered; a small dump already checked and hashed
  in memory (a text file, a NAR up to 1 MiB) is written straight at its final
  name under that lock, and removed there if writing it fails.  A crash leaves
  at worst an unregistered path, which the GC removes (and the next add of it
  replaces, under the lock); never a valid path with missing files.
* **Registration is atomic.**  A path's row, its references and its
  ``DerivationOutputs`` go into the DB in one transaction, after every
  reference has been pinned and found valid.
* **Registration is durable.**  Before that transaction the new paths are
  synced (setting ``fsync-store-paths``): their files, directories and
  renames reach the disk before their rows can, so a crash or a forced
  read-only mount never leaves a valid path with missing or stale contents.
  A few files are fsynced each; a bigger batch waits for one ``syncfs`` that
  began after its files were written, which concurrent registrations share
  (:class:`~storekeeper.store.durable.SyncCoordinator`).
* **Nothing outside the store and state dirs is written.**
"""

from __future__ import annotations

import io
import os
import stat
import sys
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Callable, Collection, Iterable, Iterator

from ..api import DELETE_DEAD, GCOptions, VerifyReport
from ..errors import BadArchive, InvalidPath, ReadOnlyStore, StoreError
from ..formats import nar as narfmt
from ..formats.contentaddress import FLAT, RECURSIVE, TEXT, ContentAddress
from ..formats.derivation import check_derivation_outputs, parse_derivation
from ..formats.errors import FormatError
from ..formats.hashes import Hash
from ..formats.pathinfo import ValidPathInfo
from ..formats.storepath import StorePath, check_name
from ..formats.streams import Readable
from ..fs import remove_tree
from ..fs.atomic import write_new_file
from ..fs.crash import crash_point
from ..fs.narfs import copy_tree_hashing, dump_path, dump_path_views, nar_hash_path
from . import policy
from .canonicalise import canonicalise_paths
from .durable import SyncCoordinator
from .gc.collector import GarbageCollector
from .gcnotify import NotifyingTempRoots
from .incoming import (
    IN_MEMORY_MAX,
    Prefixed,
    copy_stream_hashing,
    hash_file,
    mismatch,
    read_up_to,
    restore_checked,
)
from .locks import PathLocks, lock_fd
from .optimise import optimise_path
from .reader import StoreReader
from .reserve import naming
from .signing import check_trusted
from .staging import (
    TEMP_DIR_PREFIX,
    PendingBatch,
    StagedNar,
    StagingArea,
    begin_staged,
    restore_verified,
    stage_nar,
)
from .verify import verify_store

if TYPE_CHECKING:
    from ..formats.url import LocalLayout
    from .settings import StoreSettings

class LocalStore(StoreReader):
    """A local Nix store (see module docstring for the invariants it keeps).

    Opening, validity and the metadata queries come from :class:`StoreReader`;
    ``path_info``, ``query_references``, ``query_closure`` and ``topo_sort``
    from :class:`DerivedQueries`.
    """

    temp_roots_class = NotifyingTempRoots  # pins, telling a running GC

    _last_auto_gc_check = float("-inf")  # monotonic time of the last auto-GC check
    #: where Nix's informational lines go (the daemon: to the client), e.g. "running auto-GC …"
    info_log: Callable[[str], None] | None = None
    #: held around an auto-GC that logs: the daemon's makes logging never wait for the client
    output_guard: Callable[[], AbstractContextManager] = nullcontext

    def __init__(self, layout: LocalLayout, create: bool = True,
                 settings: StoreSettings | None = None) -> None:
        super().__init__(layout, create, settings)
        self.db.busy_log = self._busy_warning
        self.syncer = SyncCoordinator(self.real_store_dir, self.state_dir)
        #: where :meth:`stage_nar` unpacks, made on first use
        self.staging_area = StagingArea(self.real_store_dir)

    def close(self) -> None:
        try:
            self.staging_area.close()
            self.syncer.close()
        finally:
            super().close()

    def _busy_warning(self, message: str) -> None:
        """The database's "waiting for another writer" line: to the daemon's client when
        there is one (as Nix's warnings go), else to stderr."""
        if self.info_log is None:
            sys.stderr.write(f"warning: {message}\n")
            sys.stderr.flush()
            return
        with self.output_guard():
            self.info_log(f"warning: {message}")

    # --- checks ----------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStore(f"store '{self.real_store_dir}' is read-only")
        if os.statvfs(self.real_store_dir).f_flag & os.ST_RDONLY:
            raise ReadOnlyStore(f"store '{self.real_store_dir}' is read-only (it is on a read-only mount)")

    def _pin_references(self, refs: Iterable[StorePath], for_path: StorePath) -> None:
        for ref in refs:
            if ref != for_path and not self.pin_valid(ref):
                raise InvalidPath(f"cannot add '{self.print_path(for_path)}': its reference "
                                  f"'{self.print_path(ref)}' is not valid")

    # --- reading content ------------------------------------------------------

    def dump_path(self, sp: StorePath) -> Iterator[bytes]:
        """The NAR of a valid path, streamed."""
        if not self.pin_valid(sp):
            raise InvalidPath(f"path '{self.print_path(sp)}' is not valid")
        return dump_path(self.real_path(sp))

    def dump_path_views(self, sp: StorePath) -> Iterator[memoryview]:
        """:meth:`dump_path` as views of one reused buffer (``fs.narfs.dump_path_views``)."""
        if not self.pin_valid(sp):
            raise InvalidPath(f"path '{self.print_path(sp)}' is not valid")
        return dump_path_views(self.real_path(sp))

    def read_derivation(self, drv: StorePath):  # -> Derivation
        if not self.pin_valid(drv):
            raise InvalidPath(f"path '{self.print_path(drv)}' is not valid")
        return self._read_drv_file(drv)

    # --- adding ---------------------------------------------------------------

    @contextmanager
    def _temp_dir(self, incoming: int = 0) -> Iterator[str]:
        """A private, locked scratch dir inside the store (same file system: rename works),
        made after an auto-GC check for ``incoming`` bytes (0: not known)."""
        self._check_writable()
        self.auto_gc(incoming)
        path = os.path.join(self.real_store_dir, f"{TEMP_DIR_PREFIX}{os.getpid()}-{os.urandom(8).hex()}")
        os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            lock_fd(fd, exclusive=True)
            with naming(self.real_store_dir):  # (the scratch dir is gone by the time it is read)
                yield path
        finally:
            try:
                remove_tree(path)
            finally:
                os.close(fd)

    def _install(self, info: ValidPathInfo, create: Callable[[str], None], repair: bool = False) -> ValidPathInfo:
        """Create (via ``create(real_path)``), canonicalise and register ``info.path``.

        Skips the work when the path is already valid (unless repairing); the
        path is pinned before that check.
        """
        sp = info.path
        if self.pin_valid(sp) and not repair:
            return self.path_info(sp)
        self._check_writable()
        real = self.real_path(sp)
        with PathLocks() as locks:
            locks.lock([real])
            if self.is_valid(sp) and not repair:
                return self.path_info(sp)
            self._pin_references(info.references, sp)
            if os.path.lexists(real):
                remove_tree(real)
            crash_point("add.staged")
            with naming(real):
                create(real)
            crash_point("add.moved")
            try:
                canonicalise_paths([real])
                crash_point("add.canonicalised")
                if self.settings.auto_optimise_store:
                    optimise_path(self, sp, set())  # empty inode set, as Nix does
                crash_point("add.canonical")
                self.register_valid_paths([info], references_pinned=True)
                crash_point("register.committed")
            except BaseException:
                # never leave unregistered files at a path's final name
                remove_tree(real)
                raise
            locks.delete_on_release = True
        return self.path_info(sp)

    def add_path(self, src: str, name: str | None = None, recursive: bool = True,
                 algo: str = "sha256", references: Iterable[StorePath] = (),
                 repair: bool = False) -> ValidPathInfo:
        """``nix-store --add`` / ``--add-fixed``: copy a file tree into the store."""
        name = check_name(name if name is not None else os.path.basename(os.path.normpath(src)))
        st = os.lstat(src)
        if not recursive and not stat.S_ISREG(st.st_mode):
            raise StoreError(f"'{src}' is not a regular file; flat (non-recursive) adds take one file")
        with self._temp_dir(st.st_size if stat.S_ISREG(st.st_mode) else 0) as tmp:
            staged = os.path.join(tmp, "x")
            nar_hash, nar_size = copy_tree_hashing(src, staged)
            if recursive:
                ca_hash = nar_hash if algo == "sha256" else nar_hash_path(staged, algo)[0]
                ca = ContentAddress(RECURSIVE, ca_hash)
            else:
                ca = ContentAddress(FLAT, hash_file(staged, algo))
            refs = frozenset(references)
            sp = ca.store_path(self.store_dir, name, refs)
            info = ValidPathInfo(sp, nar_hash, nar_size, refs, ca=ca.render())
            crash_point("add.hashed")
            return self._install(info, lambda real: os.rename(staged, real), repair)

    def add_text(self, name: str, text: bytes, references: Iterable[StorePath] = (),
                 repair: bool = False) -> ValidPathInfo:
        """``builtins.toFile`` / ``.drv`` writing: a text path with references."""
        refs = frozenset(references)
        content_hash = Hash.of("sha256", text)
        sp = self.store_dir.make_text_path(name, content_hash, refs)
        nar = narfmt.dump_string(text)
        info = ValidPathInfo(sp, Hash.of("sha256", nar), len(nar), refs,
                             ca=ContentAddress(TEXT, content_hash).render())
        if not self.read_only:
            self.auto_gc(len(text))
        if sp.is_derivation:
            self._remember_drv(sp, text)  # (registration checks it: no reading it back)
        # synced with the rest of the batch at registration (fsync-store-paths), not
        # one fsync per .drv: that was 2/3 of nix-instantiate's time (bench/build.py)
        return self._install(info, lambda real: write_new_file(real, text, 0o444, sync=False),
                             repair)

    def add_dump(self, stream: Readable, name: str, method: str, algo: str = "sha256",
                 references: Iterable[StorePath] = (), repair: bool = False) -> ValidPathInfo:
        """Add from a dump: a NAR (``recursive``) or the file's bytes (``flat``/``text``)."""
        check_name(name)
        refs = frozenset(references)
        if method == TEXT:
            # .drv files and builtins.toFile: small, kept in memory (as Nix does), no
            # scratch dir; a big one is staged like any other dump
            head = read_up_to(stream, IN_MEMORY_MAX + 1)
            if len(head) <= IN_MEMORY_MAX:
                return self.add_text(name, head, refs, repair)
            stream = Prefixed(head, stream)
        if method == RECURSIVE and algo == "sha256":
            # a small NAR (nix-store --add of a file, say) is hashed in memory and
            # restored at its final name: no scratch dir to make, rename and remove
            head = read_up_to(stream, IN_MEMORY_MAX + 1)
            if len(head) <= IN_MEMORY_MAX:
                return self._add_small_nar(head, name, refs, repair)
            stream = Prefixed(head, stream)
        with self._temp_dir() as tmp:
            staged = os.path.join(tmp, "x")
            if method == RECURSIVE:
                reader = narfmt.HashingReader(stream, "sha256")
                restore_checked(reader, staged)
                nar_hash, nar_size = reader.hash(), reader.size
                ca_hash = nar_hash if algo == "sha256" else nar_hash_path(staged, algo)[0]
            else:
                ca_hash = copy_stream_hashing(stream, staged, algo)
                nar_hash, nar_size = nar_hash_path(staged)
            ca = ContentAddress(method, ca_hash)
            sp = ca.store_path(self.store_dir, name, refs)
            info = ValidPathInfo(sp, nar_hash, nar_size, refs, ca=ca.render())
            crash_point("add.hashed")
            return self._install(info, lambda real: os.rename(staged, real), repair)

    def _add_small_nar(self, nar: bytes, name: str, refs: frozenset[StorePath],
                       repair: bool) -> ValidPathInfo:
        reader = io.BytesIO(nar)
        try:
            narfmt.read_nar(reader, narfmt.NullSink())  # (a bad one: nothing made)
        except narfmt.NarError as e:
            raise BadArchive(str(e)) from None
        nar = nar[:reader.tell()]  # (bytes after it are not the NAR's, as when streamed)
        nar_hash = Hash.of("sha256", nar)
        ca = ContentAddress(RECURSIVE, nar_hash)
        sp = ca.store_path(self.store_dir, name, refs)
        info = ValidPathInfo(sp, nar_hash, len(nar), refs, ca=ca.render())
        if not self.read_only:
            self.auto_gc(len(nar))

        def restore(real: str) -> None:
            try:
                restore_checked(io.BytesIO(nar), real)
            except BaseException:
                if os.path.lexists(real):
                    remove_tree(real)  # (never a partial tree at a path's final name)
                raise
        return self._install(info, restore, repair)

    def add_nar(self, info: ValidPathInfo, stream: Readable, repair: bool = False,
                check_sigs: bool = False) -> ValidPathInfo:
        """Import a path from its NAR and metadata (``--import``, copying, the daemon).

        The NAR is always read to its end, so a stream carrying more data after
        it stays usable; nothing is registered unless hash, size and any
        content address check out.
        """
        if check_sigs:
            try:
                check_trusted(self.store_dir, info, self.settings)
            except BadArchive:
                narfmt.read_nar(stream, narfmt.NullSink())  # keep the stream in step
                raise
        with self._temp_dir(info.nar_size) as tmp:
            staged = os.path.join(tmp, "x")
            info = restore_verified(self, info, stream, staged)
            crash_point("add.hashed")
            return self._install(info, lambda real: os.rename(staged, real), repair)

    def stage_nar(self, info: ValidPathInfo, stream: Readable) -> StagedNar:
        """``add_nar``'s unpacking and checks, in a scratch dir; any thread (:mod:`.staging`)."""
        self._check_writable()
        return stage_nar(self, info, stream)

    def begin_staged(self, items: Iterable[StagedNar],
                     pending: Collection[StorePath] = ()) -> PendingBatch:
        """A batch moved to its names, to sync (any thread) and commit (:mod:`.staging`)."""
        return begin_staged(self, items, pending)

    def _check_ca(self, info: ValidPathInfo, staged: str, where: str,
                  nar_hash: Hash | None = None) -> None:
        """``nar_hash``: the hash of the NAR ``staged`` was unpacked from, already checked;
        the strict reader takes only canonical NARs, so it is the tree's NAR hash too and
        a recursive content address in its algorithm needs no second read of the files."""
        try:
            ca = ContentAddress.parse(info.ca or "")
        except FormatError as e:
            raise BadArchive(f"bad content address {where}: {e}") from None
        if ca.method == RECURSIVE and nar_hash is not None and nar_hash.algo == ca.hash.algo:
            h = nar_hash
        elif ca.method == RECURSIVE:
            h = nar_hash_path(staged, ca.hash.algo)[0]
        else:
            h = hash_file(staged, ca.hash.algo)
        self_ref = info.path in info.references
        refs = info.references - {info.path}
        try:
            expected = ContentAddress(ca.method, h).store_path(self.store_dir, info.path.name, refs, self_ref)
        except FormatError as e:
            raise BadArchive(f"{where}: {e}") from None
        if h != ca.hash or expected != info.path:
            raise BadArchive(mismatch("ca hash", where, ca.hash.typed("nix32"), h.typed("nix32")))

    def register_valid_paths(self, infos: Iterable[ValidPathInfo],
                             references_pinned: bool = False, synced: bool = False) -> None:
        """Register paths whose files are complete and canonical, in one transaction
        (``references_pinned``: the caller pinned and checked every reference;
        ``synced``: the caller made their files durable)."""
        infos = list(infos)
        self._check_writable()
        new = {i.path for i in infos}
        for info in infos if not references_pinned else ():
            self._pin_references(info.references - new, info.path)
        drvs = {i.path: self._read_drv_file(i.path) for i in infos if i.path.is_derivation}
        for path, drv in drvs.items():
            self._check_drv_outputs(path, drv)  # (before the sync: a bad one costs none)
        if infos and self.settings.fsync_store_paths and not synced:
            # (overlapping this sync with the output check in a thread was slower at
            # load 23 on 2 CPUs: 3.6 vs 2.7 s for 250 .drv files)
            with naming(self.real_store_dir):
                self.syncer.sync_new([self.real_path(i.path) for i in infos])
        crash_point("register.synced")
        with self.db.transaction(durable=self.settings.fsync_store_paths):
            ids = {i.path: self.db.upsert_info(i) for i in infos}
            for info in infos:
                for ref in info.references:
                    ref_id = ids.get(ref) or self.db.path_id(self.print_path(ref))
                    if ref_id is None:
                        raise InvalidPath(f"path '{self.print_path(ref)}' is not valid")
                    self.db.add_reference(ids[info.path], ref_id)
            for path, drv in drvs.items():
                for name, out in drv.outputs.items():
                    if out.path:
                        self.db.add_derivation_output(ids[path], name, out.path)
            if len(new) > 1:  # (one path cannot make a cycle: its self-reference is allowed)
                self.topo_sort(new)  # raises on a cycle, rolling everything back
            crash_point("register.written")

    def _check_drv_outputs(self, drv_path: StorePath, drv) -> None:
        """A ``.drv`` is registered only with the output paths its inputs give it
        (Nix's checkDerivationOutputs); input ``.drv``s are references, so valid."""
        cache = self.__dict__.setdefault("_drv_hash_cache", {})  # .drv files never change

        def read(path: str):
            return self._read_drv_file(self.store_dir.parse(path, lax=True))
        try:
            check_derivation_outputs(self.print_path(drv_path), drv, self.store_dir, read, cache)
        except FormatError as e:
            raise StoreError(str(e)) from None

    def _remember_drv(self, drv: StorePath, text: bytes) -> None:
        """Cache the parse of a ``.drv`` being added from memory (if it parses: if not,
        registration reads the file and says why)."""
        cache = self.__dict__.setdefault("_drv_cache", {})
        if drv not in cache:
            try:
                parsed = parse_derivation(text, self.store_dir)
            except FormatError:
                return
            if len(cache) >= 4096:
                cache.clear()
            cache[drv] = parsed

    def _read_drv_file(self, drv: StorePath):
        """The parsed ``.drv``, read once per store object: a ``.drv``'s path is its
        content's hash, so it never changes (callers do not change what they get)."""
        cache = self.__dict__.setdefault("_drv_cache", {})
        parsed = cache.get(drv)
        if parsed is not None:
            return parsed
        with open(self.real_path(drv), "rb") as f:
            try:
                parsed = parse_derivation(f.read(), self.store_dir)
            except FormatError as e:
                raise StoreError(f"derivation '{self.print_path(drv)}': {e}") from None
        if len(cache) >= 4096:
            cache.clear()
        cache[drv] = parsed
        return parsed

    def add_signatures(self, sp: StorePath, sigs: Iterable[str]) -> None:
        """Merge signatures (``keyname:base64``) into a valid path's record."""
        sigs = list(sigs)
        for sig in sigs:
            # the DB column is space-separated: whitespace would split a signature
            if not sig or any(c.isspace() for c in sig):
                raise StoreError(f"signature '{sig}' is empty or contains whitespace")
        path = self.print_path(sp)
        if not self.pin_valid(sp):
            raise InvalidPath(f"path '{path}' is not valid")
        with self.db.transaction():
            info = self.db.query_info(path)
            if info is None:
                raise InvalidPath(f"path '{path}' is not valid")
            self.db.set_sigs(path, set(info.sigs) | set(sigs))

    # --- invalidation ---------------------------------------------------------

    def invalidate(self, sp: StorePath) -> None:
        """Drop a path's registration (its files stay). Refused while others refer to it."""
        path = self.print_path(sp)
        with self.db.transaction():
            others = [r for r in self.db.referrers(path) if r != path]
            if others:
                raise StoreError(f"cannot invalidate '{path}': it is still referenced by '{others[0]}'")
            self.db.invalidate(path)

    # --- garbage collection ---------------------------------------------------

    def ensure_user_dirs(self, user: str, uid: int, gid: int) -> None:
        """``gcroots/per-user/<user>`` and ``profiles/per-user/<user>``, owned by the user.

        Made by the daemon for each connecting user, as Nix does; only that user
        (and root) can add or remove roots there.  An existing entry that is not
        a plain directory is left alone and not trusted.
        """
        if self.read_only or "/" in user or user in ("", ".", ".."):
            return
        for top in ("gcroots", "profiles"):
            d = os.path.join(self.state_dir, top, "per-user")
            os.makedirs(d, mode=0o755, exist_ok=True)
            mine = os.path.join(d, user)
            try:
                os.mkdir(mine, 0o755)
            except FileExistsError:
                continue
            if os.geteuid() == 0:
                os.lchown(mine, uid, gid)

    def collect_garbage(self, options, log: Callable[[str], None] | None = None,
                        progress: Callable[[int, int], None] | None = None):
        """Run the collector (see :mod:`storekeeper.store.gc.collector` for its invariants);
        a deleting one applies the retention policies first (:mod:`.policy`)."""
        if options.action == DELETE_DEAD and not self.read_only:
            policy.apply(self, log=log)
        return GarbageCollector(self, log, progress).collect(options)

    def free_space(self) -> int:
        test_file = os.environ.get("_NIX_TEST_FREE_SPACE_FILE")
        if test_file:
            with open(test_file) as f:
                return int(f.read().strip())
        st = os.statvfs(self.real_store_dir)
        return st.f_bavail * st.f_frsize

    def auto_gc(self, incoming: int = 0) -> None:
        """Collect when free space is below ``min-free``, up to ``max-free``; single-flight.

        Called before new content is written (before it is staged), with the
        size of that content when it is known: the space it will take counts as
        used already, so an add bigger than the free space can still succeed.
        If a collection is already running (here or in another process) we do
        not queue behind it, and the need is re-checked once the GC lock is ours.
        """
        s = self.settings
        if s.min_free <= 0 or self.read_only:
            return
        now = time.monotonic()
        if not incoming and now - self._last_auto_gc_check < s.min_free_check_interval:
            return
        self._last_auto_gc_check = now
        avail = self.free_space()
        if avail >= s.min_free:
            avail -= incoming  # (below min-free the figures are Nix's, which ignores it)
        if avail >= s.min_free or avail >= s.max_free:
            return
        with self.output_guard():
            # Nix's lines: this one, then the collector's
            if self.info_log is not None:
                self.info_log(f"running auto-GC to free {s.max_free - avail} bytes")
            self.collect_garbage(GCOptions(
                action=DELETE_DEAD, max_freed=s.max_free - avail, keep_outputs=s.keep_outputs,
                keep_derivations=s.keep_derivations, wait_for_lock=False,
                only_if=lambda: self.free_space() - incoming < s.min_free), log=self.info_log)

    # --- verification (storekeeper.store.verify) ----------------------------------

    def verify(self, check_contents: bool = False, repair: bool = False,
               progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """``nix-store --verify``: every valid path exists, (optionally) with its recorded content."""
        return verify_store(self, check_contents, repair, progress)
