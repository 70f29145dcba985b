"""RemoteStore: the store API over the Nix worker protocol, on a
:class:`~.connection.DaemonConnection` (a daemon's Unix socket, or a daemon on another
host through one of :mod:`.transports`).

It talks to storekeeper's daemon and to the real ``nix-daemon`` alike, and
answers like :class:`~storekeeper.store.local.LocalStore` wherever the
protocol allows: same methods, same results, :class:`InvalidPath` for an
invalid path, :class:`BadArchive` for a NAR that does not check out locally.

Invariants (beside the connection's):

* **Temp roots live as long as the connection** (the daemon keeps them per
  connection), so the store never reconnects behind the caller's back.
* Paths the daemon sends are parsed against *our* store dir (the client's,
  like a Nix client's); a daemon with another store dir fails loudly.
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Callable, Iterable, Iterator

from ..api import (
    DEAD,
    DELETE_DEAD,
    DELETE_SPECIFIC,
    LIVE,
    DerivedQueries,
    GCOptions,
    GCResult,
    VerifyReport,
)
from ..errors import InvalidPath, StoreError
from ..formats import nar as narfmt
from ..formats.contentaddress import FLAT, RECURSIVE, TEXT
from ..formats.derivation import Derivation, parse_derivation
from ..formats.errors import FormatError
from ..formats.pathinfo import ValidPathInfo
from ..formats.storepath import StorePath, check_name
from ..formats.streams import Readable
from ..formats.wire import (
    FEATURE_DELETE_DEAD_SPECIFIC,
    Op,
    WireError,
    WireReader,
    WireWriter,
    read_path_info,
    write_path_info,
)
from ..fs.narfs import dump_path as dump_tree
from .connection import DaemonConnection, LogFn
from .errors import ConnectionLost, DaemonError
from .extops import StorekeeperOps
from .upload import _chunks, _file_chunks, _nar_from, _read_spool, _rest_of, _Tee

_GC_ACTIONS = {LIVE: 0, DEAD: 1, DELETE_DEAD: 2, DELETE_SPECIFIC: 3}
_CHUNK = 1 << 16
_SPOOL_MAX = 8 << 20  # NARs larger than this are spooled to a temp file

# What the daemon says while verifying that is progress, not a finding.
_VERIFY_PROGRESS = {"reading the Nix store...", "checking path existence...",
                    "checking link hashes...", "checking store hashes..."}


def _ca_method(method: str, algo: str) -> str:
    """The AddToStore content-address *method* string (spec §5)."""
    if method == TEXT:
        if algo != "sha256":
            raise StoreError("text paths are hashed with sha256")
        return "text:sha256"
    if method == RECURSIVE:
        return f"fixed:r:{algo}"
    if method == FLAT:
        return f"fixed:{algo}"
    raise StoreError(f"unknown content-address method '{method}'")


class RemoteStore(DaemonConnection, DerivedQueries, StorekeeperOps):
    """A store served by a daemon (see the module docstrings; the constructor is
    :class:`DaemonConnection`'s).  storekeeper's own operations (``stats``, ``gc_dry_run``,
    ``why_alive``, ``list_roots``) come from :class:`~.extops.StorekeeperOps`."""

    read_only = False

    def _simple(self, op: Op, path: StorePath) -> WireWriter:
        return WireWriter().u64(op).string(self.store_dir.print(path))

    # --- names -----------------------------------------------------------------------

    def print_path(self, sp: StorePath) -> str:
        return self.store_dir.print(sp)

    def parse_path(self, path: str) -> StorePath:
        return self.store_dir.parse(path)

    def _paths(self, r: WireReader, what: str) -> set[StorePath]:
        return set(r.store_paths(self.store_dir, what, lax=True))

    # --- roots and validity -------------------------------------------------------------

    def pin(self, sp: StorePath) -> None:
        """A temp root on ``sp`` for the life of this connection (AddTempRoot)."""
        with self._exchange(self._simple(Op.AddTempRoot, sp)) as r:
            r.u64("result")

    def pin_valid(self, sp: StorePath) -> bool:
        """Pin ``sp``, *then* check validity: the one safe way to rely on a path being valid."""
        self.pin(sp)
        return self.is_valid(sp)

    def is_valid(self, sp: StorePath) -> bool:
        with self._exchange(self._simple(Op.IsValidPath, sp)) as r:
            return r.u64("valid") != 0

    def ensure_path(self, sp: StorePath) -> None:
        """Make ``sp`` valid (substituting it if the daemon can) and pin it (EnsurePath)."""
        try:
            with self._exchange(self._simple(Op.EnsurePath, sp)) as r:
                r.u64("result")
        except DaemonError as e:
            raise self._invalid_or(sp, e) from None

    def _invalid_or(self, sp: StorePath, e: DaemonError) -> StoreError:
        """InvalidPath when ``sp`` is indeed invalid (daemons word that differently), else ``e``."""
        if isinstance(e, ConnectionLost) or self.is_valid(sp):
            return e
        return InvalidPath(f"path '{self.print_path(sp)}' is not valid")

    # --- queries ---------------------------------------------------------------------------

    def query_path_info(self, sp: StorePath) -> ValidPathInfo | None:
        with self._exchange(self._simple(Op.QueryPathInfo, sp)) as r:
            if not r.boolean("valid"):
                return None
            return read_path_info(r, self.store_dir, path=sp, lax=True)

    def query_referrers(self, sp: StorePath) -> set[StorePath]:
        with self._exchange(self._simple(Op.QueryReferrers, sp)) as r:
            referrers = self._paths(r, "referrers")
        # Daemons answer "none" for an invalid path; LocalStore says it is invalid.
        if not referrers and not self.is_valid(sp):
            raise InvalidPath(f"path '{self.print_path(sp)}' is not valid")
        return referrers

    def query_valid_derivers(self, sp: StorePath) -> set[StorePath]:
        with self._exchange(self._simple(Op.QueryValidDerivers, sp)) as r:
            return self._paths(r, "derivers")

    def query_derivation_outputs(self, drv: StorePath) -> dict[str, StorePath]:
        """Output name -> path, for the outputs whose path is known."""
        try:
            with self._exchange(self._simple(Op.QueryDerivationOutputMap, drv)) as r:
                raw = r.string_map("outputs")
        except DaemonError as e:
            raise self._invalid_or(drv, e) from None
        if not raw and not self.is_valid(drv):
            raise InvalidPath(f"path '{self.print_path(drv)}' is not valid")
        return {name: self.store_dir.parse(p, lax=True) for name, p in raw.items() if p}

    def query_all_valid_paths(self) -> set[StorePath]:
        with self._exchange(WireWriter().u64(Op.QueryAllValidPaths)) as r:
            return self._paths(r, "valid paths")

    def query_path_from_hash_part(self, hash_part: str) -> StorePath | None:
        with self._exchange(WireWriter().u64(Op.QueryPathFromHashPart).string(hash_part)) as r:
            return r.opt_store_path(self.store_dir, "path", lax=True)

    def query_valid_paths(self, paths: Iterable[StorePath]) -> set[StorePath]:
        request = WireWriter().u64(Op.QueryValidPaths).store_paths(self.store_dir, paths).u64(0)
        with self._exchange(request) as r:
            return self._paths(r, "valid paths")

    def find_roots(self) -> list[tuple[str, StorePath]]:
        """The daemon's GC roots as (link, store path), sorted (FindRoots).

        An untrusted client sees temp and runtime roots as ``{censored}``.
        """
        with self._exchange(WireWriter().u64(Op.FindRoots)) as r:
            pairs = []
            for _ in range(r.count("roots")):
                link = r.string("root link")
                pairs.append((link, r.store_path(self.store_dir, "root target", lax=True)))
        return sorted(pairs)

    # --- reading content ---------------------------------------------------------------------

    def dump_path(self, sp: StorePath) -> Iterator[bytes]:
        """The NAR of a valid path (NarFromPath), fetched at once and then streamed.

        The NAR is held in memory, or spooled to a temp file when large.
        """
        if not self.pin_valid(sp):
            # Daemons write the NAR after STDERR_LAST, where an error cannot be
            # told from data: ask only for what is valid.
            raise InvalidPath(f"path '{self.print_path(sp)}' is not valid")
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX)
        try:
            with self._exchange(self._simple(Op.NarFromPath, sp)):
                # The reply is the bare NAR: the strict reader finds its end.
                try:
                    narfmt.read_nar(_Tee(self._rfile, spool.write), narfmt.NullSink())
                except narfmt.NarError as e:
                    raise WireError(f"the daemon sent a malformed NAR for "
                                    f"'{self.print_path(sp)}': {e}") from None
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return _read_spool(spool)

    def read_derivation(self, drv: StorePath) -> Derivation:
        node = narfmt.parse_to_node(b"".join(self.dump_path(drv)))
        if not isinstance(node, narfmt.Regular):
            raise StoreError(f"derivation '{self.print_path(drv)}' is not a regular file")
        try:
            return parse_derivation(node.contents, self.store_dir)
        except FormatError as e:
            raise StoreError(f"derivation '{self.print_path(drv)}': {e}") from None

    # --- adding ------------------------------------------------------------------------------

    def _add_to_store(self, name: str, cam: str, references: Iterable[StorePath], repair: bool,
                      payload: Callable[[Callable[[bytes], object]], None]) -> ValidPathInfo:
        """AddToStore (the 1.25+ form); the reply is the new path's info."""
        check_name(name)
        references = set(references)
        request = (WireWriter().u64(Op.AddToStore).string(name).string(cam)
                   .store_paths(self.store_dir, references).boolean(repair))
        try:
            with self._exchange(request, payload) as r:
                return read_path_info(r, self.store_dir, lax=True)
        except DaemonError as e:
            # As LocalStore says it, whatever words the daemon chose.
            if not isinstance(e, ConnectionLost) and references:
                for ref in sorted(references - self.query_valid_paths(references)):
                    raise InvalidPath(f"cannot add '{name}': its reference "
                                      f"'{self.print_path(ref)}' is not valid") from None
            raise

    def add_path(self, src: str, name: str | None = None, recursive: bool = True,
                 algo: str = "sha256", references: Iterable[StorePath] = (),
                 repair: bool = False) -> ValidPathInfo:
        """``nix-store --add`` / ``--add-fixed``: send a file tree (as a NAR) or a file's bytes."""
        name = check_name(name if name is not None else os.path.basename(os.path.normpath(src)))
        st = os.lstat(src)
        if recursive:
            payload = _chunks(dump_tree(src))
        elif stat.S_ISREG(st.st_mode):
            payload = _chunks(_file_chunks(src))
        else:
            raise StoreError(f"'{src}' is not a regular file; flat (non-recursive) adds take one file")
        return self._add_to_store(name, _ca_method(RECURSIVE if recursive else FLAT, algo),
                                  references, repair, payload)

    def add_text(self, name: str, text: bytes, references: Iterable[StorePath] = (),
                 repair: bool = False) -> ValidPathInfo:
        """``builtins.toFile`` / ``.drv`` writing: a text path with references."""
        return self._add_to_store(name, "text:sha256", references, repair, _chunks([bytes(text)]))

    def add_dump(self, stream: Readable, name: str, method: str, algo: str = "sha256",
                 references: Iterable[StorePath] = (), repair: bool = False) -> ValidPathInfo:
        """Add from a dump: the NAR at the head of ``stream`` (``recursive``) or the rest of
        ``stream`` (``flat``/``text``)."""
        payload = _nar_from(stream) if method == RECURSIVE else _rest_of(stream)
        return self._add_to_store(name, _ca_method(method, algo), references, repair, payload)

    def add_nar(self, info: ValidPathInfo, stream: Readable, repair: bool = False,
                check_sigs: bool = False) -> ValidPathInfo:
        """Import a path from its NAR and metadata (AddToStoreNar).

        Exactly the NAR is read from ``stream``.  The daemon checks hash, size
        and content address and registers nothing unless they hold; it also
        decides whether an untrusted client may skip the signature check.
        """
        request = WireWriter().u64(Op.AddToStoreNar)
        write_path_info(request, self.store_dir, info, with_path=True)
        request.boolean(repair).boolean(not check_sigs)
        with self._exchange(request, _nar_from(stream)):
            pass
        return self.path_info(info.path)

    def add_signatures(self, sp: StorePath, sigs: Iterable[str]) -> None:
        """Merge signatures (``keyname:base64``) into a valid path's record."""
        # Checked first: the real nix-daemon 2.8 drops the connection when
        # asked to sign an invalid path.
        if not self.pin_valid(sp):
            raise InvalidPath(f"path '{self.print_path(sp)}' is not valid")
        with self._exchange(self._simple(Op.AddSignatures, sp).strings(list(sigs))) as r:
            r.u64("result")

    # --- garbage collection -----------------------------------------------------------------

    def collect_garbage(self, options: GCOptions, log: LogFn | None = None,
                        progress: Callable[[int, int], None] | None = None) -> GCResult:
        """CollectGarbage.  The daemon's own settings decide ``keep-outputs`` and
        ``keep-derivations``; ``progress`` is not reported over the protocol."""
        request = WireWriter().u64(Op.CollectGarbage).u64(_GC_ACTIONS[options.action])
        specific = options.specific or options.action == DELETE_SPECIFIC
        if FEATURE_DELETE_DEAD_SPECIFIC in self.features:
            # GCPaths: tag 1 whole store, or tag 0, the paths, deleteReferrers
            if specific:
                request.u64(0).store_paths(self.store_dir, options.paths)
                request.boolean(options.delete_referrers)
            else:
                request.u64(1)
        else:
            if options.delete_referrers or (specific and options.action != DELETE_SPECIFIC):
                raise StoreError("the daemon does not support garbage collecting a specific set "
                                 "of paths or deleting referrers (it lacks the protocol feature "
                                 f"'{FEATURE_DELETE_DEAD_SPECIFIC}')")
            request.store_paths(self.store_dir, options.paths)
        request.boolean(options.ignore_liveness).u64(min(options.max_freed, 2**64 - 1))
        request.u64(0).u64(0).u64(0)
        with self._exchange(request, on_line=log) as r:
            result = GCResult(paths=r.strings("paths"), bytes_freed=r.u64("bytes freed"))
            r.u64("obsolete")
        return result

    # --- verification ------------------------------------------------------------------------

    def verify(self, check_contents: bool = False, repair: bool = False,
               progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """VerifyStore.  The daemon reports findings as log lines: they become the
        report's ``errors`` (or ``repaired``, when repairing fixed them all)."""
        report = VerifyReport(checked=len(self.query_all_valid_paths()))
        lines: list[str] = []
        with self._exchange(WireWriter().u64(Op.VerifyStore).boolean(check_contents).boolean(repair),
                            on_line=lines.append) as r:
            errors_found = r.u64("errors found") != 0
        findings = [line for line in lines if line not in _VERIFY_PROGRESS]
        if errors_found:
            report.errors = findings or ["the daemon found errors in the store"]
        elif repair:
            report.repaired = findings
        else:
            for line in findings:
                self._log(line)
        return report

    def optimise(self, log: LogFn | None = None) -> None:
        """OptimiseStore: the daemon hard-links identical files (it takes no options; its
        summary, e.g. "X MiB freed by hard-linking N files", comes as a log line)."""
        with self._exchange(WireWriter().u64(Op.OptimiseStore), on_line=log) as r:
            r.u64("result")
