"""The daemon's TCP listener (``--listen-tcp HOST:PORT``): who is on the other end.

A TCP peer has no kernel credentials, so it authenticates with the key the
daemon issued to a local user (``storekeeper tcp-key issue``, over the Unix
socket, see ``store.tcpkeys``); the exchange and the sealed stream that
follows are in ``formats.tcpauth``.

Invariants:

* **Off unless asked for**; a listen address without a host binds loopback.
* **Identity before bytes**, as on the Unix socket: no worker-protocol byte is
  read or written before the peer has proved its key.  The identity is then
  exactly what ``SO_PEERCRED`` would give that user's local processes (uid,
  primary gid, names; pid unknown), and ``allowed-users``, ``trusted-users``
  and ``build-users-group`` apply to it unchanged.  A peer that fails is told
  why in one line and closed.
* **Authentication runs in the connection's own process**, bounded as a whole
  by ``auth-timeout`` (a peer sending one byte at a time gains nothing), so a
  slow or silent peer never stalls the accept loop.
* **Refusals do not tell which user names exist**: an unknown user, a user
  without a key and a wrong proof get the same answer after the same work
  (a proof is always computed and compared); the daemon's log has the reason.
* **Everything after it is sealed** (tagged frames, per-direction keys): a
  byte changed or injected on the way ends the connection instead of
  reaching the session.
"""

from __future__ import annotations

import logging
import pwd
import secrets
import signal
import socket
import threading

from ..errors import StoreError
from ..formats import tcpauth
from ..formats.errors import FormatError
from ..formats.wire import WORKER_MAGIC_1, WireReader
from ..store.tcpkeys import TcpKeys
from .trust import DaemonConfig, PeerInfo

log = logging.getLogger("storekeeper.daemon")

AUTH_TIMEOUT = 10.0
DEFAULT_HOST = "127.0.0.1"


class TcpRefused(Exception):
    """The peer did not authenticate (or may not connect); the message says why."""


