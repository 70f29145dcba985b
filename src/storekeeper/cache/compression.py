"""NAR compression as binary caches use it (spec binary-cache.md §4).

Decoding follows Nix 2.8: ``none`` (or empty) passes bytes through, ``br`` is
brotli, and every other name is only a hint: the filter is sniffed from the
data (xz, bzip2, zstd, gzip), so ``Compression: xz`` on a bzip2 file works and
on an uncompressed NAR fails with "input compression not recognized".
Everything streams: zstd frames written by Nix carry no content size.

``zstandard`` and ``brotli`` are optional (the ``[zstd]`` and ``[brotli]``
extras); a cache that needs a missing one gets one clear error.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Any, Protocol

from ..errors import StoreError, UsageError
from ..formats.streams import Readable

CHUNK = 1 << 16

_MAGIC = ((b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"), (b"\x28\xb5\x2f\xfd", "zstd"),
          (b"\x1f\x8b", "gzip"))


class CompressionError(StoreError):
    """Compressed data that does not decode."""


def zstandard() -> Any:
    try:
        import zstandard  # noqa: PLC0415 -- optional: the [zstd] extra
        return zstandard
    except ImportError:
        raise UsageError("compression 'zstd' needs the Python package 'zstandard': "
                         "pip install 'storekeeper[zstd]'") from None


def brotli() -> Any:
    try:
        import brotli  # noqa: PLC0415 -- optional: the [brotli] extra
        return brotli
    except ImportError:
        raise UsageError("compression 'br' needs the Python package 'brotli': "
                         "pip install 'storekeeper[brotli]'") from None


# --- writing -----------------------------------------------------------------------

class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _Zstd:
    def __init__(self, level: int, threads: int) -> None:
        zstd = zstandard()
        params = {"level": 3 if level < 0 else level}
        if threads > 1:
            params["threads"] = threads
        # Nix writes no content size: a streaming compressor never knows it
        self._obj = zstd.ZstdCompressor(**params).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush()


class _Brotli:
    def __init__(self, level: int) -> None:
        br = brotli()
        self._obj = br.Compressor(quality=11 if level < 0 else level)

    def compress(self, data: bytes) -> bytes:
        return self._obj.process(data)

    def flush(self) -> bytes:
        return self._obj.finish()


def compressor(method: str, level: int = -1, threads: int = 1) -> Compressor:
    """A streaming compressor for ``compression=method`` (``level`` -1: the library's default)."""
    if method == "none":
        return _Identity()
    if method == "xz":
        return lzma.LZMACompressor(preset=6 if level < 0 else level)
    if method == "bzip2":
        return bz2.BZ2Compressor(9 if level < 0 else level)
    if method == "gzip":
        return zlib.compressobj(6 if level < 0 else level, zlib.DEFLATED, 31)
    if method == "zstd":
        return _Zstd(level, threads)
    if method == "br":
        return _Brotli(level)
    raise UsageError(f"unknown compression method '{method}'")


# --- reading -----------------------------------------------------------------------

class Decompressing:
    """A readable stream of the decoded bytes of ``raw`` (itself a readable stream)."""

    def __init__(self, raw: Readable, method: str) -> None:
        self._raw = raw
        self._buf = b""
        self._eof = False
        head = b""
        if method in ("", "none"):
            self._kind = "none"
        elif method == "br":
            self._kind = "br"
        else:
            while len(head) < 6:
                more = raw.read(6 - len(head))
                if not more:
                    break
                head += more
            kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
            if kind is None:
                raise CompressionError("input compression not recognized")
            self._kind = kind
        self._pending = head
        self._dec: Any = self._new()

    def _new(self) -> Any:
        k = self._kind
        if k == "xz":
            return lzma.LZMADecompressor()
        if k == "bzip2":
            return bz2.BZ2Decompressor()
        if k == "gzip":
            return zlib.decompressobj(31)
        if k == "zstd":
            return zstandard().ZstdDecompressor().decompressobj()
        if k == "br":
            return brotli().Decompressor()
        return None

    def _feed(self, data: bytes) -> bytes:
        dec = self._dec
        if dec is None:
            return data
        try:
            if self._kind == "br":
                return bytes(dec.process(data))
            out = dec.decompress(data)
            # several concatenated streams (pbzip2, multi-frame zstd): start over on the rest
            while getattr(dec, "eof", False) and getattr(dec, "unused_data", b""):
                rest = dec.unused_data
                dec = self._dec = self._new()
                out += dec.decompress(rest)
            return out
        except Exception as e:  # each codec raises its own kind
            raise CompressionError(f"{self._kind} data is corrupt: {e}") from None

    def _finish(self) -> None:
        dec = self._dec
        if dec is None:
            return
        done = dec.is_finished() if self._kind == "br" else getattr(dec, "eof", True)
        if not done:
            raise CompressionError(f"{self._kind} data ends early (truncated file)")

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._buf) < n):
            data = self._pending or self._raw.read(CHUNK)
            self._pending = b""
            if not data:
                self._eof = True
                self._finish()
                break
            self._buf += self._feed(data)
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out
