"""StoreReader: a local store opened for metadata queries, the part of
:class:`~storekeeper.store.local.LocalStore` that ``query``, ``path-info`` and the
like need.

It opens the store exactly as LocalStore does (the dirs, the SQLite DB, the temp-roots
file) and answers validity and the DB's queries; LocalStore adds on top of it reading
contents, adding, GC and verification, whose modules (NAR, derivations, the collector,
the optimiser, threads) a query never needs.  So a command that only asks the database
starts without importing them (``bench/startup.py``).
"""

from __future__ import annotations

import grp
import os
import stat

from .. import fs
from ..errors import InvalidPath, StoreError
from ..formats.pathinfo import ValidPathInfo
from ..formats.storepath import StoreDir, StorePath
from ..queries import DerivedQueries
from .db import StoreDB
from .reserve import ensure_reserve
from .settings import StoreSettings
from .temproots import TempRoots

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Self

    from ..formats.url import LocalLayout


class StoreReader(DerivedQueries):
    """A local store opened for queries (see the module docstring); the base of
    :class:`~storekeeper.store.local.LocalStore`.

    ``path_info``, ``query_references``, ``query_closure`` and ``topo_sort``
    come from :class:`DerivedQueries`.
    """

    #: a reader never pins: its temp roots cannot tell a running GC (no socket)
    temp_roots_class: type[TempRoots] = TempRoots

    def __init__(self, layout: LocalLayout, create: bool = True,
                 settings: StoreSettings | None = None) -> None:
        self.layout = layout
        self.settings = settings or StoreSettings()
        self.store_dir: StoreDir = layout.store_dir
        self.real_store_dir = layout.real_store_dir
        self.state_dir = layout.state_dir
        self.read_only = layout.read_only
        if not self.read_only and create:
            self._create_dirs()
        elif not os.path.isdir(os.path.join(layout.db_dir)):
            raise StoreError(f"no store at '{layout.real_store_dir}' (state dir '{layout.state_dir}')")
        self.db = StoreDB(layout.db_dir, self.store_dir, create=create, read_only=self.read_only)
        if not self.read_only:
            ensure_reserve(layout.db_dir, self.settings.gc_reserved_space)
        self.temp_roots = self.temp_roots_class(self.state_dir)

    # --- set-up -------------------------------------------------------------

    def _create_dirs(self) -> None:
        for d in (self.real_store_dir, os.path.join(self.real_store_dir, ".links"),
                  self.layout.db_dir, os.path.join(self.state_dir, "gcroots"),
                  os.path.join(self.state_dir, "profiles"), os.path.join(self.state_dir, "temproots"),
                  self.layout.log_dir):
            os.makedirs(d, mode=0o755, exist_ok=True)
        if os.geteuid() == 0:
            # As Nix does when it runs as root with build users: the store dir
            # is root:<build group>, sticky and group-writable.
            try:
                gid = grp.getgrnam("nixbld").gr_gid
            except KeyError:
                return
            fd = fs.open_dir(self.real_store_dir)
            try:
                st = os.fstat(fd)
                # A store dir already set up for builds keeps its group: builds
                # may use another build-users-group than nixbld.
                if stat.S_IMODE(st.st_mode) != 0o1775:
                    os.fchown(fd, 0, gid)
                    os.fchmod(fd, 0o1775)
            finally:
                os.close(fd)

    def close(self) -> None:
        self.temp_roots.close()
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- names ----------------------------------------------------------------

    def print_path(self, sp: StorePath) -> str:
        return self.store_dir.print(sp)

    def parse_path(self, path: str) -> StorePath:
        return self.store_dir.parse(path)

    def real_path(self, sp: StorePath) -> str:
        return os.path.join(self.real_store_dir, sp.base)

    # --- roots and validity ---------------------------------------------------

    def pin(self, sp: StorePath) -> None:
        """Take a temp root on ``sp`` for the life of this process (or daemon connection)."""
        if not self.read_only:
            self.temp_roots.add(self.print_path(sp))

    def pin_valid(self, sp: StorePath) -> bool:
        """Pin ``sp``, *then* check validity: the one safe way to rely on a path being valid."""
        self.pin(sp)
        return self.db.is_valid(self.print_path(sp))

    def pin_valid_all(self, paths: Iterable[StorePath]) -> set[StorePath]:
        """:meth:`pin_valid` for many paths (one append to the temp roots, then one
        query): the valid ones."""
        paths = list(paths)
        printed = [self.print_path(p) for p in paths]
        if not self.read_only:
            self.temp_roots.add_all(printed)
        valid = self.db.valid_among(printed)
        return {p for p, s in zip(paths, printed) if s in valid}

    def is_valid(self, sp: StorePath) -> bool:
        """Validity without a pin: for answering queries only, never for relying on the path."""
        return self.db.is_valid(self.print_path(sp))

    def ensure_path(self, sp: StorePath) -> None:
        """Pin ``sp`` and make sure it is valid: there are no substituters to fetch it from."""
        if not self.pin_valid(sp):
            raise InvalidPath(f"path '{self.print_path(sp)}' does not exist and cannot be created")

    # --- queries --------------------------------------------------------------

    def query_path_info(self, sp: StorePath) -> ValidPathInfo | None:
        return self.db.query_info(self.print_path(sp))

    def query_referrers(self, sp: StorePath) -> set[StorePath]:
        self.path_info(sp)
        return {self.store_dir.parse(p, lax=True) for p in self.db.referrers(self.print_path(sp))}

    def query_valid_derivers(self, sp: StorePath) -> set[StorePath]:
        return {self.store_dir.parse(p, lax=True) for p in self.db.valid_derivers(self.print_path(sp))}

    def query_derivation_outputs(self, drv: StorePath) -> dict[str, StorePath]:
        self.path_info(drv)
        return {name: self.store_dir.parse(p, lax=True)
                for name, p in self.db.derivation_outputs(self.print_path(drv)).items()}

    def query_all_valid_paths(self) -> set[StorePath]:
        return {self.store_dir.parse(p, lax=True) for p in self.db.all_valid_paths()}

    def query_all_infos(self) -> list[ValidPathInfo]:
        """Every valid path's info, in one read of the database (``verify --sigs``)."""
        return self.db.all_infos()

    def query_path_from_hash_part(self, hash_part: str) -> StorePath | None:
        p = self.db.path_from_hash_part(hash_part)
        return self.store_dir.parse(p, lax=True) if p else None

    def query_valid_paths(self, paths: Iterable[StorePath]) -> set[StorePath]:
        return {p for p in paths if self.is_valid(p)}
