"""DaemonConnection: one connection to a daemon speaking the Nix worker protocol (1.38,
or what an older daemon speaks, e.g. Nix 2.8's 1.34), through a Unix socket or one of
:mod:`.transports`; the handshake, the log channel and the framing of one operation.
:class:`~.remote.RemoteStore` puts the store API on top of it.

Invariants:

* **One connection, in step or closed.**  Every operation is one request,
  the daemon's log channel up to exactly one ``STDERR_LAST`` (then the
  response is read in full) or one ``STDERR_ERROR`` (raised as
  :class:`DaemonError`; the connection stays usable, as it does on the
  daemon's side).  Anything else that goes wrong on the wire (end of stream,
  a malformed value, a timeout) closes the connection for good and raises
  :class:`ConnectionLost`: we could no longer tell where the next message
  starts.  It never reconnects behind the caller's back (the daemon keeps
  temp roots per connection).
* **A payload that fails on our side is never terminated.**  Uploads
  (``add_*``) are written by a helper thread while this one reads the log
  channel, as Nix clients do, so that neither side can block the other.  If
  reading the source fails half-way (a file vanished, a malformed NAR), the
  framed stream is not ended: the connection is dropped instead, so the daemon
  cannot register a truncated file as if it were complete.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Self

from ..errors import StoreError
from ..formats.storepath import StoreDir
from ..formats.url import store_dir_setting
from ..formats.wire import (
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
    read_stderr_message,
)
from .errors import ConnectionLost, DaemonError, daemon_error, strip_ansi
from .transports import Transport, UnixTransport
from .upload import _Upload

#: The oldest daemon we talk to: 1.32 is Nix 2.4, the first with the request
#: forms used here (AddToStore 1.25+, framed AddToStoreNar, Error records).
MIN_DAEMON_VERSION = 0x120
_CHUNK = 1 << 16
_CLOSE_WAIT = 5.0  # seconds close() waits for the daemon to hang up

LogFn = Callable[[str], None]


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr)


def client_store_dir(env=None) -> StoreDir:
    """The store dir a client assumes when no URL names one (see ``store_dir_setting``)."""
    return StoreDir(os.path.normpath(store_dir_setting(os.environ if env is None else env, {})))




class DaemonConnection:
    """A connection to a daemon over ``socket_path`` or a :class:`Transport` (see the module
    docstring), for the paths of ``store_dir`` (default: the client's).

    ``log`` receives the daemon's log lines (default: printed on stderr);
    ``verbosity`` is sent to the daemon as the client's log level;
    ``timeout`` bounds every wait on the socket (None: wait for ever).
    """

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

    def __enter__(self) -> Self:
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

