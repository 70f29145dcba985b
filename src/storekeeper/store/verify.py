"""``verify``: the checks of ``nix-store --verify [--check-contents] [--repair]``, and more.

Beyond Nix 2.8, with ``check_contents`` or ``repair``: SQLite's ``quick_check`` of
the whole database file (a damaged page that no query reads is found too; a plain
verify reads, like Nix's, only the rows it needs, and fails on a damaged page of
those), the metadata of every file checked for
canonical form with ``--check-contents``, and an optimise killed half-way
finished first (:mod:`.optimise.journal`).  Unlike Nix 2.8, a vanished path is
only invalidated with ``repair``.
"""

from __future__ import annotations

import os
import stat
from contextlib import suppress
from typing import TYPE_CHECKING, Callable, cast

from .. import fs
from ..api import VerifyReport
from ..errors import StoreError
from ..formats.errors import FormatError
from ..formats.storepath import StorePath
from ..fs.narfs import nar_hash_path
from .canonicalise import canonicalise_paths
from .gc.threads import Task
from .locks import lock_fd, open_lock_unless_read_only_fs
from .optimise import open_pool, recover_interrupted

if TYPE_CHECKING:
    from .local import LocalStore
    from .reader import StoreReader


def verify_store(store: StoreReader, check_contents: bool = False, repair: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """``nix-store --verify``: every valid path exists, (optionally) with its recorded content.

    Unlike Nix 2.8, a vanished path is only invalidated with ``repair``.  Without
    ``repair`` a :class:`StoreReader` will do (what the CLI opens for it: fewer
    modules to import); a repair needs the :class:`LocalStore`.
    """
    report = VerifyReport()
    # gc.lock SH, as Nix does: no GC deletes anything while we look
    gc_fd = open_lock_unless_read_only_fs(os.path.join(store.state_dir, "gc.lock"),
                                          store.read_only)
    try:
        if gc_fd is not None:
            lock_fd(gc_fd, exclusive=False)
        if not store.read_only:
            # an optimise killed half-way: finish it first (not a fault of the paths)
            recover_interrupted(store.real_store_dir, store.state_dir)
        if check_contents or repair:
            # the pages no query below reads (an index, a free page) too: a read of
            # the whole file, in proportion to reading every path's bytes, and
            # before a repair writes to it; a plain verify reads only what Nix's does
            for problem in store.db.quick_check()[:20]:
                report.errors.append(f"database '{store.db.db_path}' is damaged: {problem}")
        # Existence from one listing of the store directory, as Nix does: a
        # million lstat()s would read a million inodes, at random on a cold cache.
        # The names are compared as sets of bytes (in C, nothing decoded): no
        # Python step per valid path.  A name missing from the listing is looked
        # at again (lstat, in _verify_one): a path added meanwhile is not reported.
        if check_contents:
            names = store.db.all_valid_names()
            todo = sorted(names)
        else:
            names, listing = _names_and_listing(store)
            todo = sorted(set(names).difference(listing))
        done = len(names) - len(todo)  # (present, and nothing more to check)
        report.checked += done
        prefix = store.store_dir.path + "/"
        for n, name in enumerate(todo, done):
            if progress:
                progress(n, len(names))
            report.checked += 1
            path = prefix + name.decode("utf-8", "surrogateescape")
            _verify_one(store, store.store_dir.parse(path, lax=True), check_contents, repair, report)
        if check_contents:
            _verify_links(store, repair, report)
    finally:
        if gc_fd is not None:
            os.close(gc_fd)
    return report

def _names_and_listing(store: StoreReader) -> tuple[list[bytes], list[bytes]]:
    """The valid paths' names and the store dir's entries, read at the same time: the
    listing (getdents, the GIL released per entry) in a thread while SQLite reads the
    names (the GIL released while it steps), ~10-15 % of a verify's time when a core is free."""
    lister = Task(os.listdir, os.fsencode(store.real_store_dir))
    try:
        names = store.db.all_valid_names()
    except BaseException:
        with suppress(OSError):  # (the database's error is the one to tell)
            lister.result()
        raise
    return names, lister.result()


def _verify_one(store: StoreReader, sp: StorePath, check_contents: bool, repair: bool, report: VerifyReport) -> None:
    path = store.print_path(sp)
    real = store.real_path(sp)
    if not os.path.lexists(real):
        referrers = [r for r in store.db.referrers(path) if r != path]
        if referrers:
            report.errors.append(f"path '{path}' disappeared, but it still has valid referrers!")
        elif repair:
            cast("LocalStore", store).invalidate(sp)
            report.repaired.append(f"path '{path}' disappeared, removed from the database")
        else:
            report.errors.append(f"path '{path}' disappeared (--repair removes it from the database)")
        return
    if not check_contents:
        return
    info = store.path_info(sp)
    try:
        h, size = nar_hash_path(real, info.nar_hash.algo)
    except (OSError, StoreError, FormatError) as e:
        report.errors.append(f"path '{path}' cannot be read: {e}")
        return
    if h != info.nar_hash:
        report.errors.append(f"path '{path}' was modified! expected hash "
                             f"'{info.nar_hash.typed('nix32')}', got '{h.typed('nix32')}'")
        return
    if info.nar_size != size:
        if repair or info.nar_size == 0:
            with store.db.transaction():
                store.db.set_nar_size(path, size)
            report.repaired.append(f"path '{path}': narSize set to {size}")
        else:
            report.errors.append(f"path '{path}' has narSize {info.nar_size}, but its NAR is {size} bytes")
    problem = _first_uncanonical(real)
    if problem:
        if repair:
            canonicalise_paths([real])
            report.repaired.append(f"path '{path}': metadata of '{problem}' made canonical")
        else:
            report.errors.append(f"path '{path}': '{problem}' has non-canonical metadata")

def _verify_links(store: StoreReader, repair: bool, report: VerifyReport) -> None:
    links = os.path.join(store.real_store_dir, ".links")
    try:
        lfd = open_pool(None, links)
    except FileNotFoundError:
        return
    try:
        for name in [e.name for e in fs.entries(lfd)]:
            p = os.path.join(links, name)
            try:
                h, _ = nar_hash_path(fs.proc_fd(lfd) + "/" + name)
            except (OSError, FormatError):
                continue
            if h.nix32 != name:
                if repair:
                    os.unlink(name, dir_fd=lfd)
                    report.repaired.append(f"link '{p}' was corrupt and was removed")
                else:
                    report.errors.append(f"link '{p}' was modified! expected hash '{name}', got '{h.nix32}'")
    finally:
        os.close(lfd)


def _first_uncanonical(real: str) -> str | None:
    """The first file under ``real`` whose metadata is not canonical, if any."""
    for ev, node in fs.walk(real):
        if ev == fs.LEAVE:
            continue
        st = node.lstat()
        perm = stat.S_IMODE(st.st_mode)
        if int(st.st_mtime) != 1 or (node.kind != fs.LNK and perm not in (0o444, 0o555)):
            return node.show(real)
    return None
