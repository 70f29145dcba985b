"""Reading incoming content for :class:`~storekeeper.store.local.LocalStore`: small dumps
into memory, streams into scratch files with their hash, NARs unpacked with their
errors as :class:`~storekeeper.errors.BadArchive`, and Nix's mismatch messages."""

from __future__ import annotations

import os

from ..errors import BadArchive
from ..formats import nar as narfmt
from ..formats.hashes import Hash, new_hasher
from ..formats.streams import Readable
from ..fs.narfs import restore_nar


def mismatch(what: str, where: str, specified: object, got: object) -> str:
    """Nix's words for a NAR that does not match its metadata (scripts and users know
    them from nix-daemon): the values on lines of their own, aligned."""
    return f"{what} mismatch {where};\n  specified: {specified}\n  got:       {got}"


def hash_file(path: str, algo: str) -> Hash:
    h = new_hasher(algo)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return Hash(algo, h.digest())


#: dumps up to this size are added from memory (no scratch dir)
IN_MEMORY_MAX = 1 << 20


def read_up_to(stream: Readable, n: int) -> bytes:
    parts, left = [], n
    while left > 0 and (chunk := stream.read(min(left, 1 << 16))):
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


class Prefixed:
    """``head``, then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: Readable) -> None:
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data = self._head if n < 0 else self._head[:n]
            self._head = self._head[len(data):]
            return data
        return self._stream.read(n)


def copy_stream_hashing(stream: Readable, dest: str, algo: str) -> Hash:
    h = new_hasher(algo)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with open(fd, "wb") as f:
        while chunk := stream.read(1 << 20):
            h.update(chunk)
            f.write(chunk)
    return Hash(algo, h.digest())


def restore_checked(reader: Readable, dest: str) -> None:
    try:
        restore_nar(reader, dest)
    except narfmt.NarError as e:
        raise BadArchive(str(e)) from None
