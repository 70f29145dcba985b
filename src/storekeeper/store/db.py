"""The metadata database ``<state>/db/db.sqlite``, schema 10, exactly as Nix 2.8 keeps it.

Invariants (shared with every real Nix process on the same store):

* ``db/schema`` holds the ASCII version ``10`` with no newline; a store with a
  newer schema is refused, an older one is migrated under the big lock held
  exclusively.
* Every process that opens the store holds ``db/big-lock`` with ``flock`` SH
  for as long as it has the store open.
* Every connection runs with ``foreign_keys = 1`` (the cascades from
  ``ValidPaths`` to ``Refs``/``DerivationOutputs`` depend on it), WAL journal,
  ``synchronous = normal``, ``wal_autocheckpoint = 40000``, a one-hour busy
  timeout.  A ``durable`` transaction (a registration, with ``fsync-store-paths``)
  commits with ``synchronous = full``: it is on disk when the commit returns, also in
  a daemon that keeps the database open (otherwise only a checkpoint or the last
  close syncs the WAL, and a power cut loses an add that had returned).  Every write is in a transaction begun ``immediate``, which waits
  up to that hour for another writer too, but in steps of :data:`BUSY_STEP_MS`,
  saying once (``busy_log``) that it is waiting.
* Every SQLite failure leaves this module as a :class:`DatabaseError` naming the
  database file; a first open that fails for lack of space frees the reserve
  (:mod:`.reserve`) and is tried once more.
* ``ValidPaths.hash`` is written ``sha256:<base16>``; ``narSize`` 0 is written
  NULL; ``ultimate`` false and empty ``sigs`` are NULL; self references are a
  ``Refs`` row (N, N).  A path's row, its references and (for a ``.drv``) its
  ``DerivationOutputs`` rows are written in one transaction.
* A path is invalidated only when no *other* valid path refers to it
  (``on delete restrict``); callers check referrers first.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from contextlib import contextmanager

from ..errors import DatabaseError, ReadOnlyStore, StoreError
from ..formats.hashes import Hash
from ..formats.pathinfo import ValidPathInfo
from ..formats.storepath import StoreDir
from ..fs.atomic import write_file_atomic
from .locks import lock_fd, open_lock_file, unlock_fd
from .reserve import free_bytes, with_reserve

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

SCHEMA_VERSION = 10

# The DDL as Nix ships it: SQLite keeps the statement text in sqlite_master,
# so a byte-identical schema needs byte-identical DDL.
SCHEMA_SQL = [
    """create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
)""",
    """create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
)""",
    "create index if not exists IndexReferrer on Refs(referrer)",
    "create index if not exists IndexReference on Refs(reference)",
    """create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end""",
    """create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
)""",
    "create index if not exists IndexDerivationOutputs on DerivationOutputs(path)",
]

_MIGRATIONS = {
    # from version -> statements bringing it to version + 1 (spec §4.4)
    7: ["alter table ValidPaths add column ultimate integer",
        "alter table ValidPaths add column sigs text"],
    8: ["drop table if exists FailedPaths"],
    9: ["alter table ValidPaths add column ca text"],
}

_INFO_COLS = "id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca"

#: how long one wait for the write lock lasts before we say we are waiting (and retry)
BUSY_STEP_MS = 2000
#: how long a writer waits for another one in all
BUSY_PATIENCE = 3600.0

_DAMAGED = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def database_error(e: sqlite3.Error, db_path: str) -> DatabaseError:
    """One line for an SQLite failure: the database file, SQLite's words, and what it means."""
    name = getattr(e, "sqlite_errorname", "") or ""
    msg = str(e)
    hint = ""
    if name.startswith("SQLITE_FULL") or name.startswith("SQLITE_IOERR"):
        try:
            if free_bytes(os.path.dirname(db_path)) < 65536:
                hint = f" (the file system of '{os.path.dirname(db_path)}' is full)"
        except OSError:
            pass
    elif name.startswith(_DAMAGED):
        hint = " (the database is damaged: restore it from a backup)"
    elif name.startswith("SQLITE_READONLY"):
        hint = " (the database or its directory is read-only)"
    elif msg.startswith("no such table"):
        hint = " (not a Nix store database, or a damaged one)"
    return DatabaseError(f"SQLite database '{db_path}': {msg}{hint}", name)


