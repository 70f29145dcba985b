"""Reference scanning: which of a set of store paths' hash parts occur in a byte stream.

A reference is any occurrence of a candidate's 32-character hash part, anywhere
in the scanned bytes (Nix scans the NAR, so file names and symlink targets
count).  Occurrences may straddle chunk boundaries: the scanner keeps the last
31 bytes of each chunk and rescans them with the next one.
"""

from __future__ import annotations

import re
from typing import Iterable

from .hashes import NIX32_ALPHABET
from .storepath import HASH_LEN

# Runs of nix32 characters long enough to hold a hash part.
_RUN = re.compile(b"[" + NIX32_ALPHABET.encode() + b"]{%d,}" % HASH_LEN)


class RefScanner:
    """Feed chunks with :meth:`feed`; :attr:`found` holds the hash parts seen so far."""

    def __init__(self, hash_parts: Iterable[str]) -> None:
        self._wanted = {h.encode() for h in hash_parts}
        for h in self._wanted:
            if len(h) != HASH_LEN:
                raise ValueError(f"hash part {h!r} is not {HASH_LEN} characters")
        self._found: set[bytes] = set()
        self._tail = b""

    @property
    def found(self) -> set[str]:
        return {h.decode() for h in self._found}

    def feed(self, chunk: bytes) -> None:
        if not self._wanted or not chunk:
            return
        data = self._tail + chunk if self._tail else chunk
        wanted, found = self._wanted, self._found
        for m in _RUN.finditer(data):
            start, end = m.span()
            for i in range(start, end - HASH_LEN + 1):
                cand = data[i : i + HASH_LEN]
                if cand in wanted:
                    found.add(cand)
            if len(found) == len(wanted):
                self._wanted = set()
                break
        self._tail = data[-(HASH_LEN - 1) :]


def scan_references(chunks: Iterable[bytes], hash_parts: Iterable[str]) -> set[str]:
    scanner = RefScanner(hash_parts)
    for chunk in chunks:
        scanner.feed(chunk)
    return scanner.found
