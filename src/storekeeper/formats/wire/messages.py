"""Compound messages: ValidPathInfo, DerivedPath strings, and the log channel's errors,
activities and results (spec §4, §5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import FormatError
from ..hashes import ALGO_SIZES, Hash
from ..pathinfo import ValidPathInfo
from ..storepath import StoreDir, StorePath
from .codec import WireError, WireReader, WireWriter, parse_store_path
from .protocol import (
    ERROR_RECORD_MINOR,
    FIELD_INT,
    FIELD_STRING,
    PROTOCOL_VERSION,
    Stderr,
    protocol_minor,
)

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