class _Cursor(sqlite3.Cursor):
    """Rows are read as they are stepped: a damaged page can fail any of them."""

    db_path = ""

    def __iter__(self) -> "_Cursor":
        return self

    def __next__(self):
        try:
            return super().__next__()
        except sqlite3.Error as e:
            raise database_error(e, self.db_path) from None

    def fetchone(self):
        try:
            return super().fetchone()
        except sqlite3.Error as e:
            raise database_error(e, self.db_path) from None

    def fetchall(self):
        try:
            return super().fetchall()
        except sqlite3.Error as e:
            raise database_error(e, self.db_path) from None


class _Connection(sqlite3.Connection):
    """A connection whose statements and rows fail with :class:`DatabaseError`
    (see :func:`database_error`)."""

    db_path = ""

    def cursor(self, factory=None):
        cur = super().cursor(factory or _Cursor)
        cur.db_path = self.db_path
        return cur

    def execute(self, sql: str, parameters=(), /) -> sqlite3.Cursor:
        try:
            return self.cursor().execute(sql, parameters)
        except sqlite3.Error as e:
            raise database_error(e, self.db_path) from None

    def executemany(self, sql: str, parameters, /) -> sqlite3.Cursor:
        try:
            return self.cursor().executemany(sql, parameters)
        except sqlite3.Error as e:
            raise database_error(e, self.db_path) from None


