"""Fuzz the daemon's request decoding: mutated captured requests through an in-process Session.

    .venv/bin/python bench/fuzz_daemon.py [N] [SEED]      (default 100000 inputs)

Each input is a whole client stream (the handshake, then requests) taken from
``../shared/spec/wire-captures/*.c2s.hex`` and mutated (bit flips, cut and
spliced bytes, u64 fields set to boundary values, string bytes made non-UTF-8,
opcodes swapped, requests from other captures appended) or made from scratch
(a random opcode and random fields).  It is written into one end of a
socketpair and served by a :class:`Session` reading the other end, against a
scratch store, untrusted, with builds stubbed out.

An input ends *unexpectedly* if the session raises, logs an unexpected failure
("operation … failed unexpectedly", "connection handler failed") or answers
with an "unexpected error"; anything else (a clean protocol error, a refusal,
a closed connection) is expected.  Prints the number of inputs and of
unexpected ones, with the first few examples.  Not run in CI.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import socket
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
CAPTURES = os.path.join(HERE, "..", "..", "shared", "spec", "wire-captures")
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from storekeeper.daemon import server as _server  # noqa: E402,F401 -- registers every op
from storekeeper.daemon.ops import build as build_ops  # noqa: E402
from storekeeper.daemon.session import Session  # noqa: E402
from storekeeper.daemon.trust import DaemonConfig, PeerInfo  # noqa: E402
from storekeeper.errors import StoreError  # noqa: E402
from storekeeper.formats.url import LocalLayout  # noqa: E402
from storekeeper.formats.wire import WORKER_MAGIC_1, WireWriter  # noqa: E402
from storekeeper.store.local import LocalStore  # noqa: E402


class _NoBuilds:
    def __init__(self, *a, **k) -> None:
        raise StoreError("builds are disabled in the fuzz run")


build_ops.Builder = _NoBuilds  # type: ignore[assignment,misc]


class _Unexpected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.exc_info or "unexpected" in msg or "daemon bug" in msg:
            tb = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
            self.hits.append(msg + "\n" + tb)


def load_captures() -> list[bytes]:
    out = []
    for path in sorted(glob.glob(os.path.join(CAPTURES, "*.c2s.hex"))):
        with open(path) as f:
            out.append(bytes.fromhex("".join(f.read().split())))
    if not out:
        sys.exit(f"error: no captures in {CAPTURES}")
    return out


HANDSHAKE = WireWriter().u64(WORKER_MAGIC_1).u64(0x122).u64(0).u64(0).take()
BOUNDARY = [0, 1, 2, 7, 8, 255, 0xFFFF, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
OPCODES = list(range(0, 48)) + [1000, 1001, 1002, 1003, 1004, 2000]


def random_fields(rng: random.Random) -> bytes:
    w = WireWriter()
    for _ in range(rng.randint(0, 12)):
        k = rng.random()
        if k < 0.35:
            w.u64(rng.choice(BOUNDARY + [rng.randint(0, 50)]))
        elif k < 0.7:
            w.string(rng.choice([b"", b"\xff\xfe", b"/nix/store/" + b"a" * 32 + b"-x",
                                 b"/nix/store/" + b"a" * 32 + b"-\xff", "/nix/store/é".encode(),
                                 os.urandom(rng.randint(0, 40)), b"/tmp/\xc3\x28", b"out",
                                 b"sha256", b"text:sha256:" + b"0" * 52]))
        else:
            n = rng.randint(0, 3)
            w.u64(n)
            for _ in range(n):
                w.string(rng.choice([b"\xff", b"/nix/store/" + b"b" * 32 + b"-y", os.urandom(5)]))
    return w.take()


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        k = rng.random()
        if k < 0.25 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif k < 0.45 and len(b) >= 8:
            i = rng.randrange(0, len(b) - 7) & ~7
            b[i:i + 8] = rng.choice(BOUNDARY).to_bytes(8, "little")
        elif k < 0.55 and b:
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 64)]
        elif k < 0.65:
            i = rng.randrange(len(b) + 1)
            b[i:i] = os.urandom(rng.randint(1, 16))
        elif k < 0.8 and len(b) > 40:
            # a string's bytes made non-UTF-8: find a length field followed by printable bytes
            i = rng.randrange(32, len(b) - 8) & ~7
            n = int.from_bytes(b[i:i + 8], "little")
            if 0 < n < 4096 and i + 8 + n <= len(b):
                j = i + 8 + rng.randrange(n)
                b[j] = rng.choice([0xff, 0xc3, 0x80, 0xed])
        elif k < 0.9:
            other = rng.choice(corpus)
            b += other[len(HANDSHAKE) + rng.randrange(0, 4) * 8:]
        else:
            b += rng.choice(OPCODES).to_bytes(8, "little") + random_fields(rng)
    return bytes(b)


def non_utf8_variants(corpus: list[bytes]) -> list[bytes]:
    """Every capture with one string field's first byte made 0xff, one field at a time."""
    out = []
    for data in corpus:
        for i in range(len(HANDSHAKE), len(data) - 8, 8):
            n = int.from_bytes(data[i:i + 8], "little")
            end = i + 8 + n + (-n % 8)
            if 0 < n <= 4096 and end <= len(data) and not any(data[i + 8 + n:end]) \
                    and all(32 <= c < 127 for c in data[i + 8:i + 8 + n]):
                b = bytearray(data)
                b[i + 8 + n - 1] = 0xff
                out.append(bytes(b))
    return out