def parse_listen_address(spec: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6ADDR]:PORT``, ``:PORT`` or ``PORT`` (loopback); port 0 picks one."""
    host, port = "", spec
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0 or spec[end + 1:end + 2] != ":":
            raise StoreError(f"TCP listen address '{spec}': expected [ADDRESS]:PORT")
        host, port = spec[1:end], spec[end + 2:]
    elif ":" in spec:
        host, _, port = spec.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StoreError(f"TCP listen address '{spec}': '{port}' is not a port number")
    return host or DEFAULT_HOST, int(port)


def listen_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StoreError(f"cannot listen on '{host}:{port}': {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise StoreError(f"cannot listen on '{host}:{port}': {e.strerror or e}") from None
    return sock


def bound_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_label(addr) -> str:
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _AuthDeadline(BaseException):
    """The whole authentication took longer than ``auth-timeout``."""


def _on_deadline(signum: int, frame: object) -> None:
    raise _AuthDeadline()


def authenticate(conn: socket.socket, rfile, label: str, keys: TcpKeys,
                 config: DaemonConfig) -> tuple[PeerInfo, bytes, bytes]:
    """Run the daemon's side of the exchange on ``conn`` (reading through ``rfile``).

    Returns the peer and the (client-to-daemon, daemon-to-client) sealing keys,
    or raises :class:`TcpRefused` after telling the peer why.  The whole exchange
    must end within ``auth-timeout`` seconds (a timer for all of it, not per read:
    this process's SIGALRM, so only in a connection process of its own).
    """
    limit = config.auth_timeout or AUTH_TIMEOUT
    conn.settimeout(limit)
    armed = threading.current_thread() is threading.main_thread()
    if armed:
        previous = signal.signal(signal.SIGALRM, _on_deadline)
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return _authenticate(conn, rfile, label, keys, config)
    except _AuthDeadline:
        raise TcpRefused(f"authentication from {label} failed: not done within {limit:g} s "
                         f"(auth-timeout)") from None
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


#: what a peer is told for an unknown user, a user without a key and a wrong key alike,
#: so that refusals do not tell which user names exist (the log has the reason)
NOT_AUTHENTICATED = "authentication failed: unknown user, or not the key the daemon issued to it"


def _authenticate(conn: socket.socket, rfile, label: str, keys: TcpKeys,
                  config: DaemonConfig) -> tuple[PeerInfo, bytes, bytes]:
    r = WireReader(rfile)
    try:
        magic = r.u64("auth magic")
        if magic != tcpauth.CLIENT_MAGIC:
            what = "a Nix worker-protocol client" if magic == WORKER_MAGIC_1 else "not a storekeeper client"
            raise TcpRefused(f"{what} ({magic:#x}): closed without a word")
        user, cnonce = tcpauth.read_hello(r)
        snonce = secrets.token_bytes(tcpauth.NONCE_LEN)
        conn.sendall(tcpauth.challenge(snonce))
        proof = tcpauth.read_proof(r)
    except (FormatError, OSError) as e:
        raise TcpRefused(f"authentication from {label} failed: {e}") from None
    t = tcpauth.transcript(user, cnonce, snonce)
    peer: PeerInfo | None = None
    key: bytes | None = None
    reason: str | None = None  # why the client is refused (for the log)
    told: str | None = NOT_AUTHENTICATED  # what it is told (None: the reason)
    try:
        pw = pwd.getpwnam(user)
    except (KeyError, ValueError):
        reason = f"unknown user '{user}'"
    else:
        peer = PeerInfo.from_ids(0, pw.pw_uid, pw.pw_gid, via="tcp", host=label)
        try:
            key = keys.lookup(pw.pw_uid, peer.user)
        except (StoreError, OSError) as e:
            log.error("TCP keys: %s", e)
            reason = told = "TCP keys are unavailable on this daemon (see its log)"
        else:
            if key is None:
                reason = f"no TCP key has been issued to user '{user}'"
    # The same work whether or not there is a key: a proof is always checked.
    expected = tcpauth.client_proof(key if key is not None else _DUMMY_KEY, t)
    if reason is None:
        if not tcpauth.proofs_equal(proof, expected):
            reason = f"bad proof for user '{user}': not the key the daemon issued (revoked or reissued?)"
        else:
            assert peer is not None
            reason = told = config.refusal(peer)
    else:
        tcpauth.proofs_equal(proof, expected)
    try:
        if reason is not None:
            conn.sendall(tcpauth.verdict_refused(told or reason))
            raise TcpRefused(f"refused {label} as '{user}': {reason}")
        assert peer is not None and key is not None
        conn.sendall(tcpauth.verdict_ok(tcpauth.server_proof(key, t)))
    except OSError as e:
        raise TcpRefused(f"authentication from {label} failed: {e.strerror or e}") from None
    conn.settimeout(None)
    c2s, s2c = tcpauth.session_keys(key, t)
    return peer, c2s, s2c


_DUMMY_KEY = secrets.token_bytes(tcpauth.KEY_LEN)


class SealedChannel:
    """The session's byte stream over a sealed TCP connection (``read(n)`` and ``write``).

    A frame that does not verify ends the stream as a transport failure
    (``ConnectionAbortedError``), never as bytes the session would parse."""

    def __init__(self, conn: socket.socket, rfile, k_in: bytes, k_out: bytes) -> None:
        self._conn = conn
        self._opener = tcpauth.Opener(k_in, rfile)
        self._sealer = tcpauth.Sealer(k_out)
        self._buf = memoryview(b"")
        self._broken: str | None = None

    def read(self, n: int = -1) -> bytes:
        if self._broken:
            raise ConnectionAbortedError(self._broken)
        if not self._buf:
            try:
                frame = self._opener.next_frame()
            except FormatError as e:  # a bad tag, a bad length, a truncated frame
                self._broken = f"sealed stream from the client: {e}"
                log.warning("%s", self._broken)
                raise ConnectionAbortedError(self._broken) from None
            if not frame:
                return b""
            self._buf = memoryview(frame)
        if n is None or n < 0:
            n = len(self._buf)
        out, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return out

    def write(self, data: bytes) -> None:
        self._conn.sendall(self._sealer.seal(data))
