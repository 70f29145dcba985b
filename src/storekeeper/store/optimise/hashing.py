"""Hashing a file as Nix hashes its NAR, and the constants of the pool."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import TYPE_CHECKING

from ...formats.hashes import NIX32_ALPHABET
from ...formats.nar import CLOSE, NAR_MAGIC, padding, regular_header, symlink_node
from ..canonicalise import MTIME_STORE

if TYPE_CHECKING:
    pass



LINKS_DIR = ".links"
TMP_LINK_PREFIX = ".tmp-link-"
LOCK_NAME = "optimise.lock"
GATE_NAME = "optimise.gate"

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in after the type check must not hang the open
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
_SMALL = 1 << 20
_CHUNK = 1 << 20
_BIG = 256 << 10  # files from this size on are hashed by the pool's threads
_MAX_PENDING = 32  # ...with at most this many fds handed over at a time
# errors meaning "the name is not the file we listed any more"
_CHANGED = frozenset({errno.ENOENT, errno.EINVAL, errno.ELOOP, errno.ENXIO, errno.ENOTDIR})
# an entry or temp link that keeps vanishing: give up on that file after this
_RETRIES = 8
_MAX_WARNINGS = 1000
_MTIME_NS = MTIME_STORE * 10**9

_NAR_MAGIC = NAR_MAGIC
_REGULAR_PREFIX = hashlib.sha256(NAR_MAGIC + regular_header(False, 0)[:-8])
_EXECUTABLE_PREFIX = hashlib.sha256(NAR_MAGIC + regular_header(True, 0)[:-8])


def _spread_steps() -> tuple[tuple[int, int, int], ...]:
    # Move 5-bit group i of a 260-bit number from bit 5i to bit 8i (one group
    # per byte) in six mask-and-shift steps: group i moves by 3i = sum of
    # 3*2^k over the bits k of i, highest k first so groups never collide.
    pos = [5 * i for i in range(52)]
    steps = []
    for k in (5, 4, 3, 2, 1, 0):
        keep = move = 0
        for i in range(52):
            if (i >> k) & 1:
                move |= 31 << pos[i]
                pos[i] += 3 << k
            else:
                keep |= 31 << pos[i]
        steps.append((keep, move, 3 << k))
    return tuple(steps)


_SPREAD = _spread_steps()
_NIX32_TABLE = bytes.maketrans(bytes(range(32)), NIX32_ALPHABET.encode())


def nix32_sha256(digest: bytes) -> str:
    """nix32 of a 32-byte digest (same result as ``formats.hashes.nix32_encode``,
    a few big-int operations instead of a loop over 52 characters)."""
    x = int.from_bytes(digest, "little")
    for keep, move, shift in _SPREAD:
        x = (x & keep) | ((x & move) << shift)
    # byte i now holds group i; nix32 prints the highest group first
    return x.to_bytes(52, "big").translate(_NIX32_TABLE).decode()


def file_nar_hash(name, dir_fd: int | None = None,
                  st: os.stat_result | None = None) -> tuple[bytes, os.stat_result] | None:
    """SHA-256 of the NAR of one regular file or symlink (not followed), and its
    stat; None if it is another type or changed while being read (``st``: its
    lstat, if the caller has it)."""
    if st is None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        target = os.fsencode(os.readlink(name, dir_fd=dir_fd))
        return hashlib.sha256(NAR_MAGIC + symlink_node(target)).digest(), st
    if not stat.S_ISREG(st.st_mode):
        return None
    fd = os.open(name, _O_READ, dir_fd=dir_fd)
    try:
        fst = os.fstat(fd)
        if fst.st_ino != st.st_ino or fst.st_dev != st.st_dev:
            return None
        digest = _hash_fd(fd, fst)
    finally:
        os.close(fd)
    return (digest, fst) if digest is not None else None


def _hash_fd_and_close(fd: int, st: os.stat_result) -> bytes | None:
    try:
        return _hash_fd(fd, st)
    finally:
        os.close(fd)


def _hash_fd(fd: int, st: os.stat_result) -> bytes | None:
    size = st.st_size
    h = (_EXECUTABLE_PREFIX if st.st_mode & stat.S_IXUSR else _REGULAR_PREFIX).copy()
    h.update(size.to_bytes(8, "little"))
    if size < _SMALL:
        data = os.read(fd, size + 1)  # one byte more: a file that grew is noticed
        if len(data) != size:
            return None
        h.update(data)
    else:
        left = size
        while left:
            chunk = os.read(fd, min(left, _CHUNK))
            if not chunk:
                return None
            left -= len(chunk)
            h.update(chunk)  # hashlib drops the GIL on big buffers: threads overlap
        if os.read(fd, 1):
            return None
    h.update(padding(size) + CLOSE)
    return h.digest()
