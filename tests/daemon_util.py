"""Test helpers for the daemon: a protocol client, a conversation decoder, daemon processes.

The decoder reads a client->daemon byte stream request by request (so it knows
which response shape follows) and the daemon->client stream message by
message, using only :mod:`storekeeper.formats.wire`.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from storekeeper.daemon.session import Session
from storekeeper.formats.storepath import StoreDir
from storekeeper.formats.wire import (
    PROTOCOL_1_34,
    PROTOCOL_VERSION,
    WORKER_MAGIC_1,
    WORKER_MAGIC_2,
    FramedReader,
    Stderr,
    WireError,
    WireReader,
    WireWriter,
    read_path_info,
    read_stderr_message,
)

SD = StoreDir("/nix/store")
#: ../shared beside the checkout (tests never name a machine's absolute path)
SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
CAPTURES = os.path.join(SHARED, "spec", "wire-captures")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def load_capture(name: str) -> tuple[bytes, bytes]:
    out = []
    for direction in ("c2s", "s2c"):
        with open(os.path.join(CAPTURES, f"{name}.{direction}.hex")) as f:
            out.append(bytes.fromhex("".join(f.read().split())))
    return out[0], out[1]


# --- requests (client -> daemon) ----------------------------------------------

def _nar(r: WireReader) -> int:
    """Skip one NAR token by token; returns its length."""
    start = r.offset
    assert r.string() == "nix-archive-1"

    def node() -> None:
        assert r.string() == "("
        assert r.string() == "type"
        kind = r.string()
        if kind == "regular":
            tok = r.string()
            if tok == "executable":
                r.string()
                tok = r.string()
            assert tok == "contents"
            r.bytes()
            assert r.string() == ")"
        elif kind == "symlink":
            assert r.string() == "target"
            r.string()
            assert r.string() == ")"
        else:
            while (tok := r.string()) != ")":
                assert tok == "entry" and r.string() == "(" and r.string() == "name"
                r.string()
                assert r.string() == "node"
                node()
                assert r.string() == ")"

    node()
    return r.offset - start


def _framed(r: WireReader) -> bytes:
    return FramedReader(r).read()


class UnknownOp(Exception):
    pass


def read_request(r: WireReader, op: int) -> dict:
    """The request fields of ``op`` (after the opcode)."""
    if op in (1, 3, 4, 5, 6, 10, 11, 12, 18, 21, 22, 26, 28, 29, 33, 38, 41, 42, 43):
        return {"arg": r.string()}
    if op in (13, 14, 23, 27, 34):
        return {}
    if op == 19:
        return {"fields": [r.u64() for _ in range(12)], "overrides": r.string_map()}
    if op == 31:
        return {"paths": r.strings(), "substitute": r.u64()}
    if op == 32:
        return {"paths": r.strings()}
    if op == 30:
        return {"paths": r.string_map()}
    if op == 7:
        return {"name": r.string(), "cam": r.string(), "refs": r.strings(), "repair": r.boolean(),
                "payload": _framed(r)}
    if op == 8:
        return {"name": r.string(), "text": r.string(), "refs": r.strings()}
    if op == 16:
        return {"path": r.string(), "sign": r.u64()}
    if op == 39:
        info = read_path_info(r, SD)
        return {"info": info, "repair": r.boolean(), "dontCheckSigs": r.boolean(), "payload": _framed(r)}
    if op == 44:
        d = {"repair": r.boolean(), "dontCheckSigs": r.boolean()}
        inner = WireReader(io.BytesIO(_framed(r)))
        items: list | str = []
        try:
            for _ in range(inner.u64()):
                items.append((read_path_info(inner, SD), _nar(inner)))
        except (WireError, AssertionError):
            items = "malformed"
        d["items"] = items
        return d
    if op in (9, 46):
        return {"paths": r.strings(), "mode": r.u64()}
    if op == 40:
        return {"targets": r.strings()}
    if op == 35:
        return {"checkContents": r.boolean(), "repair": r.boolean()}
    if op == 37:
        return {"path": r.string(), "sigs": r.strings()}
    if op == 20:
        return {"action": r.u64(), "paths": r.strings(), "ignoreLiveness": r.boolean(),
                "maxFreed": r.u64(), "obsolete": [r.u64(), r.u64(), r.u64()]}
    if op == 45:
        return {"drv": r.string(), "log": _framed(r)}
    if op == 36:
        drv = r.string()
        outputs = {r.string(): (r.string(), r.string(), r.string()) for _ in range(r.u64())}
        return {"drv": drv, "outputs": outputs, "inputSrcs": r.strings(), "platform": r.string(),
                "builder": r.string(), "args": r.strings(), "env": r.string_map(), "mode": r.u64()}
    raise UnknownOp(f"no request decoder for op {op}")


# --- responses (daemon -> client) ----------------------------------------------

def _info_dict(info) -> dict:
    return {"path": SD.print(info.path), "deriver": SD.print(info.deriver) if info.deriver else "",
            "narHash": info.nar_hash.base16, "references": sorted(SD.print(p) for p in info.references),
            "registrationTime": info.registration_time, "narSize": info.nar_size,
            "ultimate": info.ultimate, "sigs": sorted(info.sigs), "ca": info.ca or ""}


def read_response(r: WireReader, op: int):
    if op in (1, 3, 9, 10, 11, 12, 13, 16, 34, 35, 37, 45):
        return r.u64()
    if op in (4, 8, 18, 29):
        return r.string()
    if op in (5, 6, 22, 23, 28, 31, 32, 33, 43):
        return r.strings()
    if op in (19, 39, 42, 44):
        return None
    if op == 21:
        found = r.u64()
        return (found, r.string(), r.strings(), r.u64(), r.u64()) if found else (found,)
    if op == 26:
        if not r.boolean():
            return {"valid": False}
        placeholder = SD.parse("/nix/store/00000000000000000000000000000000-x")
        d = _info_dict(read_path_info(r, SD, path=placeholder))
        del d["path"]
        return {"valid": True, **d}
    if op == 7:
        return _info_dict(read_path_info(r, SD))
    if op == 41:
        return r.string_map()
    if op == 40:
        return {"willBuild": r.strings(), "willSubstitute": r.strings(), "unknown": r.strings(),
                "downloadSize": r.u64(), "narSize": r.u64()}
    if op == 30:
        return [(r.string(), r.string(), r.strings(), r.u64(), r.u64()) for _ in range(r.u64())]
    if op == 38:
        return _nar(r)
    if op == 46:
        return [(r.string(), r.u64(), r.string(), r.u64(), r.boolean(), r.u64(), r.u64(), r.string_map())
                for _ in range(r.u64())]
    if op == 14:
        return [(r.string(), r.string()) for _ in range(r.u64())]
    if op == 36:
        return (r.u64(), r.string(), r.u64(), r.boolean(), r.u64(), r.u64(), r.string_map())
    if op == 20:
        return (r.strings(), r.u64(), r.u64())
    raise ValueError(f"no response decoder for op {op}")


def read_log(r: WireReader) -> tuple[bool, list]:
    """Log messages up to LAST (True) or ERROR (False)."""
    msgs = []
    while True:
        m = read_stderr_message(r)
        if m.kind is Stderr.LAST:
            return True, msgs
        msgs.append(m)
        if m.kind is Stderr.ERROR:
            return False, msgs


@dataclass
class Exchange:
    op: int
    request: dict
    ok: bool
    messages: list = field(default_factory=list)
    response: object = None


@dataclass
class Conversation:
    version: str
    exchanges: list[Exchange]
    trailing_errors: int  # further STDERR_ERRORs after a failed request (the real daemon sends 2)
    server_bytes_left: int


def decode(c2s: bytes, s2c: bytes) -> Conversation:
    c, s = WireReader(io.BytesIO(c2s)), WireReader(io.BytesIO(s2c))
    assert c.u64() == WORKER_MAGIC_1
    assert s.u64() == WORKER_MAGIC_2
    daemon_version = s.u64()
    assert daemon_version in (PROTOCOL_1_34, PROTOCOL_VERSION)  # (real 2.8, or ours)
    client_version = c.u64()
    minor = min(daemon_version, client_version) & 0xFF
    if minor >= 38:
        c.strings()
        s.strings()
    if c.u64():
        c.u64()
    c.u64()
    version = s.string()
    if minor >= 35:
        s.u64()  # trust
    ok, _ = read_log(s)
    assert ok
    exchanges: list[Exchange] = []
    trailing = 0
    while c.offset < len(c2s):
        op = c.u64()
        try:
            request = read_request(c, op)
        except UnknownOp:
            request = {"unknown": True}
        ok, msgs = read_log(s)
        ex = Exchange(op, request, ok, msgs)
        exchanges.append(ex)
        if ok:
            ex.response = read_response(s, op)
        elif "unknown" in request:
            while s.offset < len(s2c):
                more_ok, _ = read_log(s)
                assert not more_ok
                trailing += 1
            break
    return Conversation(version, exchanges, trailing, len(s2c) - s.offset)


def normalise(conv: Conversation) -> list:
    """A comparable form: registration times zeroed, activity ids renumbered,
    ANSI colours dropped from errors, consecutive STDERR_WRITEs joined."""
    ids: dict[int, int] = {}

    def act(i: int) -> int:
        return ids.setdefault(i, len(ids) + 1)

    out = []
    for ex in conv.exchanges:
        msgs: list = []
        for m in ex.messages:
            if m.kind is Stderr.WRITE and msgs and msgs[-1][0] == "WRITE":
                msgs[-1] = ("WRITE", msgs[-1][1] + m.payload)
            elif m.kind is Stderr.WRITE:
                msgs.append(("WRITE", m.payload))
            elif m.kind is Stderr.ERROR:
                msgs.append(("ERROR", strip_ansi(m.payload.message), m.payload.traces))
            elif m.kind is Stderr.START_ACTIVITY:
                i, lvl, typ, text, fields, parent = m.payload
                msgs.append(("START", act(i), lvl, typ, text, fields, act(parent) if parent else 0))
            elif m.kind is Stderr.STOP_ACTIVITY:
                msgs.append(("STOP", act(m.payload)))
            elif m.kind is Stderr.RESULT:
                i, typ, fields = m.payload
                msgs.append(("RESULT", act(i), typ, fields))
            else:
                msgs.append((m.kind.name, m.payload))
        resp = ex.response
        if isinstance(resp, dict) and "registrationTime" in resp:
            resp = {**resp, "registrationTime": 0}
        out.append((ex.op, ex.ok, msgs, resp))
    return out


# --- a live client ---------------------------------------------------------------

class DaemonError(Exception):
    pass


class Client:
    """A minimal worker-protocol client over a connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._rfile = sock.makefile("rb")
        self.r = WireReader(self._rfile)
        self.version = ""

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0) -> "Client":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        return cls(s)

    def send(self, w: WireWriter | bytes) -> None:
        self.sock.sendall(w.take() if isinstance(w, WireWriter) else w)

    def handshake(self, set_options: bool = True, version: int = PROTOCOL_1_34,
                  features: tuple[str, ...] = ()) -> "Client":
        """As a client announcing ``version`` (default: Nix 2.8's 1.34) would; at 1.38
        offering ``features`` (those both sides offered end up in ``self.features``)."""
        self.send(WireWriter().u64(WORKER_MAGIC_1).u64(version))
        assert self.r.u64() == WORKER_MAGIC_2
        self.daemon_version = self.r.u64()
        assert self.daemon_version in (PROTOCOL_1_34, PROTOCOL_VERSION)  # (real 2.8, or ours)
        self.minor = min(version, self.daemon_version) & 0xFF
        self.features: set[str] = set()
        if self.minor >= 38:
            self.send(WireWriter().strings(list(features)))
            self.features = set(self.r.strings()) & set(features)
        self.send(WireWriter().u64(0).u64(0))
        self.version = self.r.string()
        self.trust = self.r.u64() if self.minor >= 35 else None
        ok, msgs = read_log(self.r)
        if not ok:
            raise DaemonError(msgs[-1].payload.message)
        if set_options:
            self.op(WireWriter().u64(19).u64(0).u64(0).u64(0).u64(3).u64(1).u64(0).u64(1).u64(0)
                    .u64(0).u64(0).u64(1).u64(1).string_map({}), 19)
        return self

    def op(self, request: WireWriter, op: int):
        """Send a whole request (opcode included); return (messages, response)."""
        self.send(request)
        ok, msgs = read_log(self.r)
        if not ok:
            raise DaemonError(msgs[-1].payload.message)
        return msgs, read_response(self.r, op)

    def close(self) -> None:
        # The makefile() object keeps the socket open until it is closed too.
        self._rfile.close()
        self.sock.close()


