"""storekeeper's TCP authentication and sealed stream (pure: no sockets, no files).

A TCP peer has no kernel credentials, so before the worker protocol it proves
that it holds the secret the daemon issued to one local user (see
``store.tcpkeys``).  The exchange, in the worker protocol's encoding (u64
little-endian; strings length-prefixed and padded to 8 bytes):

1. client: ``u64 CLIENT_MAGIC``, ``u64 VERSION``, string *user*, string *cnonce* (32 random bytes)
2. daemon: ``u64 SERVER_MAGIC``, ``u64 VERSION``, string *snonce* (32 fresh random bytes)
3. client: string ``HMAC-SHA256(key, "…client-proof" ‖ T)``
4. daemon: ``u64 0`` and string ``HMAC-SHA256(key, "…server-proof" ‖ T)``;
   or ``u64 1`` and a one-line reason, then it closes.

``T`` (the transcript) is user, cnonce and snonce, each as a wire string.
The key never crosses the wire; a recorded proof is useless against the next
connection's nonce (replay); the daemon's proof shows the client it reached
the daemon that issued the key.

After step 4 both directions are **sealed**: frames of ``u32 length`` (1 ..
:data:`MAX_FRAME`, little-endian), the bytes, and a 16-byte tag
``HMAC-SHA256(k_dir, u64 seq ‖ u32 length ‖ bytes)[:16]``, where ``k_dir``
is ``HMAC(key, "…c2s" ‖ T)`` or ``HMAC(key, "…s2c" ‖ T)`` and ``seq``
counts the frames of that direction from 0.  Bytes cannot be changed,
injected, dropped, reordered or replayed between connections without the
reader noticing; they are *not* encrypted (store contents are readable by
every local user anyway).  A bad tag ends the connection.
"""

from __future__ import annotations

import hashlib
import hmac

from .errors import FormatError
from .streams import Readable
from .wire import WireEOF, WireReader, WireWriter, string_bytes

CLIENT_MAGIC = 0x31687475616B7331  # "1skauth1" little-endian: not a Nix magic
SERVER_MAGIC = 0x32687475616B7332
VERSION = 1
NONCE_LEN = 32
KEY_LEN = 32
TAG_LEN = 16
MAX_FRAME = 1 << 20
MAX_USER_LEN = 256
MAX_REASON_LEN = 4096

OK = 0
REFUSED = 1

_LABEL = b"storekeeper-tcp-auth-1 "


class AuthError(FormatError):
    """The authentication exchange or a sealed frame is malformed or does not verify."""


def _mac(key: bytes, label: str, transcript: bytes) -> bytes:
    return hmac.new(key, _LABEL + label.encode() + b"\0" + transcript, hashlib.sha256).digest()


def transcript(user: str, cnonce: bytes, snonce: bytes) -> bytes:
    return string_bytes(user) + string_bytes(cnonce) + string_bytes(snonce)


def client_proof(key: bytes, t: bytes) -> bytes:
    return _mac(key, "client-proof", t)


def server_proof(key: bytes, t: bytes) -> bytes:
    return _mac(key, "server-proof", t)


def session_keys(key: bytes, t: bytes) -> tuple[bytes, bytes]:
    """(client-to-daemon, daemon-to-client) sealing keys."""
    return _mac(key, "c2s", t), _mac(key, "s2c", t)


def proofs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# --- the messages ---------------------------------------------------------------

def hello(user: str, cnonce: bytes) -> bytes:
    return WireWriter().u64(CLIENT_MAGIC).u64(VERSION).string(user).string(cnonce).take()


def read_hello(r: WireReader) -> tuple[str, bytes]:
    """(user, cnonce) of a client hello; the magic has been read already."""
    version = r.u64("auth version")
    if version != VERSION:
        raise AuthError(f"TCP authentication version {version} is not supported (this daemon: {VERSION})")
    user = r.string("user name", MAX_USER_LEN)
    cnonce = r.bytes("client nonce", NONCE_LEN)
    if len(cnonce) != NONCE_LEN:
        raise AuthError("the client nonce must be 32 bytes")
    return user, cnonce


def challenge(snonce: bytes) -> bytes:
    return WireWriter().u64(SERVER_MAGIC).u64(VERSION).string(snonce).take()