def make_input(rng: random.Random, corpus: list[bytes]) -> bytes:
    if rng.random() < 0.3:
        body = b"".join(rng.choice(OPCODES).to_bytes(8, "little") + random_fields(rng)
                        for _ in range(rng.randint(1, 3)))
        return HANDSHAKE + body
    return mutate(rng.choice(corpus), rng, corpus)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    rng = random.Random(seed)
    corpus = load_captures()
    handler = _Unexpected()
    logger = logging.getLogger("storekeeper")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    base = tempfile.mkdtemp(prefix="sk-fuzz-")
    layout = LocalLayout.custom(base + "/store", base + "/state", base + "/log")
    store = LocalStore(layout)
    config = DaemonConfig(build_users_group="")
    peer = PeerInfo.from_ids(os.getpid(), os.getuid(), os.getgid())
    examples: list[tuple[int, str, bytes]] = []
    unexpected = 0
    start = time.monotonic()
    systematic = non_utf8_variants(corpus)
    for i in range(n):
        data = systematic[i] if i < len(systematic) else make_input(rng, corpus)
        a, b = socket.socketpair()
        out: list[bytes] = []
        try:
            b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            data = data[:256 << 10]
            b.sendall(data)
            b.shutdown(socket.SHUT_WR)
            before = len(handler.hits)
            why = None
            try:
                Session(store, a.makefile("rb"), out.append, trusted=False, config=config,
                        peer=peer).run()
            except BaseException as e:  # noqa: BLE001
                why = f"raised {type(e).__name__}: {e}\n{traceback.format_exc()}"
            if why is None and len(handler.hits) > before:
                why = handler.hits[-1]
            if why is None and (b"unexpected error" in b"".join(out) or b"codec can't" in b"".join(out)):
                why = "answered: " + b"".join(out).decode("utf-8", "replace")[-300:]
            if why is not None:
                unexpected += 1
                if len(examples) < 5:
                    examples.append((i, why, data))
        finally:
            a.close()
            b.close()
        if (i + 1) % 10000 == 0:
            print(f"{i + 1} inputs, {unexpected} unexpected ({time.monotonic() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    store.close()
    print(f"inputs: {n}")
    print(f"unexpected exceptions: {unexpected}")
    for i, why, data in examples:
        print(f"--- input {i} ({len(data)} bytes): {why.strip()[:2000]}")
        print(f"    hex: {data.hex()[:400]}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
