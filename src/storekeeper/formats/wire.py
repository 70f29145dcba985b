"""The Nix worker-protocol wire format (protocol 1.34, as Nix 2.8 speaks it).

Pure: values are read from any object with ``read(n)`` (a socket file, a
``BytesIO``, a :class:`FramedReader`) and written into a :class:`WireWriter`
buffer; nothing here opens a file or a socket.

Encoding (spec ``nix-daemon-protocol.md`` §1, §4, §5):

* ``u64``: 8 bytes little-endian.  ``bool``: a u64 that must be 0 or 1.
* string: u64 length, the bytes, zero padding to a multiple of 8.  The padding
  must be zero.  Strings carry bytes; :meth:`WireReader.string` decodes them as
  UTF-8 with ``surrogateescape`` so that any byte string survives a round trip.
* list/set: u64 count, then the elements.  map: u64 count, then key, value, ….
* framed stream: chunks ``u64 len`` + ``len`` raw bytes (no padding), ended by a
  chunk of length 0.

Every length and count read from the wire is checked against a limit before
anything is allocated for it, so a hostile peer cannot make a reader reserve
memory it never sends; a violation is a :class:`WireError` naming the field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from .errors import FormatError
from .hashes import ALGO_SIZES, Hash
from .pathinfo import ValidPathInfo
from .storepath import StoreDir, StorePath
from .streams import Readable

# --- constants (spec §2) ------------------------------------------------------

WORKER_MAGIC_1 = 0x6E697863  # client -> daemon, "cxin"
WORKER_MAGIC_2 = 0x6478696F  # daemon -> client, "oixd"
PROTOCOL_VERSION = 0x126  # 1.38: Nix 2.24 .. 2.35 (with feature sets)
#: the version Nix 2.8.0 .. 2.14 speak (and the newest without a trust flag)
PROTOCOL_1_34 = 0x122

# The first minor version of each change after 1.34 (protocol-1.35-plus.md §3).
# Every test is made on the *negotiated* version, min(ours, theirs).
TRUST_MINOR = 35          # the daemon ends the handshake with a trust flag
ADD_PERM_ROOT_MINOR = 36  # op 47 AddPermRoot
CPU_TIMES_MINOR = 37      # BuildResult carries cpuUser, cpuSystem
FEATURES_MINOR = 38       # feature sets exchanged in the handshake

#: the feature names of 1.38 (2.35) that change the wire
FEATURE_DELETE_DEAD_SPECIFIC = "delete-dead-specific-referrers"
FEATURE_REALISATION_PATH = "realisation-with-path-not-hash"
FEATURE_DISABLE_SET_OPTIONS = "disable-set-options"
#: the features storekeeper implements (offered by its daemon and its client)
SUPPORTED_FEATURES = frozenset({FEATURE_DELETE_DEAD_SPECIFIC})
#: feature lists longer than this (or names longer than MAX_FEATURE_LEN) are refused
MAX_FEATURES = 1024
MAX_FEATURE_LEN = 1024


class Trust(enum.IntEnum):
    """The 1.35 trust flag."""

    UNKNOWN = 0
    TRUSTED = 1
    NOT_TRUSTED = 2
EXPORT_MAGIC = 0x4558494E  # "NIXE": follows the NAR in the export format


def protocol_major(version: int) -> int:
    return version & 0xFF00


def protocol_minor(version: int) -> int:
    return version & 0x00FF


def format_version(version: int) -> str:
    return f"{protocol_major(version) >> 8}.{protocol_minor(version)}"


class Stderr(enum.IntEnum):
    """Codes of the daemon's log ("stderr") channel."""

    NEXT = 0x6F6C6D67
    READ = 0x64617461
    WRITE = 0x64617416
    LAST = 0x616C7473
    ERROR = 0x63787470
    START_ACTIVITY = 0x53545254
    STOP_ACTIVITY = 0x53544F50
    RESULT = 0x52534C54