def read_challenge(r: WireReader) -> bytes:
    if r.u64("auth magic") != SERVER_MAGIC:
        raise AuthError("this is not a storekeeper TCP listener (no authentication challenge)")
    if r.u64("auth version") != VERSION:
        raise AuthError("the daemon speaks another TCP authentication version")
    snonce = r.bytes("daemon nonce", NONCE_LEN)
    if len(snonce) != NONCE_LEN:
        raise AuthError("the daemon nonce must be 32 bytes")
    return snonce


def proof_message(proof: bytes) -> bytes:
    return string_bytes(proof)


def read_proof(r: WireReader) -> bytes:
    return r.bytes("proof", 64)


def verdict_ok(proof: bytes) -> bytes:
    return WireWriter().u64(OK).string(proof).take()


def verdict_refused(reason: str) -> bytes:
    return WireWriter().u64(REFUSED).string(reason[:MAX_REASON_LEN]).take()


def read_verdict(r: WireReader) -> tuple[bool, bytes]:
    """(accepted, daemon proof or reason)."""
    status = r.u64("auth verdict")
    if status not in (OK, REFUSED):
        raise AuthError(f"unknown authentication verdict {status}")
    return status == OK, r.bytes("auth verdict", MAX_REASON_LEN)


# --- sealed frames --------------------------------------------------------------

class Sealer:
    """Seals the bytes of one direction into frames (see module docstring)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._seq = 0

    def seal(self, data: bytes) -> bytes:
        out = bytearray()
        view = memoryview(data)
        while view:
            chunk, view = bytes(view[:MAX_FRAME]), view[MAX_FRAME:]
            head = len(chunk).to_bytes(4, "little")
            tag = hmac.new(self._key, self._seq.to_bytes(8, "little") + head + chunk,
                           hashlib.sha256).digest()[:TAG_LEN]
            self._seq += 1
            out += head + chunk + tag
        return bytes(out)


class Opener:
    """Reads and checks the frames of one direction from a stream with ``read(n)``."""

    def __init__(self, key: bytes, stream: Readable) -> None:
        self._key = key
        self._seq = 0
        self._r = WireReader(stream)

    def next_frame(self) -> bytes:
        """The next frame's bytes; b"" at a clean end of stream (between frames)."""
        try:
            head = self._r.read_exact(1, "frame header")
        except WireEOF:
            return b""
        head += self._r.read_exact(3, "frame header")
        n = int.from_bytes(head, "little")
        if not 0 < n <= MAX_FRAME:
            raise AuthError(f"sealed frame of {n} bytes (limit {MAX_FRAME})")
        data = self._r.read_exact(n, "sealed frame")
        tag = self._r.read_exact(TAG_LEN, "frame tag")
        want = hmac.new(self._key, self._seq.to_bytes(8, "little") + head + data,
                        hashlib.sha256).digest()[:TAG_LEN]
        if not hmac.compare_digest(tag, want):
            raise AuthError(f"sealed frame {self._seq} does not verify (changed on the way)")
        self._seq += 1
        return data


# --- key files ---------------------------------------------------------------------
# A key file, on the daemon's side and the client's alike, is text:
#
#     # a comment
#     user alice
#     key <64 hex digits: 32 random bytes>

KEY_BYTES = 32


def format_key_file(user: str, key: bytes, comment: str = "") -> bytes:
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"user {user}", f"key {key.hex()}"]
    return ("\n".join(lines) + "\n").encode()


def parse_key_file(text: bytes, where: str) -> tuple[str, bytes]:
    """(user, key) from a key file's bytes; a clear error for anything else."""
    user = key = None
    try:
        lines = text.decode().splitlines()
    except UnicodeDecodeError:
        raise AuthError(f"key file '{where}' is not text") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        value = value.strip()
        if name == "user" and value and user is None:
            user = value
        elif name == "key" and key is None:
            try:
                key = bytes.fromhex(value)
            except ValueError:
                key = b""
            if len(key) != KEY_BYTES:
                raise AuthError(f"key file '{where}' line {n}: the key must be {KEY_BYTES * 2} hex digits")
        else:
            raise AuthError(f"key file '{where}' line {n}: unexpected '{line[:40]}'")
    if user is None or key is None:
        raise AuthError(f"key file '{where}' needs a 'user' and a 'key' line")
    return user, key
