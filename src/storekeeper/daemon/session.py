"""One client connection: the handshake, the operation loop and the log channel.

A :class:`Session` keeps these invariants (spec §3, §4, §10):

* **One answer per operation.**  Every operation ends with exactly one
  ``STDERR_LAST`` (followed by the response fields) or one ``STDERR_ERROR``
  (and no response).  Log messages go out only while an operation is working,
  never between ``STDERR_LAST`` and the end of the response.
* **In step, or closed.**  An error raised after the request was read in full
  (the operation called :meth:`Session.start_work`) is reported and the
  connection stays usable.  An error while reading the request (unknown
  opcode, malformed field, path outside the store) is reported and the
  connection is closed, because the daemon can no longer tell where the next
  message starts.  So is a failure after ``STDERR_LAST`` was sent, which the
  client could not tell from a response.
* **Framed payloads are drained.**  A framed upload is read to its terminator
  before an error is reported, so the client, which writes the whole payload
  before it looks at the answer, stays in step.  If the framing itself is
  broken the connection is closed.
* **Nothing the client sends is trusted for authority.**  Whether the peer is
  trusted is decided by the server from its credentials before the session
  starts; options a client sets can only narrow what it may do.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from ..build import BuildSettings
from ..errors import StoreError
from ..formats.errors import FormatError
from ..formats.storepath import StoreDir, StorePath
from ..formats.wire import (
    ERROR_RECORD_MINOR,
    FEATURES_MINOR,
    MAX_FEATURE_LEN,
    MAX_FEATURES,
    PROTOCOL_VERSION,
    SUPPORTED_FEATURES,
    TRUST_MINOR,
    WORKER_MAGIC_1,
    WORKER_MAGIC_2,
    Field,
    FramedReader,
    RequestTooLarge,
    Stderr,
    Trust,
    Verbosity,
    WireEOF,
    WireError,
    WireReader,
    WireWriter,
    format_version,
    protocol_major,
    protocol_minor,
    write_error,
    write_next,
    write_result,
    write_start_activity,
    write_stop_activity,
)
from ..fs.waiting import readable
from ..store.local import LocalStore
from .errors import NotSupported, OpError  # noqa: F401 -- re-exported
from .registry import OPS
from .trust import DaemonConfig, PeerInfo

log = logging.getLogger("storekeeper.daemon")

#: Clients older than this are refused at the handshake: the request formats
#: of AddToStore (< 1.25), AddToStoreNar (< 1.23) and others differ, and no
#: released Nix spoke 1.22 .. 1.31 (Nix 2.3 is 1.21, Nix 2.4 is 1.32).
MIN_CLIENT_VERSION = 0x120


class ClientGone(Exception):
    """The client closed the connection or the transport failed."""


class _Shutdown(BaseException):
    """Raised out of a blocking read when the daemon is told to stop while idle."""


class _IdleTimeout(BaseException):
    """Raised out of a blocking read when the client sent nothing for ``idle-timeout``."""


#: log output kept for a client that does not read while output must not block
MAX_DEFERRED = 1 << 20


@dataclass
class ClientOptions:
    """What the client set with SetOptions (spec §7 op 19)."""

    keep_failed: bool = False
    keep_going: bool = False
    try_fallback: bool = False
    verbosity: int = Verbosity.INFO
    max_build_jobs: int = 1
    max_silent_time: int = 0
    verbose_build: bool = True
    build_cores: int = 0
    use_substitutes: bool = True
    #: the overrides accepted for this client (trusted: all; untrusted: a few)
    overrides: dict[str, str] = field(default_factory=dict)


class _Input:
    """The client's byte stream; transport errors become :class:`ClientGone`."""

    def __init__(self, stream) -> None:
        self._read = stream.read

    def read(self, n: int) -> bytes:
        try:
            return self._read(n)
        except OSError as e:
            raise ClientGone(f"reading from the client: {e}") from None


def error_message(e: BaseException) -> str:
    if isinstance(e, (StoreError, FormatError)):
        return str(e)
    if isinstance(e, UnicodeError):
        # Strings arrive as bytes (kept with surrogateescape); one that is not UTF-8 cannot
        # be used where text is needed (a database key, a file's contents).
        return "a string in the request is not valid UTF-8, and this operation needs text"
    if isinstance(e, OSError):
        where = f": '{os.fsdecode(e.filename)}'" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return f"unexpected error: {type(e).__name__}: {e}"


