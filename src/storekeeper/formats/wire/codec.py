"""Encoding and decoding the protocol's fields (u64, strings, lists, store paths), with
the limits a reader enforces, and framed streams (spec §2, §6)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from ..errors import FormatError
from ..storepath import StoreDir, StorePath
from ..streams import Readable

# Limits on what a reader accepts.  Generous for any real client (a path is at
# most PATH_MAX; ``nix copy`` of a large closure sends tens of thousands of
# paths), small enough that a bogus length is refused before it is trusted.
MAX_STRING_LEN = 64 << 20
MAX_PATH_LEN = 4096
MAX_LIST_LEN = 1 << 24
#: what a string costs a request's budget besides its bytes (the objects holding it)
STRING_OVERHEAD = 32
MAX_FRAME_LEN = 64 << 20
_READ_CHUNK = 1 << 20
_ZEROS = bytes(8)


class WireError(FormatError):
    """Bytes on the wire do not follow the protocol; the message says which field."""


class WireEOF(WireError):
    """The stream ended in the middle of (or instead of) a value."""


class RequestTooLarge(WireError):
    """A request's fields go over the reader's budget (the daemon's max-request-size)."""


# --- encoding -----------------------------------------------------------------

def u64_bytes(value: int) -> bytes:
    if not 0 <= value < 1 << 64:
        raise WireError(f"value {value} does not fit in a u64")
    return value.to_bytes(8, "little")


def string_bytes(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    n = len(data)
    return n.to_bytes(8, "little") + data + _ZEROS[: -n % 8]


class WireWriter:
    """Collects encoded values; :meth:`take` hands the bytes over and empties it.

    Every method returns the writer so that a reply reads as one chain.
    """

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def __len__(self) -> int:
        return len(self.buf)

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def raw(self, data: bytes) -> "WireWriter":
        self.buf += data
        return self

    def u64(self, value: int) -> "WireWriter":
        self.buf += u64_bytes(int(value))
        return self

    def boolean(self, value: bool) -> "WireWriter":
        return self.u64(1 if value else 0)

    def string(self, data: bytes | str) -> "WireWriter":
        self.buf += string_bytes(data)
        return self

    def strings(self, items: Iterable[bytes | str]) -> "WireWriter":
        items = list(items)
        self.u64(len(items))
        for item in items:
            self.string(item)
        return self

    def string_map(self, mapping: Mapping[str, str] | Iterable[tuple[str, str]]) -> "WireWriter":
        pairs = list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)
        self.u64(len(pairs))
        for key, value in pairs:
            self.string(key).string(value)
        return self

    def store_path(self, store_dir: StoreDir, sp: StorePath) -> "WireWriter":
        return self.string(store_dir.print(sp))

    def opt_store_path(self, store_dir: StoreDir, sp: StorePath | None) -> "WireWriter":
        return self.string(store_dir.print(sp) if sp is not None else "")

    def store_paths(self, store_dir: StoreDir, paths: Iterable[StorePath]) -> "WireWriter":
        """A StorePathSet: sorted, as every Nix sender sends it."""
        return self.strings(sorted(store_dir.print(p) for p in paths))


# --- decoding -----------------------------------------------------------------

class WireReader:
    """Reads values from a stream, consuming exactly their bytes.

    ``offset`` counts the bytes consumed, for error messages.  Short reads from
    the stream are fine; an empty read means end of stream and raises
    :class:`WireEOF`.
    """

    __slots__ = ("_read", "offset", "budget")

    def __init__(self, stream: Readable) -> None:
        self._read = stream.read
        self.offset = 0
        #: bytes that strings may still take (None: no limit); each string costs its
        #: length plus :data:`STRING_OVERHEAD`, charged before it is read
        self.budget: int | None = None

    def read_exact(self, n: int, what: str = "data") -> bytes:
        if n == 0:
            return b""
        parts: list[bytes] = []
        got = 0
        while got < n:
            # Bounded reads: memory grows with what arrives, not with what a
            # length field promised.
            chunk = self._read(min(n - got, _READ_CHUNK))
            if not chunk:
                raise WireEOF(f"unexpected end of stream at byte {self.offset + got} "
                              f"while reading {what} ({got} of {n} bytes)")
            parts.append(chunk)
            got += len(chunk)
        self.offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def u64(self, what: str = "integer", max_value: int | None = None) -> int:
        start = self.offset
        value = int.from_bytes(self.read_exact(8, what), "little")
        if max_value is not None and value > max_value:
            raise WireError(f"{what} at byte {start}: value {value} is too large (limit {max_value})")
        return value

    def boolean(self, what: str = "boolean") -> bool:
        start = self.offset
        value = int.from_bytes(self.read_exact(8, what), "little")
        if value > 1:
            raise WireError(f"{what} at byte {start}: expected a boolean (0 or 1), got {value}")
        return value == 1

    def bytes(self, what: str = "string", limit: int = MAX_STRING_LEN) -> bytes:
        start = self.offset
        n = self.u64(f"length of {what}")
        if n > limit:
            raise WireError(f"{what} at byte {start} is {n} bytes long (limit {limit})")
        if self.budget is not None:
            self.budget -= n + STRING_OVERHEAD
            if self.budget < 0:
                raise RequestTooLarge(f"the request is too large: {what} at byte {start} goes "
                                      f"over the daemon's limit on request size (max-request-size)")
        padded = n + (-n % 8)
        data = self.read_exact(padded, what)
        if padded != n and data[n:] != _ZEROS[: padded - n]:
            raise WireError(f"{what} at byte {start}: non-zero padding")
        return data[:n] if padded != n else data

    def string(self, what: str = "string", limit: int = MAX_STRING_LEN) -> str:
        return self.bytes(what, limit).decode("utf-8", "surrogateescape")

    def count(self, what: str, limit: int = MAX_LIST_LEN) -> int:
        return self.u64(f"number of {what}", limit)

    def strings(self, what: str = "strings", limit: int = MAX_LIST_LEN,
                item_limit: int = MAX_STRING_LEN) -> list[str]:
        return [self.string(f"element of {what}", item_limit) for _ in range(self.count(what, limit))]

    def string_map(self, what: str = "map", limit: int = MAX_LIST_LEN,
                   item_limit: int = MAX_STRING_LEN) -> dict[str, str]:
        out: dict[str, str] = {}
        for _ in range(self.count(f"entries of {what}", limit)):
            key = self.string(f"key of {what}", item_limit)
            out[key] = self.string(f"value of {what}", item_limit)
        return out

    def store_path(self, store_dir: StoreDir, what: str = "store path", lax: bool = False) -> StorePath:
        text = self.string(what, MAX_PATH_LEN)
        return parse_store_path(store_dir, text, lax)

    def opt_store_path(self, store_dir: StoreDir, what: str = "store path",
                       lax: bool = False) -> StorePath | None:
        text = self.string(what, MAX_PATH_LEN)
        return parse_store_path(store_dir, text, lax) if text else None

    def store_paths(self, store_dir: StoreDir, what: str = "store paths",
                    lax: bool = False) -> list[StorePath]:
        return [parse_store_path(store_dir, text, lax)
                for text in self.strings(what, item_limit=MAX_PATH_LEN)]


def parse_store_path(store_dir: StoreDir, text: str, lax: bool = False) -> StorePath:
    try:
        return store_dir.parse(text, lax=lax)
    except FormatError as e:
        raise WireError(str(e)) from None  # the message names the path already


# --- framed streams -----------------------------------------------------------

class FramedReader:
    """A readable stream over one framed payload.

    Invariants: it never consumes a byte past the zero-length terminator; once
    the terminator is read, ``finished`` is true and :meth:`read` returns
    ``b""`` forever.  If the framing itself is bad (a frame over the limit, or
    the connection ending mid-frame), the :class:`WireError` is also kept in
    ``broken``: the underlying stream is then out of step and must not be used
    for anything else.
    """

    def __init__(self, reader: WireReader, max_frame: int = MAX_FRAME_LEN) -> None:
        self._r = reader
        self._max_frame = max_frame
        self._left = 0  # bytes left in the current frame
        self.finished = False
        self.broken: WireError | None = None
        self.total = 0  # payload bytes delivered or skipped

    def _next_frame(self) -> bool:
        """Advance to a non-empty frame; False at the terminator."""
        try:
            n = self._r.u64("frame length")
            if n > self._max_frame:
                raise WireError(f"frame of {n} bytes is larger than the limit ({self._max_frame})")
        except WireError as e:
            self.broken = e
            raise
        if n == 0:
            self.finished = True
            return False
        self._left = n
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self.read(_READ_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        if self.broken:
            raise self.broken
        if n == 0 or self.finished:
            return b""
        if not self._left and not self._next_frame():
            return b""
        want = min(n, self._left)
        try:
            data = self._r.read_exact(want, "framed data")
        except WireError as e:
            self.broken = e
            raise
        self._left -= want
        self.total += want
        return data

    def drain(self) -> int:
        """Skip the rest of the payload, up to and including the terminator;
        returns how many payload bytes were skipped."""
        skipped = 0
        while chunk := self.read(_READ_CHUNK):
            skipped += len(chunk)
        return skipped


class FramedWriter:
    """Writes a framed payload through ``write``: chunks of at most
    ``chunk_size`` bytes, then the terminator on :meth:`close`."""

    def __init__(self, write: Callable[[bytes], object], chunk_size: int = 32 << 10) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._write = write
        self._chunk = chunk_size
        self._buf = bytearray()
        self.closed = False

    def write(self, data: bytes) -> int:
        if self.closed:
            raise ValueError("write to a closed FramedWriter")
        self._buf += data
        while len(self._buf) >= self._chunk:
            self._emit(bytes(self._buf[: self._chunk]))
            del self._buf[: self._chunk]
        return len(data)

    def _emit(self, data: bytes) -> None:
        self._write(len(data).to_bytes(8, "little") + data)

    def close(self) -> None:
        if self.closed:
            return
        if self._buf:
            self._emit(bytes(self._buf))
            self._buf.clear()
        self._write(_ZEROS)
        self.closed = True


def frame(payload: bytes, chunk_size: int = 32 << 10) -> bytes:
    """A whole payload as a framed stream, in one byte string."""
    out: list[bytes] = []
    writer = FramedWriter(out.append, chunk_size)
    writer.write(payload)
    writer.close()
    return b"".join(out)
