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
import threading
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
    def compress(self, data: bytes | memoryview) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes | memoryview) -> bytes:
        return bytes(data)  # (a view's buffer is filled again after this)

    def flush(self) -> bytes:
        return b""


#: each thread's idle ZstdCompressor per (level, threads): making one costs about as
#: much as compressing 100 KiB, and one is made per NAR.  A stream takes it and gives
#: it back when flushed (its streams share its state: one at a time; not thread-safe)
_idle_zstd = threading.local()


class _Zstd:
    def __init__(self, level: int, threads: int) -> None:
        params = {"level": 3 if level < 0 else level}
        if threads > 1:
            params["threads"] = threads
        self._key = f"{params['level']}/{threads}"
        self._cctx = _idle_zstd.__dict__.pop(self._key, None) or zstandard().ZstdCompressor(**params)
        # Nix writes no content size: a streaming compressor never knows it
        self._obj = self._cctx.compressobj()

    def compress(self, data: bytes | memoryview) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        out = self._obj.flush()
        _idle_zstd.__dict__[self._key] = self._cctx  # (in this thread: the one flushing)
        return out


class _Brotli:
    def __init__(self, level: int) -> None:
        br = brotli()
        self._obj = br.Compressor(quality=11 if level < 0 else level)

    def compress(self, data: bytes | memoryview) -> bytes:
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
    """A readable stream of the decoded bytes of ``raw`` (itself a readable stream).

    Output is bounded by what is asked for (``max_length`` / ``output_buffer_limit``), so a
    small file that decodes to gigabytes (a NAR of a sparse file) never sits in memory.
    """

    def __init__(self, raw: Readable, method: str) -> None:
        self._raw = raw
        self._eof = False      # no more compressed input
        self._done = False     # no more output
        head = b""
        if method in ("", "none"):
            kind = "none"
        elif method == "br":
            kind = "br"
        else:
            while len(head) < 6:
                more = raw.read(6 - len(head))
                if not more:
                    break
                head += more
            found = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
            if found is None:
                raise CompressionError("input compression not recognized")
            kind = found
        self._kind = kind
        self._input = head     # compressed bytes not yet given to the decoder
        self._out = b""        # decoded bytes beyond what a read asked for
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
            # a stream reader bounds its output by the read size (decompressobj does not:
            # a few KiB of zstd can be gigabytes of zeros); Nix's frames have no content size
            head, self._input = self._input, b""
            return zstandard().ZstdDecompressor().stream_reader(
                _Prefixed(head, self._raw), read_across_frames=True, closefd=False)
        if k == "br":
            return brotli().Decompressor()
        return None

    def _more_input(self) -> bool:
        if not self._input and not self._eof:
            self._input = self._raw.read(CHUNK) or b""
            if not self._input:
                self._eof = True
        return bool(self._input)

    def _step(self, n: int) -> bytes:
        """Up to ``n`` decoded bytes (maybe none, when the decoder needs more input)."""
        dec, k = self._dec, self._kind
        if k in ("xz", "bzip2"):
            if dec.eof:
                rest, self._input = dec.unused_data + self._input, b""
                if not rest and not self._more_input():
                    self._done = True
                    return b""
                dec = self._dec = self._new()  # a further stream (pbzip2, xz -T)
                self._input = rest or self._input
            data = b""
            if dec.needs_input:
                if not self._more_input():
                    raise CompressionError(f"{k} data ends early (truncated file)")
                data, self._input = self._input, b""
            return bytes(dec.decompress(data, n))
        if k == "gzip":
            if dec.eof:
                rest, self._input = dec.unused_data + self._input, b""
                if not rest and not self._more_input():
                    self._done = True
                    return b""
                dec = self._dec = self._new()
                self._input = rest or self._input
            if not dec.unconsumed_tail and not self._more_input():
                raise CompressionError("gzip data ends early (truncated file)")
            data = dec.unconsumed_tail or self._input
            if not dec.unconsumed_tail:
                self._input = b""
            return bytes(dec.decompress(data, n))
        if k == "br":
            if dec.is_finished():
                self._done = True
                return b""
            data = b""
            if dec.can_accept_more_data() and self._more_input():
                data, self._input = self._input, b""
            out = bytes(dec.process(data, output_buffer_limit=n))
            if not out and not data and not dec.is_finished() and self._eof:
                raise CompressionError("br data ends early (truncated file)")
            return out
        if k == "zstd":
            out = bytes(dec.read(n))
            if not out:
                self._done = True  # a cut frame just ends: the NarSize check catches it
            return out
        if not self._more_input():
            self._done = True
            return b""
        data, self._input = self._input[:n], self._input[n:]
        return data

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        if n < 0:
            parts = []
            while piece := self.read(CHUNK):
                parts.append(piece)
            return b"".join(parts)
        if self._out:
            out, self._out = self._out[:n], self._out[n:]
            return out
        while not self._done:
            try:
                out = self._step(n)
            except (CompressionError, UsageError):
                raise
            except Exception as e:  # each codec raises its own kind
                raise CompressionError(f"{self._kind} data is corrupt: {e}") from None
            if out:
                if len(out) > n:  # (no codec should, but a read must never return more)
                    out, self._out = out[:n], out[n:]
                return out
        return b""


class _Prefixed:
    """``head`` (bytes already read for sniffing), then the rest of ``raw``."""

    def __init__(self, head: bytes, raw: Readable) -> None:
        self._head = head
        self._raw = raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            out = self._head if n < 0 else self._head[:n]
            self._head = self._head[len(out):]
            return out
        return self._raw.read(n if n >= 0 else CHUNK) or b""