class Session:
    """Serves one connection until the client leaves or breaks the protocol (see module doc)."""

    def __init__(self, store: LocalStore | None, rstream, write: Callable[[bytes], object], *,
                 trusted: bool, config: DaemonConfig | None = None,
                 peer: PeerInfo | None = None, build: BuildSettings | None = None) -> None:
        # Both None only with a startup error: the handshake then ends with that error and
        # no operation runs, so operations may take them as set.
        self.store: LocalStore = store  # type: ignore[assignment]
        self.sd: StoreDir = store.store_dir if store is not None else None  # type: ignore[assignment]
        self.r = WireReader(_Input(rstream))
        self._write = write
        self.w = WireWriter()
        self.trusted = trusted
        self.config = config or DaemonConfig()
        self.peer = peer
        if store is not None:
            # the store's own lines (auto-GC) go to this client; undone when run() ends,
            # so the store does not keep this session (and its connection) alive
            store.info_log = self._info
            store.output_guard = self.output_never_blocks
        #: the daemon's own build settings (None: nix.conf, read when first needed)
        self.build_base = build
        #: what the client announced, and the version spoken: min(theirs, ours)
        self.client_version = 0
        self.version = 0
        #: the 1.38 features both sides offered (empty below 1.38)
        self.features: frozenset[str] = frozenset()
        self.options = ClientOptions()
        self.framed: FramedReader | None = None
        self.working = False
        self.replied = False
        self.idle = False
        self.stop_requested = False
        self._activity_seq = 0
        self._idle_timer = False
        self._deferred: bytearray | None = None
        self._deferred_dropped = 0
        self._logged_once: set[str] = set()

    @property
    def minor(self) -> int:
        """The negotiated minor version: every versioned field is decided on this."""
        return protocol_minor(self.version)

    def has_feature(self, name: str) -> bool:
        return name in self.features

    # --- output -----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write bytes to the client now (after anything buffered in ``w``)."""
        if self.w:
            data = self.w.take() + data
        if not data:
            return
        try:
            self._write(data)
        except OSError as e:
            raise ClientGone(f"writing to the client: {e}") from None

    def flush(self) -> None:
        self.send(b"")

    # --- the log channel ----------------------------------------------------------

    def start_work(self) -> None:
        """The request has been read in full: from now on errors keep the connection."""
        self.working = True

    def stop_work(self) -> None:
        """End the log stream with STDERR_LAST; the response fields follow in ``w``."""
        if not self.working or self.replied:
            raise RuntimeError("stop_work outside an operation (daemon bug)")
        self.w.u64(Stderr.LAST)
        self.replied = True

    def log(self, level: int, message: str) -> None:
        """A line for the client's stderr, if its verbosity asks for that level."""
        if level <= self.options.verbosity:
            self._log_message(lambda w: write_next(w, message + "\n"))

    def warn(self, message: str) -> None:
        # Coloured as Nix colours it; the client strips escapes when its stderr is no tty.
        self.log(Verbosity.WARN, f"\x1b[35;1mwarning:\x1b[0m {message}")

    def start_activity(self, level: int, act_type: int, text: str,
                       fields: Sequence[Field] = (), parent: int = 0) -> int:
        # Unique per daemon: (pid << 32) + counter, as the real daemon numbers them.
        self._activity_seq += 1
        act_id = (os.getpid() << 32) + self._activity_seq - 1
        self._log_message(lambda w: write_start_activity(w, act_id, level, act_type, text, fields, parent))
        return act_id

    def stop_activity(self, act_id: int) -> None:
        self._log_message(lambda w: write_stop_activity(w, act_id))

    def result(self, act_id: int, result_type: int, fields: Sequence[Field]) -> None:
        self._log_message(lambda w: write_result(w, act_id, result_type, fields))

    def write_data(self, data: bytes) -> None:
        """STDERR_WRITE: data for the operation's sink on the client (ExportPath)."""
        self._log_message(lambda w: w.u64(Stderr.WRITE).string(data))

    def _log_message(self, emit: Callable[[WireWriter], object]) -> None:
        if not self.working or self.replied:
            # Between operations, or inside a response: never interleave.
            # storekeeper has no background logging, so nothing is queued.
            return
        if self._deferred is not None:
            w = WireWriter()
            emit(w)
            self._defer(w.take())
            return
        emit(self.w)
        self.flush()

    @contextmanager
    def output_never_blocks(self) -> Iterator[None]:
        """While this lasts (e.g. a GC holding ``gc.lock``), log messages never wait for the
        client: they are sent only as far as the socket takes them at once, the rest is
        kept (at most :data:`MAX_DEFERRED` bytes; later messages are dropped and counted)
        and sent when this ends, before the operation's answer."""
        if self._deferred is not None:
            yield
            return
        self.flush()
        self._deferred, self._deferred_dropped = bytearray(), 0
        try:
            yield
        finally:
            pending, dropped = self._deferred, self._deferred_dropped
            self._deferred = None
            self.w.buf[:0] = pending  # ahead of anything written since
            if dropped:
                self.log(Verbosity.ERROR, f"({dropped} progress messages were dropped: "
                                          f"the client did not read them in time)")

    def _defer(self, data: bytes) -> None:
        assert self._deferred is not None
        if len(self._deferred) + len(data) > MAX_DEFERRED:
            self._deferred_dropped += 1
        else:
            self._deferred += data
        sock = getattr(self._write, "__self__", None)
        if self._deferred and isinstance(sock, socket.socket):
            try:
                sent = sock.send(self._deferred, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise ClientGone(f"writing to the client: {e}") from None
            del self._deferred[:sent]

    def log_once(self, key: str, message: str) -> None:
        """Log ``message`` in the daemon's log the first time ``key`` comes up in this
        connection (a client hitting a limit over and over is reported once)."""
        if key not in self._logged_once:
            self._logged_once.add(key)
            who = self.peer.describe() if self.peer is not None else "the client"
            log.warning("%s: %s", who, message)

    def _send_error(self, message: str) -> None:
        self.w.buf.clear()  # nothing buffered may precede the error record
        write_error(self.w, message, client_minor=self.minor or ERROR_RECORD_MINOR)
        self.flush()

    # --- request helpers ------------------------------------------------------------

    def read_path(self, what: str = "store path") -> StorePath:
        """A store path argument (2.8 parses these laxly; so do we)."""
        return self.r.store_path(self.sd, what, lax=True)

    def framed_payload(self) -> FramedReader:
        """The framed stream that follows the request fields of this operation."""
        self.framed = FramedReader(self.r)
        return self.framed

    def require_trusted(self, what: str) -> None:
        if not self.trusted:
            raise OpError(f"you are not privileged to {what}")

    # --- the connection ---------------------------------------------------------------

    def run(self, startup_error: str | None = None) -> None:
        """Serve until the client disconnects, breaks the protocol or we are told to stop.

        With ``startup_error`` (the store could not be opened) the handshake
        ends with that error instead, and the connection is closed.
        """
        try:
            self.idle = True  # (nothing to undo until the handshake is over)
            self._arm_idle_timer()
            try:
                if not self._handshake(startup_error):
                    return
            finally:
                self.idle = False
                self._disarm_idle_timer()
            while not self.stop_requested:
                self.idle = True
                self._arm_idle_timer()
                start = self.r.offset
                try:
                    code = self.r.u64("operation")
                except WireEOF:
                    if self.r.offset != start:
                        log.info("client sent a truncated operation code")
                    return
                finally:
                    self.idle = False
                    self._disarm_idle_timer()
                self.r.budget = self.config.max_request_size or None
                try:
                    if not self._run_op(code):
                        return
                finally:
                    self.r.budget = None
        except ClientGone as e:
            log.info("%s", e)
        except _IdleTimeout:
            self.log_once("idle", f"closing the connection: no request for "
                                  f"{self.config.idle_timeout} s (idle-timeout)")
        except _Shutdown:
            log.info("connection closed: the daemon is stopping")
        finally:
            self._disarm_idle_timer()
            if self.store is not None and self.store.info_log == self._info:
                del self.store.info_log, self.store.output_guard

    def _info(self, message: str) -> None:
        self.log(Verbosity.INFO, message)

    def use_idle_timer(self) -> None:
        """Close the connection when the client sends no request for ``idle-timeout``
        seconds (this process's SIGALRM: only for a session in a process of its own)."""
        if self.config.idle_timeout:
            self._idle_timer = True
            signal.signal(signal.SIGALRM, self._on_idle_timer)

    def _arm_idle_timer(self) -> None:
        if self._idle_timer:
            signal.setitimer(signal.ITIMER_REAL, self.config.idle_timeout)

    def _disarm_idle_timer(self) -> None:
        if self._idle_timer:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _on_idle_timer(self, signum: int, frame: object) -> None:
        if self.idle:  # blocked waiting for a request: nothing is half-done
            raise _IdleTimeout()

    def request_stop(self) -> None:
        """Stop after the current operation; at once if none is in progress.

        Called from a signal handler: raising is only safe while blocked waiting
        for the next opcode, when no state can be half-changed.
        """
        self.stop_requested = True
        if self.idle:
            raise _Shutdown()

    def _handshake(self, startup_error: str | None = None) -> bool:
        """Versions, (at 1.38) feature sets, then our version string, (at 1.35) the trust
        flag and the start-up log.  Every choice is made on the negotiated version."""
        try:
            magic = self.r.u64("magic")
        except WireEOF:
            return False
        if magic != WORKER_MAGIC_1:
            # Not a Nix client: close without a byte, as the real daemon does.
            log.info("protocol mismatch (magic %#x)", magic)
            return False
        self.send(WireWriter().u64(WORKER_MAGIC_2).u64(PROTOCOL_VERSION).take())
        try:
            self.client_version = self.r.u64("client version")
            refused = (protocol_major(self.client_version) != protocol_major(PROTOCOL_VERSION)
                       or self.client_version < MIN_CLIENT_VERSION)
            # (a refused client gets a version too: the error record's shape depends on it)
            self.version = min(self.client_version, PROTOCOL_VERSION)
            if not refused and self.minor >= FEATURES_MINOR:
                # The client writes its list first; we read it, then send ours.
                theirs = self.r.strings("client features", MAX_FEATURES, MAX_FEATURE_LEN)
                ours = sorted(SUPPORTED_FEATURES)
                self.send(WireWriter().strings(ours).take())
                self.features = frozenset(theirs) & SUPPORTED_FEATURES
            if self.minor >= 14 and self.r.u64("cpu affinity flag"):
                self.r.u64("cpu affinity")
            if self.minor >= 11:
                self.r.u64("reserveSpace")
        except WireEOF:
            return False
        except WireError as e:  # (a feature list too long to be real)
            log.info("closing the connection: bad handshake: %s", e)
            return False
        version = WireWriter()
        if self.minor >= 33:
            version.string(self.config.nix_version)
        if refused:
            startup_error = (f"the Nix client version {format_version(self.client_version)} is not "
                             f"supported: storekeeper's daemon needs protocol "
                             f"{format_version(MIN_CLIENT_VERSION)} (Nix 2.4) or newer")
        if self.minor >= TRUST_MINOR:
            # Nix sends the flag even before an error; a refused connection learns nothing.
            version.u64(Trust.UNKNOWN if startup_error is not None
                        else Trust.TRUSTED if self.trusted else Trust.NOT_TRUSTED)
        if startup_error is not None:
            self.send(version.take())
            self._send_error(startup_error)
            return False
        # The version string and STDERR_LAST in one write: one wake-up of the client.
        self.send(version.u64(Stderr.LAST).take())
        return True

    def _run_op(self, code: int) -> bool:
        """One operation; False when the connection must be closed."""
        self.working = self.replied = False
        self.framed = None
        try:
            entry = OPS.get(code)
            if entry is None:
                raise WireError(f"invalid operation {code}")
            entry.handler(self)
            if not self.replied:
                raise RuntimeError(f"operation {entry.name} did not answer (daemon bug)")
            self.flush()
            return True
        except ClientGone:
            raise
        except Exception as e:  # noqa: BLE001 -- every failure is reported to the client
            return self._fail(code, e)

    def _fail(self, code: int, e: Exception) -> bool:
        message = error_message(e)
        framed = self.framed
        if isinstance(e, WireEOF) and (framed is None or framed.broken):
            log.info("client disconnected during operation %d: %s", code, e)
            return False
        if not isinstance(e, (StoreError, FormatError, UnicodeError)):
            log.exception("operation %d failed unexpectedly", code)
        if self.replied:
            # STDERR_LAST is out; an error now would read as response data.
            log.warning("operation %d failed after its reply began: %s", code, message)
            return False
        if framed is not None and not framed.broken and not framed.finished:
            try:
                framed.drain()
            except WireError:
                pass
        in_step = self.working and (framed is None or not framed.broken)
        if not in_step:
            log.info("closing the connection after a bad request (operation %d): %s", code, message)
        self._send_error(message)
        if isinstance(e, RequestTooLarge):
            self.log_once("request-size", message)
            self._discard_input()
        return in_step

    def _discard_input(self, quiet: float = 0.5, most: float = 10.0) -> None:
        """Read and drop what the client still sends (the rest of a request too large to
        keep), so that it finishes writing and reads our error instead of a broken pipe;
        until it is quiet for ``quiet`` seconds, at most ``most`` seconds."""
        sock = getattr(self._write, "__self__", None)
        if not isinstance(sock, socket.socket):
            return
        deadline = time.monotonic() + most
        try:
            while time.monotonic() < deadline:
                ready = readable([sock], quiet)
                if not ready or not sock.recv(1 << 16):
                    return
        except OSError:
            return