class Op(enum.IntEnum):
    """Worker operations (opcodes) of protocol 1.38."""

    IsValidPath = 1
    HasSubstitutes = 3
    QueryPathHash = 4
    QueryReferences = 5
    QueryReferrers = 6
    AddToStore = 7
    AddTextToStore = 8
    BuildPaths = 9
    EnsurePath = 10
    AddTempRoot = 11
    AddIndirectRoot = 12
    SyncWithGC = 13
    FindRoots = 14
    ExportPath = 16
    QueryDeriver = 18
    SetOptions = 19
    CollectGarbage = 20
    QuerySubstitutablePathInfo = 21
    QueryDerivationOutputs = 22
    QueryAllValidPaths = 23
    QueryPathInfo = 26
    ImportPaths = 27
    QueryDerivationOutputNames = 28
    QueryPathFromHashPart = 29
    QuerySubstitutablePathInfos = 30
    QueryValidPaths = 31
    QuerySubstitutablePaths = 32
    QueryValidDerivers = 33
    OptimiseStore = 34
    VerifyStore = 35
    BuildDerivation = 36
    AddSignatures = 37
    NarFromPath = 38
    AddToStoreNar = 39
    QueryMissing = 40
    QueryDerivationOutputMap = 41
    RegisterDrvOutput = 42
    QueryRealisation = 43
    AddMultipleToStore = 44
    AddBuildLog = 45
    BuildPathsWithResults = 46
    AddPermRoot = 47  # 1.36


class ExtOp(enum.IntEnum):
    """storekeeper's own operations (per-user roots), far from Nix's numbers.

    Only storekeeper's client sends them; the real nix-daemon answers an
    unknown opcode with ``STDERR_ERROR "invalid operation N"`` and closes.

    * 1000 RegisterRoots.  C: u64 n, n × (string name, string path).
      R: strings (names refused: path not valid).
    * 1001 UnregisterRoots.  C: strings names.  R: strings (names removed).
    * 1002 ReportRuntimeRoots.  C: string lease name, strings paths.
      R: u64 lease seconds (0: the daemon does not hold client reports), u64 held.
    * 1003 ListRoots.  C: —.  R: string (JSON: settings and roots).
    * 1100 IssueTcpKey.  C: —.  R: string user, u64 uid, string key (32 bytes).
    * 1101 RevokeTcpKey.  C: —.  R: u64 1 if a key was revoked, else 0.
    """

    RegisterRoots = 1000
    UnregisterRoots = 1001
    ReportRuntimeRoots = 1002
    ListRoots = 1003
    IssueTcpKey = 1100
    RevokeTcpKey = 1101


class Verbosity(enum.IntEnum):
    ERROR = 0
    WARN = 1
    NOTICE = 2
    INFO = 3
    TALKATIVE = 4
    CHATTY = 5
    DEBUG = 6
    VOMIT = 7


class ActivityType(enum.IntEnum):
    UNKNOWN = 0
    COPY_PATH = 100
    FILE_TRANSFER = 101
    REALISE = 102
    COPY_PATHS = 103
    BUILDS = 104
    BUILD = 105
    OPTIMISE_STORE = 106
    VERIFY_PATHS = 107
    SUBSTITUTE = 108
    QUERY_PATH_INFO = 109
    POST_BUILD_HOOK = 110
    BUILD_WAITING = 111


class ResultType(enum.IntEnum):
    FILE_LINKED = 100
    BUILD_LOG_LINE = 101
    UNTRUSTED_PATH = 102
    CORRUPTED_PATH = 103
    SET_PHASE = 104
    PROGRESS = 105
    SET_EXPECTED = 106
    POST_BUILD_LOG_LINE = 107


FIELD_INT = 0
FIELD_STRING = 1

#: the first minor version whose STDERR_ERROR carries the structured Error record
ERROR_RECORD_MINOR = 26

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


# --- ValidPathInfo (spec §5) --------------------------------------------------

def parse_nar_hash(text: str, what: str = "narHash") -> Hash:
    """The narHash field: base16 on the wire, but any encoding is accepted; a
    hash without an algorithm prefix is SHA-256."""
    try:
        if ":" in text or ("-" in text and text.split("-", 1)[0] in ALGO_SIZES):
            return Hash.parse(text)
        return Hash.parse(text, "sha256")
    except FormatError as e:
        raise WireError(f"{what}: {e}") from None


