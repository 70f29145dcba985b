"""RemoteStore: the store API over the Nix worker protocol (1.38, or what an older
daemon speaks, e.g. Nix 2.8's 1.34; a daemon's Unix socket,
or a daemon on another host through one of :mod:`.transports`).

It talks to storekeeper's daemon and to the real ``nix-daemon`` alike, and
answers like :class:`~storekeeper.store.local.LocalStore` wherever the
protocol allows: same methods, same results, :class:`InvalidPath` for an
invalid path, :class:`BadArchive` for a NAR that does not check out locally.

Invariants:

* **One connection, in step or closed.**  Every operation is one request,
  the daemon's log channel up to exactly one ``STDERR_LAST`` (then the
  response is read in full) or one ``STDERR_ERROR`` (raised as
  :class:`DaemonError`; the connection stays usable, as it does on the
  daemon's side).  Anything else that goes wrong on the wire (end of stream,
  a malformed value, a timeout) closes the connection for good and raises
  :class:`ConnectionLost`: we could no longer tell where the next message
  starts.
* **Temp roots live as long as the connection** (the daemon keeps them per
  connection), so the store never reconnects behind the caller's back.
* **A payload that fails on our side is never terminated.**  Uploads
  (``add_*``) are written by a helper thread while this one reads the log
  channel, as Nix clients do, so that neither side can block the other.  If
  reading the source fails half-way (a file vanished, a malformed NAR), the
  framed stream is not ended: the connection is dropped instead, so the daemon
  cannot register a truncated file as if it were complete.
* Paths the daemon sends are parsed against *our* store dir (the client's,
  like a Nix client's); a daemon with another store dir fails loudly.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
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
from ..formats.storepath import StoreDir, StorePath, check_name
from ..formats.streams import Readable
from ..formats.url import store_dir_setting
from ..formats.wire import (
    FEATURE_DELETE_DEAD_SPECIFIC,
    FEATURES_MINOR,
    MAX_FEATURE_LEN,
    MAX_FEATURES,
    PROTOCOL_1_34,
    PROTOCOL_VERSION,
    SUPPORTED_FEATURES,
    TRUST_MINOR,
    WORKER_MAGIC_1,
    WORKER_MAGIC_2,
    Op,
    RemoteError,
    ResultType,
    Stderr,
    Verbosity,
    WireError,
    WireReader,
    WireWriter,
    format_version,
    protocol_major,
    protocol_minor,
    read_path_info,
    read_stderr_message,
    write_path_info,
)
from ..fs.narfs import dump_path as dump_tree

#: The oldest daemon we talk to: 1.32 is Nix 2.4, the first with the request
#: forms used here (AddToStore 1.25+, framed AddToStoreNar, Error records).
from .errors import ConnectionLost, DaemonError, daemon_error, strip_ansi
from .extops import StorekeeperOps
from .transports import Transport, UnixTransport
from .upload import _chunks, _file_chunks, _nar_from, _read_spool, _rest_of, _Tee, _Upload

MIN_DAEMON_VERSION = 0x120

_GC_ACTIONS = {LIVE: 0, DEAD: 1, DELETE_DEAD: 2, DELETE_SPECIFIC: 3}
_CHUNK = 1 << 16
_SPOOL_MAX = 8 << 20  # NARs larger than this are spooled to a temp file
_CLOSE_WAIT = 5.0  # seconds close() waits for the daemon to hang up

# What the daemon says while verifying that is progress, not a finding.
_VERIFY_PROGRESS = {"reading the Nix store...", "checking path existence...",
                    "checking link hashes...", "checking store hashes..."}

LogFn = Callable[[str], None]


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr)


def client_store_dir(env=None) -> StoreDir:
    """The store dir a client assumes when no URL names one (see ``store_dir_setting``)."""
    return StoreDir(os.path.normpath(store_dir_setting(os.environ if env is None else env, {})))


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


class RemoteStore(DerivedQueries, StorekeeperOps):
    """A store served by a daemon over ``socket_path`` or a :class:`Transport` (see module
    docstring).  storekeeper's own operations (``stats``, ``gc_dry_run``, ``why_alive``,
    ``list_roots``) come from :class:`~.extops.StorekeeperOps`.

    ``log`` receives the daemon's log lines (default: printed on stderr);
    ``verbosity`` is sent to the daemon as the client's log level;
    ``timeout`` bounds every wait on the socket (None: wait for ever).
    """

    read_only = False

    def __init__(self, socket_path: str | Transport, store_dir: StoreDir | str | None = None, *,
                 log: LogFn | None = None, verbosity: int = Verbosity.INFO,
                 timeout: float | None = None) -> None:
        self.transport = UnixTransport(socket_path) if isinstance(socket_path, str) else socket_path
        #: the daemon's socket (or, for a daemon on another host, its URL), for messages
        self.socket_path = self.transport.where
        if store_dir is None:
            store_dir = client_store_dir()
        self.store_dir: StoreDir = store_dir if isinstance(store_dir, StoreDir) else StoreDir(store_dir)
        self.verbosity = int(verbosity)
        self._log = log or _stderr_log
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.daemon_version = 0
        #: the version spoken: min(the daemon's, ours)
        self.version = 0
        #: the 1.38 features both sides offered
        self.features: frozenset[str] = frozenset()
        #: the daemon's word on our trust (1.35: 1 trusted, 2 not; 0 unknown or older daemon)
        self.trust = 0
        #: the daemon's Nix version string (``nix store ping``), "" before 1.33
        self.daemon_nix_version = ""
        self._connect(timeout)

    @property
    def minor(self) -> int:
        """The negotiated minor version."""
        return protocol_minor(self.version)

    @property
    def url(self) -> str:
        return self.transport.url

    # --- the connection ---------------------------------------------------------

    def _connect(self, timeout: float | None) -> None:
        sock = self.transport.open(timeout)  # (a StoreError says why it cannot)
        self._sock = sock
        self._rfile = sock.makefile("rb", buffering=_CHUNK)
        self.r = WireReader(self._rfile)
        try:
            self._handshake()
        except (StoreError, WireError, OSError) as e:
            self._drop()
            why = str(e) if isinstance(e, StoreError) else (
                "the daemon closed the connection (is this user in its allowed-users?)"
                if isinstance(e, (WireError, ConnectionResetError)) else (e.strerror or str(e)))
            why = self.transport.failure() or why
            raise ConnectionLost(f"cannot open connection to remote store '{self.url}': {why}") from None

    def _handshake(self) -> None:
        self._send(WireWriter().u64(WORKER_MAGIC_1).take())
        if self.r.u64("daemon magic") != WORKER_MAGIC_2:
            raise StoreError("protocol mismatch: this is not a Nix daemon socket")
        version = self.r.u64("daemon protocol version")
        if protocol_major(version) != protocol_major(PROTOCOL_VERSION) or version < MIN_DAEMON_VERSION:
            raise StoreError(f"the daemon speaks protocol {format_version(version)}; storekeeper "
                             f"needs {format_version(MIN_DAEMON_VERSION)} (Nix 2.4) or newer")
        self.daemon_version = version
        # Every versioned field below, and in the operations, is decided on this.
        self.version = min(version, PROTOCOL_VERSION)
        hello = WireWriter().u64(PROTOCOL_VERSION)
        if self.minor >= FEATURES_MINOR:
            # Our list first, then the daemon's; both sides use the intersection.
            self._send(hello.strings(sorted(SUPPORTED_FEATURES)).take())
            theirs = self.r.strings("daemon features", MAX_FEATURES, MAX_FEATURE_LEN)
            self.features = frozenset(theirs) & SUPPORTED_FEATURES
        # cpu affinity: none; reserveSpace: no (both obsolete)
        self._send(hello.u64(0).u64(0).take())
        if self.minor >= 33:
            self.daemon_nix_version = self.r.string("daemon version", 1024)
        if self.minor >= TRUST_MINOR:
            self.trust = self.r.u64("trust")
        self._read_log(self._log, None)  # start-up messages, then LAST (or the daemon's error)
        with self._exchange(self._set_options_request()):
            pass

    def _set_options_request(self) -> WireWriter:
        w = WireWriter().u64(Op.SetOptions)
        # keepFailed, keepGoing, tryFallback, verbosity, maxBuildJobs, maxSilentTime,
        # useBuildHook (obsolete), verboseBuild (0 = verbose), logType, printBuildTrace
        # (obsolete), buildCores, useSubstitutes: what nix-store sends.
        for value in (0, 0, 0, self.verbosity, 1, 0, 1, 0, 0, 0, 0, 1):
            w.u64(value)
        return w.string_map({})

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.sendall(data)

    def close(self) -> None:
        """Close the connection and wait (briefly) for the daemon to hang up.

        A daemon drops the connection's temp roots before (ours) or as (Nix)
        its connection process exits, so once this returns a GC no longer
        sees them.
        """
        sock = self._sock
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _CLOSE_WAIT
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(_CHUNK):
                    break  # (nothing is expected: the daemon is idle between operations)
        except OSError:
            pass
        self._drop()

    def _drop(self) -> None:
        """Close the connection at once."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                self._rfile.close()
            finally:
                sock.close()
                self.transport.close()

    def __enter__(self) -> "RemoteStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lost(self, e: BaseException) -> ConnectionLost:
        self._drop()
        if isinstance(e, socket.timeout):
            why = "timed out waiting for the daemon"
        elif isinstance(e, WireError):
            why = str(e)
        else:
            why = getattr(e, "strerror", None) or str(e)
        why = self.transport.failure() or why
        return ConnectionLost(f"connection to the daemon at '{self.socket_path}' lost: {why}")

    # --- one operation --------------------------------------------------------------

    @contextmanager
    def _exchange(self, request: WireWriter,
                  payload: Callable[[Callable[[bytes], object]], None] | None = None,
                  on_line: LogFn | None = None,
                  sink: Callable[[bytes], object] | None = None) -> Iterator[WireReader]:
        """Send ``request`` (and a framed ``payload``) and read the log channel, passing
        lines to ``on_line`` (default: the store's log); the body then reads the
        response from the yielded reader (see the module docstring)."""
        with self._lock:
            if self._sock is None:
                raise ConnectionLost(f"the connection to the daemon at '{self.socket_path}' is closed")
            upload: _Upload | None = None
            try:
                self._send(request.take())
                if payload is not None:
                    upload = _Upload(self._sock, payload)
                    upload.start()
                try:
                    self._read_log(on_line or self._log, sink)
                finally:
                    if upload is not None:
                        upload.join()
                if upload is not None and upload.error is not None:
                    raise upload.error
                yield self.r
            except (WireError, OSError, DaemonError) as e:
                if upload is not None and upload.error is not None:
                    # Our side failed; the upload dropped the connection.
                    self._drop()
                    raise upload.error from None
                if isinstance(e, DaemonError):
                    raise
                raise self._lost(e) from None
            except BaseException:
                # (an interrupt mid-operation: we no longer know where the stream is)
                self._drop()
                raise

    def _read_log(self, on_line: LogFn, sink: Callable[[bytes], object] | None) -> None:
        """Log messages up to STDERR_LAST; STDERR_ERROR is raised as :class:`DaemonError`.

        Lines reach ``on_line`` without colour codes and without the daemon's
        trailing newline.
        """
        while True:
            msg = read_stderr_message(self.r, self.minor or PROTOCOL_1_34 & 0xFF)
            kind = msg.kind
            if kind is Stderr.LAST:
                return
            if kind is Stderr.NEXT:
                text = msg.payload
                assert isinstance(text, str)
                on_line(strip_ansi(text[:-1] if text.endswith("\n") else text))
            elif kind is Stderr.ERROR:
                err = msg.payload
                assert isinstance(err, RemoteError)
                raise daemon_error(strip_ansi(err.message), [strip_ansi(t) for t in err.traces])
            elif kind is Stderr.START_ACTIVITY:
                act = msg.payload
                assert isinstance(act, tuple) and len(act) == 6
                _id, level, _type, text, _fields, _parent = act
                if text and level <= self.verbosity:
                    on_line(strip_ansi(text) + "...")
            elif kind is Stderr.RESULT:
                res = msg.payload
                assert isinstance(res, tuple) and len(res) == 3
                _id, rtype, fields = res
                if rtype == ResultType.BUILD_LOG_LINE and fields and isinstance(fields[0], str):
                    on_line(strip_ansi(fields[0]))
            elif kind is Stderr.WRITE:
                if sink is None:
                    raise WireError("the daemon sent data (STDERR_WRITE) to an operation without a sink")
                data = msg.payload
                assert isinstance(data, bytes)
                sink(data)
            elif kind is Stderr.READ:
                # Only ImportPaths pulls data this way, and we never send it.
                raise WireError("the daemon asked for data (STDERR_READ) that no operation offers")
            # STOP_ACTIVITY: nothing to show

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
