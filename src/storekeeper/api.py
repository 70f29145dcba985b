"""The store contract: what every store answers (a local store, a daemon's), its value
types, and the queries derived from the primitive ones.

:class:`Store` is the protocol :class:`storekeeper.store.local.LocalStore` and
:class:`storekeeper.client.remote.RemoteStore` both implement; ``tests/test_contract.py``
runs one suite over every implementation.  Errors are :mod:`storekeeper.errors`'s.
The client layer depends on this module and :mod:`storekeeper.formats` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, runtime_checkable

from .formats.pathinfo import ValidPathInfo
from .formats.storepath import StoreDir, StorePath
from .formats.streams import Readable
from .queries import DerivedQueries

__all__ = ["DEAD", "DELETE_DEAD", "DELETE_SPECIFIC", "LIVE", "DerivedQueries", "GCOptions",
           "GCResult", "Store", "VerifyReport"]

#: GC actions (Nix's GCAction, by name)
LIVE, DEAD, DELETE_DEAD, DELETE_SPECIFIC = "live", "dead", "delete-dead", "delete-specific"


@dataclass
class GCOptions:
    action: str = DELETE_DEAD
    paths: frozenset[StorePath] = frozenset()
    #: ``paths`` is the set to act on for every action, not only DELETE_SPECIFIC: an
    #: empty set is then nothing at all (``nix store delete --skip-alive``: DELETE_DEAD
    #: of the given paths, those alive skipped).  False: LIVE, DEAD, DELETE_DEAD act
    #: on the whole store.
    specific: bool = False
    #: also act on the (transitive) referrers of ``paths`` (``--also-referrers``)
    delete_referrers: bool = False
    ignore_liveness: bool = False
    max_freed: int = 2**64 - 1
    keep_outputs: bool = False
    keep_derivations: bool = True
    # Auto-GC: do not queue behind a running collection, and re-check the
    # need (free space) once the lock is held.
    wait_for_lock: bool = True
    only_if: Callable[[], bool] | None = None


@dataclass
class GCResult:
    paths: list[str] = field(default_factory=list)  # live / dead / deleted, printed form
    bytes_freed: int = 0
    messages: list[str] = field(default_factory=list)


@dataclass
class GCDryRun:
    """What a collection would delete now, and the bytes it would free (hard links counted:
    ``bytes_freed`` on disk, ``apparent_bytes_freed`` of file contents)."""

    paths: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    apparent_bytes_freed: int = 0

    def to_json(self) -> dict:
        return {"action": "dry-run", "paths": self.paths, "bytesFreed": self.bytes_freed,
                "apparentBytesFreed": self.apparent_bytes_freed}


@dataclass
class PoolStats:
    """The ``.links`` pool as its link counts describe it (``storekeeper stats``; a local
    store measures it, storekeeper's daemon sends it)."""

    distinct_contents: int = 0   # entries in .links
    total_references: int = 0    # store names sharing those inodes: sum of (nlink - 1)
    unused_entries: int = 0      # nlink 1: only the pool holds them (the next GC removes them)
    bytes_saved: int = 0         # on disk: sum (nlink-1)*blocks - sum blocks - .links dir blocks
    apparent_bytes_saved: int = 0  # the same in st_size (Nix's "currently hard linking saves")

    def to_json(self) -> dict:
        return {"distinctContents": self.distinct_contents, "totalReferences": self.total_references,
                "unusedEntries": self.unused_entries, "bytesSaved": self.bytes_saved,
                "apparentBytesSaved": self.apparent_bytes_saved}

    @classmethod
    def from_json(cls, obj: dict) -> "PoolStats":
        return cls(obj["distinctContents"], obj["totalReferences"], obj["unusedEntries"],
                   obj["bytesSaved"], obj["apparentBytesSaved"])


@dataclass
class VerifyReport:
    """What ``verify`` found: ``errors`` stay errors until repaired."""

    checked: int = 0
    errors: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@runtime_checkable
class Store(Protocol):
    """What a store answers, wherever it is.  Paths are :class:`StorePath` values of
    ``store_dir``; an invalid path is ``None`` from ``query_path_info`` and
    :class:`~storekeeper.errors.InvalidPath` from everything that needs it valid."""

    store_dir: StoreDir

    def close(self) -> None: ...
    def print_path(self, sp: StorePath) -> str: ...
    def parse_path(self, path: str) -> StorePath: ...

    # validity, pinned: a path found valid after ``pin`` stays so while we hold it
    def pin(self, sp: StorePath) -> None: ...
    def pin_valid(self, sp: StorePath) -> bool: ...
    def is_valid(self, sp: StorePath) -> bool: ...
    def ensure_path(self, sp: StorePath) -> None: ...

    # metadata
    def query_path_info(self, sp: StorePath) -> ValidPathInfo | None: ...
    def query_valid_paths(self, paths: Iterable[StorePath]) -> set[StorePath]: ...
    def query_referrers(self, sp: StorePath) -> set[StorePath]: ...
    def query_valid_derivers(self, sp: StorePath) -> set[StorePath]: ...
    def query_derivation_outputs(self, drv: StorePath) -> dict[str, StorePath]: ...
    def query_all_valid_paths(self) -> set[StorePath]: ...
    def query_path_from_hash_part(self, hash_part: str) -> StorePath | None: ...

    # contents
    def dump_path(self, sp: StorePath) -> Iterator[bytes]: ...
    def read_derivation(self, drv: StorePath): ...

    # adding
    def add_path(self, src: str, name: str | None = None, recursive: bool = True,
                 algo: str = "sha256", references: Iterable[StorePath] = (),
                 repair: bool = False) -> ValidPathInfo: ...
    def add_text(self, name: str, text: bytes, references: Iterable[StorePath] = (),
                 repair: bool = False) -> ValidPathInfo: ...
    def add_dump(self, stream: Readable, name: str, method: str, algo: str = "sha256",
                 references: Iterable[StorePath] = (), repair: bool = False) -> ValidPathInfo: ...
    def add_nar(self, info: ValidPathInfo, stream: Readable, repair: bool = False,
                check_sigs: bool = False) -> ValidPathInfo: ...
    def add_signatures(self, sp: StorePath, sigs: Iterable[str]) -> None: ...

    # upkeep
    def collect_garbage(self, options: GCOptions, log: Callable[[str], None] | None = None,
                        progress: Callable[[int, int], None] | None = None) -> GCResult: ...
    def verify(self, check_contents: bool = False, repair: bool = False,
               progress: Callable[[int, int], None] | None = None) -> VerifyReport: ...

    # derived (DerivedQueries)
    def path_info(self, sp: StorePath) -> ValidPathInfo: ...
    def query_references(self, sp: StorePath) -> set[StorePath]: ...
    def query_closure(self, paths: Iterable[StorePath], include_outputs: bool = False,
                      include_derivers: bool = False) -> set[StorePath]: ...
    def topo_sort(self, paths: Iterable[StorePath]) -> list[StorePath]: ...