def read_path_info(r: WireReader, store_dir: StoreDir, path: StorePath | None = None,
                   lax: bool = False) -> ValidPathInfo:
    """A ValidPathInfo; the path is read first unless the caller already has it."""
    if path is None:
        path = r.store_path(store_dir, "path", lax)
    deriver = r.opt_store_path(store_dir, "deriver", lax)
    nar_hash = parse_nar_hash(r.string("narHash", 1024))
    references = frozenset(r.store_paths(store_dir, "references", lax))
    registration_time = r.u64("registrationTime")
    nar_size = r.u64("narSize")
    ultimate = r.boolean("ultimate")
    sigs = frozenset(r.strings("sigs", item_limit=4096))
    ca = r.string("ca", 1024)
    return ValidPathInfo(path, nar_hash, nar_size, references, deriver,
                         registration_time, ultimate, sigs, ca or None)


def write_path_info(w: WireWriter, store_dir: StoreDir, info: ValidPathInfo,
                    with_path: bool) -> WireWriter:
    if with_path:
        w.store_path(store_dir, info.path)
    w.opt_store_path(store_dir, info.deriver)
    # The wire form is bare base16 (no algorithm prefix) for SHA-256, the only
    # narHash algorithm a store records; anything else keeps its prefix.
    w.string(info.nar_hash.base16 if info.nar_hash.algo == "sha256" else info.nar_hash.typed())
    w.store_paths(store_dir, info.references)
    w.u64(info.registration_time).u64(info.nar_size).boolean(info.ultimate)
    w.strings(sorted(info.sigs))
    return w.string(info.ca or "")


# --- DerivedPath strings (spec §5) ---------------------------------------------

@dataclass(frozen=True, slots=True)
class DerivedPath:
    """``/nix/store/…`` (opaque) or ``/nix/store/…drv!out,dev`` / ``…drv!*`` (built).

    ``outputs`` is None for an opaque path; for a built one it is the set of
    wanted output names, and ``("*",)`` is kept as ``all_outputs``.
    """

    path: StorePath
    outputs: frozenset[str] | None = None
    all_outputs: bool = False

    @property
    def is_built(self) -> bool:
        return self.outputs is not None

    def render(self, store_dir: StoreDir) -> str:
        text = store_dir.print(self.path)
        if self.all_outputs:
            return text + "!*"
        if self.outputs is not None:
            return text + "!" + ",".join(sorted(self.outputs))
        return text

    @classmethod
    def parse(cls, store_dir: StoreDir, text: str, lax: bool = False) -> "DerivedPath":
        path_text, sep, outs = text.partition("!")
        path = parse_store_path(store_dir, path_text, lax)
        if not sep:
            return cls(path)
        # Like Nix, the parser does not insist on a ".drv" path here: whoever
        # acts on a built path finds out whether it is a derivation.
        if outs == "*":
            return cls(path, frozenset(), True)
        names = outs.split(",")
        if not outs or any(not n for n in names):
            raise WireError(f"derived path '{text}' has an empty output name")
        return cls(path, frozenset(names))


# --- the log channel: errors, activities, results (spec §4) -------------------

@dataclass(slots=True)
class RemoteError:
    """An Error record as carried by STDERR_ERROR."""

    message: str
    traces: list[str]
    level: int = 0
    status: int = 1  # only in the pre-1.26 form


def write_error(w: WireWriter, message: str, traces: Sequence[str] = (), level: int = 0,
                client_minor: int = protocol_minor(PROTOCOL_VERSION), status: int = 1) -> WireWriter:
    """STDERR_ERROR and its payload, in the form the client's version reads."""
    w.u64(Stderr.ERROR)
    if client_minor < ERROR_RECORD_MINOR:
        return w.string(message).u64(status)
    # "Error" twice: the record's type tag and the old, always-"Error" name
    # field; havePos is always 0 (clients assert it).
    w.string("Error").u64(level).string("Error").string(message).u64(0)
    w.u64(len(traces))
    for trace in traces:
        w.u64(0).string(trace)
    return w