def _busy(e: BaseException) -> bool:
    name = getattr(e, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _stderr_warning(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


def is_read_only_fs(path: str) -> bool:
    """Whether ``path`` is on a file system mounted read-only (``ST_RDONLY``)."""
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


class StoreDB:
    """One connection to a store's database plus the big lock (see module docstring)."""

    def __init__(self, db_dir: str, store_dir: StoreDir, create: bool = True,
                 read_only: bool = False) -> None:
        self.db_dir = db_dir
        self.db_path = os.path.join(db_dir, "db.sqlite")
        self.store_dir = store_dir
        self.read_only = read_only
        #: told once per wait for another writer (the CLI: stderr)
        self.busy_log: Callable[[str], None] = _stderr_warning
        self._big_lock_fd: int | None = None
        if read_only:
            self.conn = self._connect(self._read_only_uri(), uri=True)
            return
        if create:
            os.makedirs(db_dir, mode=0o755, exist_ok=True)
        self._big_lock_fd = open_lock_file(os.path.join(db_dir, "big-lock"))
        lock_fd(self._big_lock_fd, exclusive=False)
        version = self._read_schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(f"current Nix store schema is version {version}, "
                             f"but I only support {SCHEMA_VERSION}")
        if version == 0:
            self._initialise()
            return
        self.conn = with_reserve(db_dir, lambda: self._connect(self.db_path))
        if version < SCHEMA_VERSION:
            self._init_or_migrate(version)

    def _read_only_uri(self) -> str:
        """``mode=ro`` where SQLite can make its shared-memory file (the database may change
        under us, as the WAL tells); on a read-only file system ``immutable=1`` as well, as
        Nix's ``?read-only=true`` does: SQLite then takes no locks and reads no WAL (nothing
        can write there), so a WAL left non-empty by an unclean shutdown before the file
        system became read-only is not seen, and we say so."""
        # (a URI: the three characters that would end or escape the path, escaped)
        path = self.db_path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
        uri = f"file:{path}?mode=ro"
        if not is_read_only_fs(self.db_dir):
            return uri
        try:
            wal = os.stat(self.db_path + "-wal").st_size
        except FileNotFoundError:
            wal = 0
        if wal:
            self.busy_log(f"warning: '{self.db_path}-wal' is not empty ({wal} bytes), and a "
                          "database on a read-only file system is read without it: the most "
                          "recent registrations may be missing")
        return uri + "&immutable=1"

    def _connect(self, target: str, uri: bool = False) -> sqlite3.Connection:
        conn = None
        try:
            conn = sqlite3.connect(target, isolation_level=None, uri=uri, check_same_thread=False,
                                   timeout=BUSY_PATIENCE, factory=_Connection)
            conn.db_path = self.db_path
            conn.execute(f"pragma busy_timeout = {int(BUSY_PATIENCE * 1000)}")
            conn.execute("pragma foreign_keys = 1")
            if not uri:
                conn.execute("pragma synchronous = normal")
                if conn.execute("pragma main.journal_mode").fetchone()[0] != "wal":
                    conn.execute("pragma main.journal_mode = wal")
                conn.execute("pragma wal_autocheckpoint = 40000")
            return conn
        except (sqlite3.Error, DatabaseError) as e:
            if conn is not None:
                conn.close()
            if isinstance(e, DatabaseError):
                raise
            raise database_error(e, self.db_path) from None

    def _read_schema_version(self) -> int:
        try:
            with open(os.path.join(self.db_dir, "schema"), "rb") as f:
                text = f.read().strip()
        except FileNotFoundError:
            return 0
        try:
            return int(text or b"0")
        except ValueError:
            raise StoreError(f"'{self.db_dir}/schema' is corrupt") from None

    def _initialise(self, patience: float = 60.0) -> None:
        """Create a new database: race-safe between processes that open a brand-new (or
        just re-created) store at once.

        The creators queue on a ``flock`` of the db directory itself (no file of our
        own beside Nix's), not on the big lock: each already holds the big lock
        shared, so none could ever upgrade it to exclusive while another waits.  A
        real Nix initialising the same store holds the big lock exclusively, so we
        never get here during its work.  An SQLite "busy" while the new database is
        set up (the WAL switch needs it alone) is retried, for at most ``patience``
        seconds."""
        dir_fd = os.open(self.db_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            lock_fd(dir_fd, exclusive=True)
            deadline = time.monotonic() + patience
            while True:
                conn = None
                try:
                    conn = self._connect(os.path.join(self.db_dir, "db.sqlite"))
                    if self._read_schema_version() == 0:  # (another did it meanwhile)
                        self.conn = conn
                        with self.transaction():
                            for stmt in SCHEMA_SQL:
                                conn.execute(stmt)
                        write_file_atomic(os.path.join(self.db_dir, "schema"),
                                          str(SCHEMA_VERSION).encode(), mode=0o644)
                    self.conn = conn
                    return
                except DatabaseError as e:
                    if conn is not None:
                        conn.close()
                    if not _busy(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01 + _jitter() * 0.05)
        finally:
            os.close(dir_fd)  # (releases the flock)

    def _init_or_migrate(self, version: int) -> None:
        # Schema changes need the big lock exclusively: upgrade, then re-read,
        # because another process may have done the work meanwhile.
        assert self._big_lock_fd is not None
        lock_fd(self._big_lock_fd, exclusive=True)
        try:
            version = self._read_schema_version()
            with self.transaction():
                if version == 0:
                    for stmt in SCHEMA_SQL:
                        self.conn.execute(stmt)
                else:
                    if version < 7:
                        raise StoreError(f"store schema version {version} is too old to upgrade "
                                         "(upgrade it with Nix first)")
                    for v in range(version, SCHEMA_VERSION):
                        for stmt in _MIGRATIONS.get(v, []):
                            self.conn.execute(stmt)
            write_file_atomic(os.path.join(self.db_dir, "schema"), str(SCHEMA_VERSION).encode(),
                              mode=0o644)
        finally:
            lock_fd(self._big_lock_fd, exclusive=False)

    def close(self) -> None:
        self.conn.close()
        if self._big_lock_fd is not None:
            unlock_fd(self._big_lock_fd)
            os.close(self._big_lock_fd)
            self._big_lock_fd = None

    # --- transactions -----------------------------------------------------

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction; retried by the caller's logic, never left open;
        ``durable``: synced to disk by its commit (module docstring)."""
        if self.read_only:
            raise ReadOnlyStore("the store database is read-only")
        if durable:
            self.conn.execute("pragma synchronous = full")
        try:
            self._begin_immediate()
            try:
                yield self.conn
                self.conn.execute("commit")
            except BaseException:
                # (a commit that failed, e.g. on a full disk, leaves the transaction open)
                if self.conn.in_transaction:
                    try:
                        self.conn.execute("rollback")
                    except DatabaseError:
                        pass  # the first error is the one to report
                raise
        finally:
            if durable:
                self.conn.execute("pragma synchronous = normal")

    def _begin_immediate(self) -> None:
        # Each try waits BUSY_STEP_MS in SQLite; SQLITE_BUSY can also surface at
        # once (WAL recovery), so retry with a short random back-off as Nix does,
        # and say once that we are waiting.  Reads keep the long timeout.
        deadline = time.monotonic() + BUSY_PATIENCE
        told = False
        self.conn.execute(f"pragma busy_timeout = {BUSY_STEP_MS}")
        try:
            while True:
                try:
                    self.conn.execute("begin immediate")
                    return
                except DatabaseError as e:
                    if not _busy(e) or time.monotonic() > deadline:
                        raise
                    if not told and e.sqlite_errorname != "SQLITE_BUSY_RECOVERY":
                        told = True
                        self.busy_log(f"SQLite database '{self.db_path}' is busy: waiting for "
                                      "another process to finish writing to it...")
                    time.sleep(_jitter() * 0.1)
        finally:
            self.conn.execute(f"pragma busy_timeout = {int(BUSY_PATIENCE * 1000)}")

    # --- reads --------------------------------------------------------------

    def _row_to_info(self, row: tuple, refs: Iterable[str]) -> ValidPathInfo:
        _id, path, h, reg, deriver, nar_size, ultimate, sigs, ca = row
        sd = self.store_dir
        return ValidPathInfo(
            path=sd.parse(path, lax=True),
            nar_hash=Hash.parse(h, "sha256") if ":" not in h else Hash.parse(h),
            nar_size=nar_size or 0,
            references=frozenset(sd.parse(r, lax=True) for r in refs),
            deriver=sd.parse(deriver, lax=True) if deriver else None,
            registration_time=reg or 0,
            ultimate=bool(ultimate),
            sigs=frozenset(sigs.split()) if sigs else frozenset(),
            ca=ca or None,
        )

    def quick_check(self) -> list[str]:
        """SQLite's ``quick_check`` of every page, table and index (not the index
        contents against the tables): [] if the file is sound."""
        rows = [r[0] for r in self.conn.execute("pragma quick_check")]
        if rows == ["ok"]:
            return []
        # one line each, without SQLite's "*** in database main ***" heading
        return [" ".join(r.replace("*** in database main ***", "").split()) for r in rows]

    def path_id(self, path: str) -> int | None:
        row = self.conn.execute("select id from ValidPaths where path = ?", (path,)).fetchone()
        return row[0] if row else None

    def is_valid(self, path: str) -> bool:
        return self.path_id(path) is not None

    def valid_among(self, paths: list[str]) -> set[str]:
        """Those of ``paths`` that are valid (a query per 500, not one per path)."""
        found: set[str] = set()
        for i in range(0, len(paths), 500):
            part = paths[i:i + 500]
            found.update(r[0] for r in self.conn.execute(
                f"select path from ValidPaths where path in ({','.join('?' * len(part))})", part))
        return found

    def query_info(self, path: str) -> ValidPathInfo | None:
        row = self.conn.execute(f"select {_INFO_COLS} from ValidPaths where path = ?",
                                (path,)).fetchone()
        if row is None:
            return None
        return self._row_to_info(row, self.references_of_id(row[0]))

    def all_infos(self) -> list[ValidPathInfo]:
        """Every valid path's info, read in two queries (whole-store checks: one query
        pair per path costs more than the check itself)."""
        refs: dict[int, list[str]] = {}
        for referrer, path in self.conn.execute(
                "select referrer, path from Refs join ValidPaths on reference = id"):
            refs.setdefault(referrer, []).append(path)
        return [self._row_to_info(row, refs.get(row[0], ()))
                for row in self.conn.execute(f"select {_INFO_COLS} from ValidPaths")]

    def references_of_id(self, path_id: int) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "select path from Refs join ValidPaths on reference = id where referrer = ?",
            (path_id,))]

    def referrers(self, path: str) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "select path from Refs join ValidPaths on referrer = id "
            "where reference = (select id from ValidPaths where path = ?)", (path,))]

    def valid_derivers(self, path: str) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "select v.path from DerivationOutputs d join ValidPaths v on d.drv = v.id "
            "where d.path = ?", (path,))]

    def derivation_outputs(self, drv_path: str) -> dict[str, str]:
        return {r[0]: r[1] for r in self.conn.execute(
            "select d.id, d.path from DerivationOutputs d join ValidPaths v on d.drv = v.id "
            "where v.path = ?", (drv_path,))}

    def all_valid_paths(self) -> list[str]:
        # one row (SQLite joins the names): no Python step per path of a million
        (text,) = self.conn.execute("select group_concat(path, char(10)) from ValidPaths").fetchone()
        return text.split("\n") if text else []

    def all_valid_names(self) -> list[bytes]:
        """Every valid path's name in the store dir (``<hash>-<name>``, UTF-8), cut by
        SQLite: bytes, as ``os.listdir`` of a bytes path gives them (nothing decoded)."""
        (blob,) = self.conn.execute("select cast(group_concat(substr(path, ?), char(10)) as blob) "
                                    "from ValidPaths", (len(self.store_dir.path) + 2,)).fetchone()
        return blob.split(b"\n") if blob else []

    def path_from_hash_part(self, hash_part: str) -> str | None:
        prefix = f"{self.store_dir.path}/{hash_part}"
        row = self.conn.execute("select path from ValidPaths where path >= ? limit 1",
                                (prefix,)).fetchone()
        if row and row[0].startswith(prefix):
            return row[0]
        return None

    def reference_graph(self) -> tuple[dict[int, str], list[tuple[int, int]]]:
        """The whole graph in two queries: id → path, and (referrer, reference) edges."""
        ids = dict(self.conn.execute("select id, path from ValidPaths"))
        edges = self.conn.execute("select referrer, reference from Refs").fetchall()
        return ids, edges

    # --- writes (call inside transaction()) ---------------------------------

    def upsert_info(self, info: ValidPathInfo) -> int:
        sd = self.store_dir
        path = sd.print(info.path)
        values = (f"sha256:{info.nar_hash.base16}" if info.nar_hash.algo == "sha256"
                  else info.nar_hash.typed("base16"),
                  info.nar_size or None, 1 if info.ultimate else None,
                  " ".join(sorted(info.sigs)) or None, info.ca)
        existing = self.path_id(path)
        if existing is not None:
            self.conn.execute("update ValidPaths set hash = ?, narSize = ?, ultimate = ?, "
                              "sigs = ?, ca = ? where id = ?", (*values, existing))
            return existing
        cur = self.conn.execute(
            "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, "
            "sigs, ca) values (?, ?, ?, ?, ?, ?, ?, ?)",
            (path, values[0], info.registration_time or int(time.time()),
             sd.print(info.deriver) if info.deriver else None, *values[1:]))
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def add_reference(self, referrer_id: int, reference_id: int) -> None:
        self.conn.execute("insert or replace into Refs (referrer, reference) values (?, ?)",
                          (referrer_id, reference_id))

    def add_derivation_output(self, drv_id: int, output: str, path: str) -> None:
        self.conn.execute("insert or replace into DerivationOutputs (drv, id, path) "
                          "values (?, ?, ?)", (drv_id, output, path))

    def set_nar_size(self, path: str, nar_size: int) -> None:
        self.conn.execute("update ValidPaths set narSize = ? where path = ?", (nar_size, path))

    def set_sigs(self, path: str, sigs: Iterable[str]) -> None:
        self.conn.execute("update ValidPaths set sigs = ? where path = ?",
                          (" ".join(sorted(set(sigs))) or None, path))

    def invalidate(self, path: str) -> None:
        self.conn.execute("delete from ValidPaths where path = ?", (path,))


def _jitter() -> float:
    """A random float in [0, 1) for retry back-off (the random module costs ~0.6 ms of
    every command's start)."""
    return int.from_bytes(os.urandom(2), "little") / 65536
