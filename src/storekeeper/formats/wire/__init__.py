"""The Nix worker-protocol wire format (1.34 as Nix 2.8 speaks it, and 1.35-1.38).

A package: ``protocol`` (numbers), ``codec`` (fields, limits, framing), ``messages``
(path infos, derived paths, the log channel).

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

from .codec import (
    MAX_FRAME_LEN,
    MAX_LIST_LEN,
    MAX_PATH_LEN,
    MAX_STRING_LEN,
    STRING_OVERHEAD,
    FramedReader,
    FramedWriter,
    RequestTooLarge,
    WireEOF,
    WireError,
    WireReader,
    WireWriter,
    frame,
    parse_store_path,
    string_bytes,
    u64_bytes,
)
from .messages import (
    ActivityResult,
    ActivityStart,
    DerivedPath,
    Field,
    RemoteError,
    StderrMessage,
    StderrPayload,
    parse_nar_hash,
    read_error,
    read_fields,
    read_path_info,
    read_stderr_message,
    write_error,
    write_fields,
    write_next,
    write_path_info,
    write_result,
    write_start_activity,
    write_stop_activity,
)
from .protocol import (
    ADD_PERM_ROOT_MINOR,
    CPU_TIMES_MINOR,
    ERROR_RECORD_MINOR,
    EXPORT_MAGIC,
    FEATURE_DELETE_DEAD_SPECIFIC,
    FEATURE_DISABLE_SET_OPTIONS,
    FEATURE_REALISATION_PATH,
    FEATURES_MINOR,
    FIELD_INT,
    FIELD_STRING,
    MAX_FEATURE_LEN,
    MAX_FEATURES,
    PROTOCOL_1_34,
    PROTOCOL_VERSION,
    SUPPORTED_FEATURES,
    TRUST_MINOR,
    WORKER_MAGIC_1,
    WORKER_MAGIC_2,
    ActivityType,
    ExtOp,
    Op,
    ResultType,
    Stderr,
    Trust,
    Verbosity,
    format_version,
    protocol_major,
    protocol_minor,
)

__all__ = [
    "ADD_PERM_ROOT_MINOR",
    "ActivityResult",
    "ActivityStart",
    "ActivityType",
    "CPU_TIMES_MINOR",
    "DerivedPath",
    "ERROR_RECORD_MINOR",
    "EXPORT_MAGIC",
    "ExtOp",
    "FEATURES_MINOR",
    "FEATURE_DELETE_DEAD_SPECIFIC",
    "FEATURE_DISABLE_SET_OPTIONS",
    "FEATURE_REALISATION_PATH",
    "FIELD_INT",
    "FIELD_STRING",
    "Field",
    "FramedReader",
    "FramedWriter",
    "MAX_FEATURES",
    "MAX_FEATURE_LEN",
    "MAX_FRAME_LEN",
    "MAX_LIST_LEN",
    "MAX_PATH_LEN",
    "MAX_STRING_LEN",
    "Op",
    "PROTOCOL_1_34",
    "PROTOCOL_VERSION",
    "RemoteError",
    "RequestTooLarge",
    "ResultType",
    "STRING_OVERHEAD",
    "SUPPORTED_FEATURES",
    "Stderr",
    "StderrMessage",
    "StderrPayload",
    "TRUST_MINOR",
    "Trust",
    "Verbosity",
    "WORKER_MAGIC_1",
    "WORKER_MAGIC_2",
    "WireEOF",
    "WireError",
    "WireReader",
    "WireWriter",
    "format_version",
    "frame",
    "parse_nar_hash",
    "parse_store_path",
    "protocol_major",
    "protocol_minor",
    "read_error",
    "read_fields",
    "read_path_info",
    "read_stderr_message",
    "string_bytes",
    "u64_bytes",
    "write_error",
    "write_fields",
    "write_next",
    "write_path_info",
    "write_result",
    "write_start_activity",
    "write_stop_activity",
]