def read_error(r: WireReader, client_minor: int = protocol_minor(PROTOCOL_VERSION)) -> RemoteError:
    """The payload after a STDERR_ERROR code."""
    if client_minor < ERROR_RECORD_MINOR:
        message = r.string("error message")
        return RemoteError(message, [], status=r.u64("error status"))
    tag = r.string("error type", 64)
    if tag != "Error":
        raise WireError(f"error record of type '{tag}' (expected 'Error')")
    level = r.u64("error level")
    r.string("error name", 1024)
    message = r.string("error message")
    if r.u64("error havePos"):
        raise WireError("error record with a position (havePos must be 0)")
    traces = []
    for _ in range(r.count("error traces")):
        if r.u64("trace havePos"):
            raise WireError("error trace with a position (havePos must be 0)")
        traces.append(r.string("error trace"))
    return RemoteError(message, traces, level)


Field = int | str


def write_fields(w: WireWriter, fields: Sequence[Field]) -> WireWriter:
    w.u64(len(fields))
    for f in fields:
        if isinstance(f, bool) or not isinstance(f, (int, str)):
            raise WireError(f"log field {f!r} is neither an int nor a string")
        if isinstance(f, int):
            w.u64(FIELD_INT).u64(f)
        else:
            w.u64(FIELD_STRING).string(f)
    return w


def read_fields(r: WireReader) -> list[Field]:
    out: list[Field] = []
    for _ in range(r.count("log fields", 1 << 16)):
        kind = r.u64("log field type")
        if kind == FIELD_INT:
            out.append(r.u64("log field"))
        elif kind == FIELD_STRING:
            out.append(r.string("log field"))
        else:
            raise WireError(f"log field of unknown type {kind}")
    return out


def write_next(w: WireWriter, message: str) -> WireWriter:
    return w.u64(Stderr.NEXT).string(message)


def write_start_activity(w: WireWriter, act_id: int, level: int, act_type: int, text: str,
                         fields: Sequence[Field] = (), parent: int = 0) -> WireWriter:
    w.u64(Stderr.START_ACTIVITY).u64(act_id).u64(level).u64(act_type).string(text)
    return write_fields(w, fields).u64(parent)


def write_stop_activity(w: WireWriter, act_id: int) -> WireWriter:
    return w.u64(Stderr.STOP_ACTIVITY).u64(act_id)


def write_result(w: WireWriter, act_id: int, result_type: int, fields: Sequence[Field]) -> WireWriter:
    w.u64(Stderr.RESULT).u64(act_id).u64(result_type)
    return write_fields(w, fields)


@dataclass(slots=True)
class StderrMessage:
    """One message of the log channel, as a client reads it.

    ``payload`` by kind: NEXT/WRITE: the text or data; READ: the byte count
    wanted; ERROR: a :class:`RemoteError`; START_ACTIVITY: ``(id, level, type,
    text, fields, parent)``; STOP_ACTIVITY: the id; RESULT: ``(id, type,
    fields)``; LAST: None.
    """

    kind: Stderr
    payload: StderrPayload = None


#: START_ACTIVITY's payload: (id, level, type, text, fields, parent)
ActivityStart = tuple[int, int, int, str, list[Field], int]
#: RESULT's payload: (id, type, fields)
ActivityResult = tuple[int, int, list[Field]]
StderrPayload = str | bytes | int | RemoteError | ActivityStart | ActivityResult | None


def read_stderr_message(r: WireReader,
                        client_minor: int = protocol_minor(PROTOCOL_VERSION)) -> StderrMessage:
    code = r.u64("log message code")
    try:
        kind = Stderr(code)
    except ValueError:
        raise WireError(f"unknown log message code {code:#x}") from None
    if kind is Stderr.LAST:
        return StderrMessage(kind)
    if kind is Stderr.NEXT:
        return StderrMessage(kind, r.string("log message"))
    if kind is Stderr.WRITE:
        return StderrMessage(kind, r.bytes("data"))
    if kind is Stderr.READ:
        return StderrMessage(kind, r.u64("read size"))
    if kind is Stderr.ERROR:
        return StderrMessage(kind, read_error(r, client_minor))
    if kind is Stderr.START_ACTIVITY:
        act: ActivityStart = (r.u64("activity id"), r.u64("activity level"), r.u64("activity type"),
               r.string("activity text"), read_fields(r), r.u64("parent activity"))
        return StderrMessage(kind, act)
    if kind is Stderr.STOP_ACTIVITY:
        return StderrMessage(kind, r.u64("activity id"))
    return StderrMessage(kind, (r.u64("activity id"), r.u64("result type"), read_fields(r)))
