"""How the client reaches a daemon: a Unix socket, ``daemon --stdio`` over ssh, or TCP.

Each transport hands :class:`~storekeeper.client.remote.RemoteStore` one
connected stream socket that carries the worker protocol as is, so the store
code is the same for all three:

* :class:`UnixTransport`: the daemon's socket; the kernel tells the daemon who we are.
* :class:`SshTransport`: one end of a socket pair is ssh's stdin and stdout;
  ssh runs ``REMOTE_PROGRAM --stdio`` on the other host as the user it logs
  in, and that process relays to the daemon there (which sees that user).
  The ssh command is ``$STOREKEEPER_SSH`` (split like a shell would; default
  ``ssh``) followed by ``$NIX_SSHOPTS``, so tests and unusual setups can
  substitute their own.
* :class:`TcpTransport`: authenticates with the key file (``formats.tcpauth``),
  then two threads move the bytes between one end of a socket pair and the
  sealed TCP stream.  A frame that does not verify ends the connection, and
  :meth:`Transport.failure` says so.
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import subprocess
import threading
from contextlib import suppress
from typing import BinaryIO, Mapping

from ..errors import StoreError
from ..formats import tcpauth
from ..formats.errors import FormatError
from ..formats.url import DaemonAddress, SshAddress, TcpAddress
from ..formats.wire import WireEOF, WireReader
from ..fs.private import read_key_file

_CHUNK = 1 << 16
_AUTH_TIMEOUT = 30.0
_REAP_WAIT = 5.0


def default_tcp_key_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"),
                                                       ".config")
    return os.path.join(base, "storekeeper", "tcp-key")


class Transport:
    """Opens the one stream a :class:`RemoteStore` uses, and cleans up after it."""

    #: the URL shown in messages
    url = ""
    #: what messages call the daemon's address (the socket path, else the URL)
    where = ""

    def open(self, timeout: float | None) -> socket.socket:
        raise NotImplementedError

    def failure(self) -> str | None:
        """Why the stream ended, if the transport knows better than "end of stream"."""
        return None

    def close(self) -> None:
        """After the stream is closed: release what the transport holds."""


class UnixTransport(Transport):
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.url = f"unix://{socket_path}"
        self.where = socket_path

    def open(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            raise StoreError(f"cannot connect to the daemon at '{self.socket_path}': "
                             f"{e.strerror or e}") from None
        return sock


class SshTransport(Transport):
    def __init__(self, address: SshAddress, env: Mapping[str, str] | None = None) -> None:
        self.address = address
        self.env = os.environ if env is None else env
        self.url = self.where = address.url
        self._proc: subprocess.Popen | None = None
        self._status: int | None = None

    def command(self) -> list[str]:
        a = self.address
        ssh = shlex.split(self.env.get("STOREKEEPER_SSH") or "ssh")
        if not ssh:
            raise StoreError("STOREKEEPER_SSH is empty")
        args = [*ssh, "-x", "-a"]
        if a.ssh_key:
            args += ["-i", a.ssh_key]
        if a.port:
            args += ["-p", str(a.port)]
        args += shlex.split(self.env.get("NIX_SSHOPTS", ""))
        remote = f"{a.remote_program} --stdio"
        if a.remote_store:
            remote += f" --store {shlex.quote(a.remote_store)}"
        # ssh hands the command to the remote user's shell as one string.
        return [*args, "--", f"{a.user}@{a.host}" if a.user else a.host, remote]

    def open(self, timeout: float | None) -> socket.socket:
        cmd = self.command()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(cmd, stdin=theirs.fileno(), stdout=theirs.fileno(),
                                          close_fds=True)
        except OSError as e:
            ours.close()
            raise StoreError(f"cannot run '{cmd[0]}' to reach {self.url}: {e.strerror or e}") from None
        finally:
            theirs.close()
        ours.settimeout(timeout)
        return ours

    def failure(self) -> str | None:
        proc = self._proc
        if proc is not None:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(0.5)
            self._status = proc.returncode
        if self._status not in (None, 0):
            return f"'{os.path.basename(self.command()[0])}' exited with status {self._status}"
        return None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(_REAP_WAIT)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(_REAP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._status = proc.returncode


class TcpTransport(Transport):
    def __init__(self, address: TcpAddress, env: Mapping[str, str] | None = None) -> None:
        self.address = address
        self.key_file = address.key_file or default_tcp_key_path(env)
        self.url = self.where = address.url
        self._tcp: socket.socket | None = None
        self._rfile: BinaryIO | None = None
        self._local: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._failure: str | None = None

    def _key(self) -> tuple[str, bytes]:
        try:
            return read_key_file(self.key_file, os.geteuid())
        except FileNotFoundError:
            raise StoreError(f"no TCP key at '{self.key_file}': run 'storekeeper tcp-key issue' "
                             f"on the daemon's host and copy the file here (mode 0600)") from None
        except OSError as e:
            raise StoreError(f"cannot read the TCP key '{self.key_file}': {e.strerror or e}") from None

    def open(self, timeout: float | None) -> socket.socket:
        user, key = self._key()
        a = self.address
        try:
            tcp = socket.create_connection((a.host, a.port), timeout=timeout or _AUTH_TIMEOUT)
        except OSError as e:
            raise StoreError(f"cannot connect to the daemon at {self.url}: {e.strerror or e}") from None
        rfile = tcp.makefile("rb")
        try:
            c2s, s2c = self._authenticate(tcp, rfile, user, key)
            tcp.settimeout(None)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except BaseException:
            rfile.close()
            tcp.close()
            raise
        ours, local = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._tcp, self._rfile, self._local = tcp, rfile, local
        self._threads = [
            threading.Thread(target=self._up, args=(local, tcp, tcpauth.Sealer(c2s)),
                             name="storekeeper-tcp-up", daemon=True),
            threading.Thread(target=self._down, args=(tcpauth.Opener(s2c, rfile), local, tcp),
                             name="storekeeper-tcp-down", daemon=True),
        ]
        for t in self._threads:
            t.start()
        ours.settimeout(timeout)
        return ours

    def _authenticate(self, tcp: socket.socket, rfile, user: str, key: bytes) -> tuple[bytes, bytes]:
        r = WireReader(rfile)
        cnonce = secrets.token_bytes(tcpauth.NONCE_LEN)
        try:
            tcp.sendall(tcpauth.hello(user, cnonce))
            snonce = tcpauth.read_challenge(r)
            t = tcpauth.transcript(user, cnonce, snonce)
            tcp.sendall(tcpauth.proof_message(tcpauth.client_proof(key, t)))
            accepted, payload = tcpauth.read_verdict(r)
        except WireEOF:
            raise StoreError(f"cannot authenticate to the daemon at {self.url}: it closed the "
                             f"connection (is this a storekeeper TCP listener?)") from None
        except (FormatError, OSError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise StoreError(f"cannot authenticate to the daemon at {self.url}: {why}") from None
        if not accepted:
            raise StoreError(f"the daemon at {self.url} refused the connection: "
                             f"{payload.decode('utf-8', 'replace')}")
        if not tcpauth.proofs_equal(payload, tcpauth.server_proof(key, t)):
            raise StoreError(f"the daemon at {self.url} did not prove that it issued the key in "
                             f"'{self.key_file}': not the daemon you meant?")
        return tcpauth.session_keys(key, t)

    def _up(self, local: socket.socket, tcp: socket.socket, sealer: tcpauth.Sealer) -> None:
        try:
            while data := local.recv(_CHUNK):
                tcp.sendall(sealer.seal(data))
        except OSError:
            pass
        with suppress(OSError):
            tcp.shutdown(socket.SHUT_WR)

    def _down(self, opener: tcpauth.Opener, local: socket.socket, tcp: socket.socket) -> None:
        try:
            while frame := opener.next_frame():
                local.sendall(frame)
        except FormatError as e:
            self._failure = f"the stream from the daemon was tampered with or broken ({e})"
            with suppress(OSError):
                tcp.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with suppress(OSError):
            local.shutdown(socket.SHUT_WR)

    def failure(self) -> str | None:
        return self._failure

    def close(self) -> None:
        tcp, local, self._tcp, self._local = self._tcp, self._local, None, None
        if tcp is not None:
            with suppress(OSError):
                tcp.shutdown(socket.SHUT_RDWR)
        if local is not None:
            with suppress(OSError):
                local.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(_REAP_WAIT)
        self._threads = []
        if self._rfile is not None:
            self._rfile.close()
            self._rfile = None
        for sock in (tcp, local):
            if sock is not None:
                sock.close()


def transport_for(address: DaemonAddress, env: Mapping[str, str] | None = None) -> Transport:
    if isinstance(address, SshAddress):
        return SshTransport(address, env)
    if isinstance(address, TcpAddress):
        return TcpTransport(address, env)
    return UnixTransport(address.socket_path)
