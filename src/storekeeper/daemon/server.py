"""The daemon process: a Unix socket, forked connection processes.

Invariants:

* **Identity before bytes.**  Each accepted connection's peer credentials are
  read with ``SO_PEERCRED`` in the parent; a peer that may not connect is
  closed before a single byte is written (spec §3, §11).
* **One process per connection at a time, one user per process.**  A
  connection is served by a forked child, or by an idle child that served
  the same uid before (:mod:`.workers`).  For each connection the child
  opens its own :class:`LocalStore`, so its database connection and its temp
  roots (``temproots/<child pid>``) live exactly as long as the connection;
  the parent never holds the store open while it forks.
* **Each connection opens the store afresh, as nix-daemon does**, creating
  what is missing: a store whose directories or database were removed (and
  re-created, empty) under a running daemon is initialised by the next
  connection.  Connections that find the same new store at once initialise it
  one after the other (:meth:`StoreDB._initialise`).
* **Children are reaped** on every turn of the accept loop, and on SIGTERM or
  SIGINT the parent stops accepting, removes its socket, closes the workers'
  control sockets, asks the children to stop (each finishes the operation in
  progress, or leaves at once when idle) and kills those still running after
  a grace period.
* The socket is created with mode 0666: who may connect is decided by
  ``allowed-users``, not by file permissions.
* **TCP listeners** (``--listen-tcp``, off by default) are served by the same
  loop; a TCP connection's process first authenticates its peer
  (:mod:`.tcp`), which then has the identity and the checks of a Unix peer.
* **The database stays open while the daemon runs**, in a small keeper
  process of its own (never in the forking parent: an SQLite connection must
  not cross a ``fork``).  Otherwise every connection would be the last one to
  close the database, and SQLite checkpoints and syncs the WAL on the last
  close and rebuilds its index on the next open: a few milliseconds per
  connection, which is most of what a short ``nix-store -q`` costs.
* Settings (``nix.conf``) are read once at start, as by ``nix-daemon``.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from contextlib import suppress
from dataclasses import replace
from typing import Callable, Sequence

from ..build import BuildSettings
from ..errors import StoreError
from ..formats import derivation as _derivation  # noqa: F401 -- (registering a .drv parses it)
from ..formats.url import LocalLayout
from ..fs.waiting import readable
from ..store.local import LocalStore
from ..store.settings import StoreSettings
from ..store.tcpkeys import TcpKeys
from . import ops as _ops  # noqa: F401 -- loaded once here, not in every forked child
from .keeper import DatabaseKeeper
from .privatemount import make_store_writable
from .sdnotify import sd_notify
from .session import Session, error_message
from .stdio import connect_unix
from .stdio import relay as relay_stdio
from .tcp import SealedChannel, TcpRefused, authenticate, bound_address, listen_tcp, peer_label
from .trust import DaemonConfig, PeerInfo
from .workers import IDLE_KEEP, MAX_IDLE, Worker, serve_more

log = logging.getLogger("storekeeper.daemon")

_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_POLL_INTERVAL = 0.2
_REFUSAL_DEADLINE = 5.0   # seconds a refused peer has to take its error
_MAX_REFUSERS = 16        # refusal children at once; beyond that: closed silently
_LOG_QUIET = 60.0         # a uid's refusals are logged at most once per this many seconds


def default_socket_path(layout: LocalLayout) -> str:
    return os.path.join(layout.state_dir, "daemon-socket", "socket")


def serve(layout: LocalLayout, socket_path: str | None = None,
          config: DaemonConfig | None = None, grace: float = 10.0,
          tcp: Sequence[tuple[str, int]] = (),
          on_listening: Callable[[str], object] | None = None,
          settings: StoreSettings | None = None, build: BuildSettings | None = None) -> None:
    """Listen on ``socket_path`` (and the ``tcp`` addresses) and serve connections until
    SIGTERM/SIGINT.  ``on_listening`` is told each bound TCP address ("host:port").
    ``settings`` and ``build``: the store's and the builds' settings (default: nix.conf)."""
    config = config or DaemonConfig()
    socket_path = os.path.abspath(socket_path or default_socket_path(layout))
    settings = settings or StoreSettings.from_nix_conf()
    if build is None:
        # Read once here, not by every connection process (~1 ms each).
        build = BuildSettings.from_nix_conf()
        if config.build_users_group is not None:
            build = replace(build, build_users_group=config.build_users_group)
    if not layout.read_only and make_store_writable(layout.real_store_dir):
        log.info("the store is mounted read-only: writable in the daemon's own mount namespace")
    # Create the store (or fail on a broken one) before listening; closed again
    # so that no database connection is inherited by the children.
    LocalStore(layout, settings=settings).close()
    keeper = DatabaseKeeper(layout)  # (forked before there is a socket it could inherit)
    try:
        listener, owned = _listen(socket_path)
        tcp_listeners: list[socket.socket] = []
        server = _Server(layout, listener, config, grace, settings, keeper, tcp_listeners, build)
        try:
            for host, port in tcp:
                tcp_listeners.append(listen_tcp(host, port))
                if on_listening is not None:
                    on_listening(bound_address(tcp_listeners[-1]))
            server.run()
        finally:
            # Stop accepting first (new clients get "connection refused" at once),
            # then give the connections in progress their grace period.
            listener.close()
            for t in tcp_listeners:
                t.close()
            if owned is not None:
                _remove_socket(socket_path, owned)
            server.stop_children()
    finally:
        keeper.stop()


def serve_stdio(layout: LocalLayout | None, config: DaemonConfig | None = None,
                socket_path: str | None = None, require_daemon: bool = False,
                relay: bool = True, settings: StoreSettings | None = None,
                build: BuildSettings | None = None) -> None:
    """Serve one connection on stdin/stdout, as ``nix-daemon --stdio`` (e.g. under ssh).

    If a daemon listens on ``socket_path`` (default: ``layout``'s socket), the
    bytes are relayed to it, so the daemon sees *this* process's uid through
    ``SO_PEERCRED``: the user ssh logged in, with that user's trust and roots.
    Otherwise (unless ``require_daemon``), or with ``relay`` false, the store is
    served here with this process's own rights; the peer is the invoking user,
    trusted (it could change the store's files itself).
    """
    if socket_path is None and layout is not None:
        socket_path = default_socket_path(layout)
    daemon = connect_unix(socket_path, required=require_daemon) if socket_path and relay else None
    if daemon is None and layout is None:
        raise StoreError("--stdio needs a store to serve or a daemon socket to relay to")
    # The protocol gets a private copy of stdout, and fd 1 becomes stderr, so
    # that nothing printed by accident can corrupt the byte stream.
    sys.stdout.flush()
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    if daemon is not None:
        try:
            relay_stdio(daemon, 0, proto_fd)
        finally:
            daemon.close()
            os.close(proto_fd)
        return
    assert layout is not None
    proto_out = os.fdopen(proto_fd, "wb", buffering=0)

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[proto_out.write(view):]

    me = PeerInfo.from_ids(os.getpid(), os.getuid(), os.getgid(), via="stdio")
    try:
        _serve_one(layout, sys.stdin.buffer, write, trusted=True, config=config or DaemonConfig(),
                   peer=me, settings=settings or StoreSettings.from_nix_conf(), build=build)
    finally:
        proto_out.close()


def _serve_one(layout: LocalLayout, rstream, write, *, trusted: bool, config: DaemonConfig,
               peer: PeerInfo | None, settings: StoreSettings, create: bool = True,
               build: BuildSettings | None = None) -> None:
    try:
        store = LocalStore(layout, create=create, settings=settings)
    except Exception as e:  # noqa: BLE001 -- told to the client at the handshake
        log.error("cannot open the store: %s", error_message(e))
        Session(None, rstream, write, trusted=trusted, config=config, peer=peer).run(
            startup_error=f"cannot open the store: {error_message(e)}")
        return
    try:
        if peer is not None:
            try:
                store.ensure_user_dirs(peer.user, peer.uid, peer.gid)
            except OSError as e:  # (e.g. --stdio as a user who may not write the state dir)
                log.warning("cannot make the per-user dirs of %s: %s", peer.describe(), error_message(e))
        session = Session(store, rstream, write, trusted=trusted, config=config, peer=peer,
                          build=build)
        if threading.current_thread() is threading.main_thread():
            stop = lambda *_: session.request_stop()  # noqa: E731
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            session.use_idle_timer()
        session.run()
    finally:
        store.close()  # drops this connection's temp roots


def _listen(path: str) -> tuple[socket.socket, tuple[int, int] | None]:
    """The listening socket: systemd's (``LISTEN_FDS``) or a new one at ``path``.

    Returns the socket and, if we created the file, its (dev, inode) so that
    only our own socket file is removed at exit.
    """
    if os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)  # meant for us alone, not for our children
        return socket.socket(fileno=3), None
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            # Never delete what is not a (stale) socket: a mistyped --socket
            # must not cost a file.
            raise OSError(errno.EEXIST, "exists and is not a socket", path)
        if _is_listening(path):
            raise OSError(errno.EADDRINUSE, "another daemon is already listening on this socket", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        _bind(sock, path)
        os.chmod(path, 0o666)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    st = os.lstat(path)
    return sock, (st.st_dev, st.st_ino)


def _bind(sock: socket.socket, path: str) -> None:
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        sock.bind(path)
        return
    # Too long for sockaddr_un: bind a relative name from inside the directory.
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(os.path.dirname(path))
        sock.bind(os.path.basename(path))
    finally:
        os.fchdir(cwd)
        os.close(cwd)


def _is_listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            return False  # cannot probe; assume a stale file
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _remove_socket(path: str, owned: tuple[int, int]) -> None:
    with suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == owned:
            os.unlink(path)


class _Server:
    """The accept loop (see the module docstring).

    Connection limits (``max-connections``, ``max-connections-per-user``): the
    parent knows each child's uid (``children``: pid -> uid, None for a TCP
    connection, whose user is known only after it authenticates; those count
    towards the total and, together, towards one per-user budget).  An
    extra connection is answered by a short-lived *refusal* child that
    completes the handshake with a one-line error (what a Nix client shows),
    under a hard deadline of :data:`_REFUSAL_DEADLINE`; at most
    :data:`_MAX_REFUSERS` of those run at once, beyond that the connection is
    closed without a word.  A refusal is logged once per uid per
    :data:`_LOG_QUIET` seconds, with the number refused since the last log.
    """

    def __init__(self, layout: LocalLayout, listener: socket.socket, config: DaemonConfig,
                 grace: float, settings: StoreSettings, keeper: DatabaseKeeper,
                 tcp_listeners: list[socket.socket] | None = None,
                 build: BuildSettings | None = None) -> None:
        self.layout = layout
        self.listener = listener
        self.tcp_listeners = tcp_listeners if tcp_listeners is not None else []
        self.config = config
        self.grace = grace
        self.settings = settings
        self.build = build
        self.keeper = keeper
        self.children: dict[int, int | None] = {}  # busy connection processes -> uid
        self.refusers: set[int] = set()
        self.workers: dict[int, Worker] = {}  # reusable connection processes, busy or idle
        self.idle: list[Worker] = []          # the idle ones, longest idle first
        self._refused_log: dict[int | None, tuple[float, int]] = {}
        self.stopping = False

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> None:
        for sock in (self.listener, *self.tcp_listeners):
            sock.setblocking(False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        # Everything allocated so far (the imported modules, the settings) goes to
        # the collector's permanent generation: a child's collections then never
        # write to those objects' pages, so fewer pages are copied after fork.
        gc.collect()
        gc.freeze()
        log.info("listening (pid %d)", os.getpid())
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving the store")
        try:
            while not self.stopping:
                busy = {w.ctl: w for w in self.workers.values() if w not in self.idle}
                ready = readable([self.listener, *self.tcp_listeners, *busy], _POLL_INTERVAL)
                self._reap()
                for sock in ready:
                    if self.stopping:
                        break
                    if sock is self.listener:
                        self._accept()
                    elif sock in busy:
                        self._worker_said(busy[sock])
                    else:
                        self._accept_tcp(sock)
                self._retire_idle()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _over_limit(self, uid: int | None) -> str | None:
        """Why one more connection of ``uid`` (None: an unauthenticated TCP peer) is refused."""
        total, per_user = self.config.max_connections, self.config.max_connections_per_user
        if total and len(self.children) >= total:
            return f"the daemon is serving its limit of {total} connections (max-connections)"
        if per_user and sum(1 for u in self.children.values() if u == uid) >= per_user:
            who = "unauthenticated TCP peers" if uid is None else "you"
            return (f"too many connections: {who} already have {per_user} open "
                    f"(max-connections-per-user)")
        return None

    def _log_refusal(self, uid: int | None, what: str, reason: str) -> None:
        now = time.monotonic()
        last, count = self._refused_log.get(uid, (-_LOG_QUIET, 0))
        if now - last >= _LOG_QUIET:
            more = f" ({count} more refused since the last report)" if count else ""
            log.warning("refused connection from %s: %s%s", what, reason, more)
            self._refused_log[uid] = (now, 0)
        else:
            self._refused_log[uid] = (last, count + 1)

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        """Tell the peer ``reason`` in a handshake of its own, in a short-lived child."""
        if len(self.refusers) >= _MAX_REFUSERS:
            conn.close()
            return
        try:
            pid = os.fork()
        except OSError:
            conn.close()
            return
        if pid == 0:
            code = 1
            try:
                self._enter_child()
                signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the deadline kills us
                signal.setitimer(signal.ITIMER_REAL, _REFUSAL_DEADLINE)
                with conn:
                    Session(None, conn.makefile("rb"), conn.sendall, trusted=False,
                            config=self.config).run(startup_error=reason)
                code = 0
            except BaseException:  # noqa: BLE001 -- a child must never return into the accept loop
                pass
            finally:
                os._exit(code)
        conn.close()
        self.refusers.add(pid)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        try:
            conn.setblocking(True)
            peer = PeerInfo.of_socket(conn)
            refusal = self.config.refusal(peer)
            if refusal:
                log.warning("refused connection: %s", refusal)
                conn.close()
                return
            limit = self._over_limit(peer.uid)
            if limit:
                self._log_refusal(peer.uid, peer.describe(), limit)
                self._refuse(conn, limit)
                return
            trusted = self.config.is_trusted(peer)
            pid = self._hand_to_idle(conn, peer.uid, trusted)
            if pid is None:
                ours, theirs = socket.socketpair()
                try:
                    pid = os.fork()
                except OSError:
                    ours.close()
                    theirs.close()
                    raise
                if pid == 0:
                    ours.close()
                    self._child(conn, peer, trusted, ctl=theirs)  # never returns
                theirs.close()
                self.workers[pid] = Worker(pid, ours, peer.uid)
        except OSError as e:
            log.error("cannot serve a connection: %s", e)
            conn.close()
            return
        conn.close()
        self.children[pid] = peer.uid
        log.info("connection from %s%s: child %d", peer.describe(),
                 " (trusted)" if trusted else "", pid)

    def _hand_to_idle(self, conn: socket.socket, uid: int, trusted: bool) -> int | None:
        """Pass ``conn`` to an idle worker of ``uid`` (see :mod:`.workers`); its pid, or None."""
        for i in range(len(self.idle) - 1, -1, -1):
            w = self.idle[i]
            if w.uid != uid:
                continue
            del self.idle[i]
            if w.hand(conn, trusted):
                return w.pid
            self._forget(w)
        return None

    def _worker_said(self, w: Worker) -> None:
        """A busy worker is idle (its connection is over), or is exiting."""
        try:
            data = w.ctl.recv(16)
        except OSError:
            data = b""
        if data == b"R":
            self.children.pop(w.pid, None)
            w.idle_since = time.monotonic()
            self.idle.append(w)
        else:
            self._forget(w)  # (it exits; reaped as a child)

    def _forget(self, w: Worker) -> None:
        w.retire()
        self.workers.pop(w.pid, None)
        with suppress(ValueError):
            self.idle.remove(w)

    def _retire_idle(self) -> None:
        now = time.monotonic()
        while self.idle and (len(self.idle) > MAX_IDLE or now - self.idle[0].idle_since > IDLE_KEEP):
            self._forget(self.idle[0])

    def _accept_tcp(self, listener: socket.socket) -> None:
        try:
            conn, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        label = peer_label(addr)
        limit = self._over_limit(None)
        if limit:
            # Before authentication there is no one to tell in a way they could trust.
            self._log_refusal(None, f"TCP {label}", limit)
            conn.close()
            return
        try:
            conn.setblocking(True)
            pid = os.fork()
        except OSError as e:
            log.error("cannot serve a TCP connection: %s", e)
            conn.close()
            return
        if pid == 0:
            self._child(conn, None, False, tcp_label=label)  # never returns
        conn.close()
        self.children[pid] = None
        log.info("TCP connection from %s: child %d", label, pid)

    def _enter_child(self) -> None:
        """In a forked connection process: drop the parent's listeners and database, and
        die of the signals the parent handles."""
        for sock in (self.listener, *self.tcp_listeners):
            sock.close()
        for w in self.workers.values():
            w.ctl.close()  # (the other workers' control sockets)
        self.workers, self.idle = {}, []
        self.keeper.close_in_child()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def _child(self, conn: socket.socket, peer: PeerInfo | None, trusted: bool,
               tcp_label: str | None = None, ctl: socket.socket | None = None) -> None:
        """A connection process: serve ``conn``; a Unix one (``ctl``) may then serve
        more connections of the same user (:mod:`.workers`)."""
        code = 1
        try:
            self._enter_child()
            if tcp_label is not None:
                with conn:
                    peer, trusted, rfile, write = self._authenticate(conn, conn.makefile("rb"), tcp_label)
                    if peer is not None:
                        _serve_one(self.layout, rfile, write, trusted=trusted,
                                   config=self.config, peer=peer, settings=self.settings,
                                   build=self.build)
            else:
                assert peer is not None and ctl is not None
                self._serve_unix(conn, peer, trusted)
                with ctl:
                    serve_more(ctl, peer.uid, lambda c, t: self._serve_unix(c, PeerInfo.of_socket(c), t))
            code = 0
        except BaseException:  # noqa: BLE001 -- a child must never return into the accept loop
            with suppress(BaseException):
                log.exception("connection handler failed")
        finally:
            with suppress(BaseException):
                logging.shutdown()
            os._exit(code)

    def _serve_unix(self, conn: socket.socket, peer: PeerInfo, trusted: bool) -> None:
        rfile = conn.makefile("rb")
        try:
            _serve_one(self.layout, rfile, conn.sendall, trusted=trusted, config=self.config,
                       peer=peer, settings=self.settings, build=self.build)
        finally:
            rfile.close()  # (else the fd outlives conn.close(): the client would wait)
            conn.close()

    def _authenticate(self, conn: socket.socket, rfile, label: str):
        """(peer, trusted, read stream, write) of a TCP connection; peer None if refused."""
        try:
            peer, k_in, k_out = authenticate(conn, rfile, label, TcpKeys(self.layout.state_dir),
                                             self.config)
        except TcpRefused as e:
            log.warning("%s", e)
            return None, False, rfile, conn.sendall
        trusted = self.config.is_trusted(peer)
        log.info("TCP connection from %s authenticated as %s%s", label, peer.describe(),
                 " (trusted)" if trusted else "")
        channel = SealedChannel(conn, rfile, k_in, k_out)
        return peer, trusted, channel, channel.write

    def _reap(self) -> None:
        while self.children or self.refusers or self.workers:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                self.refusers.clear()
                return
            if pid == 0:
                return
            self.children.pop(pid, None)
            self.refusers.discard(pid)
            w = self.workers.get(pid)
            if w is not None:
                self._forget(w)

    def stop_children(self) -> None:
        """Ask every child to stop; kill those still running after the grace period."""
        for w in list(self.workers.values()):
            # Idle ones read end of file and exit; busy ones exit after their
            # connection instead of waiting for another.
            if w in self.idle:
                self.children[w.pid] = w.uid  # (waited for below, like the busy ones)
            self._forget(w)
        for pid in list(self.children) + list(self.refusers):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while self.children and time.monotonic() < deadline:
            self._reap()
            if self.children:
                time.sleep(0.05)
        for pid in list(self.children) + list(self.refusers):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children or self.refusers:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.pop(pid, None)
            self.refusers.discard(pid)