# --- daemon processes --------------------------------------------------------------

def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.02)
    raise RuntimeError(f"daemon socket {path} did not appear")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def our_daemon_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "storekeeper.daemon", *args]


def start_daemon(kind: str, root: str, sock: str, env: dict[str, str], *args: str,
                 log=subprocess.DEVNULL, cwd: str | None = None) -> subprocess.Popen:
    """Our daemon (``kind="ours"``) or the real ``nix-daemon`` (``"nix"``, configured by
    ``env``'s nix.conf) serving the chroot store ``root`` on ``sock``; returns once it
    accepts connections.  Stop it with :func:`stop_process`.

    The real daemon gets its store initialised first: Nix 2.8's connection
    processes race to create a fresh store, so two first connections can fail
    ("database is busy", "creating symlink …: File exists").
    """
    env = dict(env)
    if kind == "ours":
        cmd = our_daemon_cmd("--store", root, "--socket", sock, *args)
    else:
        subprocess.run(["nix-store", "--store", root, "--init"], env=env, check=True,
                       capture_output=True, timeout=60)
        cmd = ["nix-daemon", "--store", root, *args]
        env["NIX_DAEMON_SOCKET_PATH"] = sock
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        wait_for_socket(sock, proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def run_session(store, c2s: bytes, trusted: bool = True, config=None, peer=None,
                timeout: float = 20.0) -> bytes:
    """Feed ``c2s`` to an in-process Session over a socketpair (in a thread) and return
    everything it answered."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(timeout)

    def serve() -> None:
        try:
            Session(store, ours.makefile("rb"), ours.sendall, trusted=trusted, config=config,
                    peer=peer).run()
        finally:
            ours.close()

    def feed() -> None:
        try:
            theirs.sendall(c2s)
            theirs.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threads = [threading.Thread(target=serve), threading.Thread(target=feed)]
    for t in threads:
        t.start()
    out = bytearray()
    while chunk := theirs.recv(65536):
        out += chunk
    for t in threads:
        t.join(timeout)
    theirs.close()
    return bytes(out)
