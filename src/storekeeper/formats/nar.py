"""NAR (Nix ARchive): writer pieces, an in-memory model and a strict streaming reader.

Invariant: there is exactly one NAR for a file tree, and this module only
accepts and only produces that canonical form.  The reader refuses anything
Nix would not have written (unsorted or odd entry names, unknown, missing or
repeated fields, non-zero padding, oversized strings) and consumes exactly the
archive's bytes, never one more, so a NAR can be read out of a longer stream
such as a daemon socket.  The writers refuse what the reader would refuse,
except nesting deeper than ``MAX_DEPTH``: a tree on disk may be that deep and
``nix-store --dump`` writes it, but an incoming one is refused as hostile.

Grammar (every token is a ``str``: u64 little-endian length, bytes, zero
padding to a multiple of 8; spec §2)::

    nar   := "nix-archive-1" node
    node  := "(" "type" ( "regular" ["executable" ""] "contents" <bytes>
                        | "symlink" "target" <bytes>
                        | "directory" entry* ) ")"
    entry := "entry" "(" "name" <name> "node" node ")"

Pure: no filesystem access; the reader reads from a stream object it is given.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Protocol, Union

from .errors import FormatError
from .hashes import Hash, new_hasher
from .streams import Readable

MAX_KEYWORD_LEN = 64
MAX_NAME_LEN = 255
MAX_TARGET_LEN = 4095
MAX_CONTENTS_SIZE = 2**63 - 1
MAX_DEPTH = 256
#: contents are handed to the sink in chunks of at most this size
CHUNK_SIZE = 1 << 20

_ZEROS = bytes(8)


class NarError(FormatError):
    """A NAR is malformed (or a tree cannot be written as one).

    ``offset`` is the byte offset in the NAR where the problem was found and
    ``path`` the path inside the archive (``b""`` for the top-level node).
    """

    def __init__(self, offset: int, path: bytes, problem: str) -> None:
        where = f"'{_show(path, 200)}'" if path else "the top-level node"
        super().__init__(f"NAR error at byte {offset} in {where}: {problem}")
        self.offset = offset
        self.path = path
        self.problem = problem


def _show(b: bytes, limit: int = 60) -> str:
    """Printable text for a name or path: invalid UTF-8 and control characters
    escaped, long ones cut in the middle."""
    text = b.decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > limit:
        text = text[: limit // 2] + "…" + text[-(limit // 2):]
    return text


# --------------------------------------------------------------------------
# Writer pieces.  A filesystem walker concatenates these around file contents
# it streams itself, so no file needs to be held in memory.


def nar_str(b: bytes) -> bytes:
    """One NAR string token: length, bytes, zero padding."""
    n = len(b)
    return n.to_bytes(8, "little") + b + _ZEROS[: -n % 8]


def padding(size: int) -> bytes:
    """The zero bytes that follow ``size`` bytes of string or file contents."""
    return _ZEROS[: -size % 8]


NAR_MAGIC = nar_str(b"nix-archive-1")
#: closes a node, and also an entry (after its node's own ``CLOSE``)
CLOSE = nar_str(b")")
_NODE_OPEN = nar_str(b"(") + nar_str(b"type")
_REGULAR = _NODE_OPEN + nar_str(b"regular") + nar_str(b"contents")
_EXECUTABLE = (
    _NODE_OPEN + nar_str(b"regular") + nar_str(b"executable") + nar_str(b"") + nar_str(b"contents")
)
_SYMLINK = _NODE_OPEN + nar_str(b"symlink") + nar_str(b"target")
DIRECTORY_HEADER = _NODE_OPEN + nar_str(b"directory")
_ENTRY = nar_str(b"entry") + nar_str(b"(") + nar_str(b"name")
_NODE = nar_str(b"node")


def regular_header(executable: bool, size: int) -> bytes:
    """A regular file node up to and including the contents length; the
    ``size`` contents bytes and then ``regular_trailer(size)`` follow."""
    return (_EXECUTABLE if executable else _REGULAR) + size.to_bytes(8, "little")


def regular_trailer(size: int) -> bytes:
    return padding(size) + CLOSE


def symlink_node(target: bytes) -> bytes:
    return _SYMLINK + nar_str(target) + CLOSE


def entry_header(name: bytes) -> bytes:
    """Opens a directory entry; the child node, then ``CLOSE``, follow."""
    return _ENTRY + nar_str(name) + _NODE


def entry_name_problem(name: bytes) -> str | None:
    """Why ``name`` cannot be a directory entry name, or None if it can."""
    if not name:
        return "empty entry name"
    if name in (b".", b".."):
        return f"entry name '{name.decode()}' is not allowed"
    if b"/" in name:
        return f"entry name '{_show(name)}' contains '/'"
    if b"\0" in name:
        return f"entry name '{_show(name)}' contains a NUL byte"
    if len(name) > MAX_NAME_LEN:
        return f"entry name is {len(name)} bytes long (limit {MAX_NAME_LEN})"
    return None


def symlink_target_problem(target: bytes) -> str | None:
    if not target:
        return "empty symlink target"
    if len(target) > MAX_TARGET_LEN:
        return f"symlink target is {len(target)} bytes long (limit {MAX_TARGET_LEN})"
    if b"\0" in target:
        return "symlink target contains a NUL byte"
    return None


# --------------------------------------------------------------------------
# In-memory model, for tests and small content.


@dataclass(frozen=True, slots=True)
class Regular:
    executable: bool
    contents: bytes


@dataclass(frozen=True, slots=True)
class Symlink:
    target: bytes


@dataclass(frozen=True, slots=True)
class Directory:
    entries: dict[bytes, "Node"]


Node = Union[Regular, Symlink, Directory]


def dump_node(node: Node) -> bytes:
    """The NAR of an in-memory tree (entries are sorted here)."""
    out = [NAR_MAGIC]
    size = len(NAR_MAGIC)

    def emit(piece: bytes) -> None:
        nonlocal size
        out.append(piece)
        size += len(piece)

    def walk(n: Node, path: bytes) -> None:
        if isinstance(n, Regular):
            emit(regular_header(n.executable, len(n.contents)))
            emit(n.contents)
            emit(regular_trailer(len(n.contents)))
        elif isinstance(n, Symlink):
            problem = symlink_target_problem(n.target)
            if problem:
                raise NarError(size, path, problem)
            emit(symlink_node(n.target))
        elif isinstance(n, Directory):
            emit(DIRECTORY_HEADER)
            for name in sorted(n.entries):
                problem = entry_name_problem(name)
                if problem:
                    raise NarError(size, path, problem)
                emit(entry_header(name))
                walk(n.entries[name], path + b"/" + name if path else name)
                emit(CLOSE)
            emit(CLOSE)
        else:
            raise TypeError(f"not a NAR node: {n!r}")

    walk(node, b"")
    return b"".join(out)


def dump_string(contents: bytes) -> bytes:
    """The NAR of a non-executable regular file (Nix's dumpString, text paths)."""
    size = len(contents)
    return NAR_MAGIC + regular_header(False, size) + contents + regular_trailer(size)


def parse_to_node(data: bytes) -> Node:
    """Parse a complete NAR held in memory; trailing bytes are an error."""
    stream = io.BytesIO(data)
    sink = _TreeSink()
    read_nar(stream, sink)
    if stream.tell() != len(data):
        extra = len(data) - stream.tell()
        raise NarError(stream.tell(), b"", f"{extra} bytes of trailing data after the NAR")
    assert sink.root is not None
    return sink.root


class _TreeSink:
    def __init__(self) -> None:
        self.root: Node | None = None
        self._dirs: dict[bytes, dict[bytes, Node]] = {}
        self._file: tuple[bytes, bool, list[bytes]] | None = None

    def _place(self, path: bytes, node: Node) -> None:
        if not path:
            self.root = node
        else:
            parent, _, name = path.rpartition(b"/")
            self._dirs[parent][name] = node

    def directory(self, path: bytes) -> None:
        entries: dict[bytes, Node] = {}
        self._dirs[path] = entries
        self._place(path, Directory(entries))

    def regular_start(self, path: bytes, executable: bool, size: int) -> None:
        self._file = (path, executable, [])

    def regular_data(self, chunk: bytes) -> None:
        assert self._file is not None
        self._file[2].append(chunk)

    def regular_end(self) -> None:
        assert self._file is not None
        path, executable, chunks = self._file
        self._file = None
        self._place(path, Regular(executable, b"".join(chunks)))

    def symlink(self, path: bytes, target: bytes) -> None:
        self._place(path, Symlink(target))


# --------------------------------------------------------------------------
# Strict streaming reader.


class NarSink(Protocol):
    """Receives a NAR's nodes in archive (pre-)order.

    ``path`` is relative to the archive root: ``b""`` for the root, ``b"a/b"``
    below it.  A directory's call comes before those of its entries; a
    regular file is ``regular_start``, zero or more ``regular_data`` chunks of
    at most ``CHUNK_SIZE`` bytes, then ``regular_end``.
    """

    def directory(self, path: bytes) -> None: ...

    def regular_start(self, path: bytes, executable: bool, size: int) -> None: ...

    def regular_data(self, chunk: bytes) -> None: ...

    def regular_end(self) -> None: ...

    def symlink(self, path: bytes, target: bytes) -> None: ...


class NullSink:
    """Discards everything: ``read_nar(stream, NullSink())`` only validates."""

    def directory(self, path: bytes) -> None:
        pass

    def regular_start(self, path: bytes, executable: bool, size: int) -> None:
        pass

    def regular_data(self, chunk: bytes) -> None:
        pass

    def regular_end(self) -> None:
        pass

    def symlink(self, path: bytes, target: bytes) -> None:
        pass


_FIELDS = (b"type", b"executable", b"contents", b"target", b"entry", b"name", b"node")
_ENCODED = {t: nar_str(t) for t in (b"(", b")", b"type", b"contents", b"target", b"name", b"node")}


def read_nar(stream: Readable, sink: NarSink) -> None:
    """Read one NAR from ``stream`` (anything with ``read(n)``; short reads are
    fine), feeding its nodes to ``sink``.  Reads exactly the NAR's bytes.
    Raises NarError on the first deviation from the canonical form; the
    stream position is then unspecified."""
    _Reader(stream, sink).read()


class _Reader:
    __slots__ = ("_read", "_sink", "_offset")

    def __init__(self, stream: Readable, sink: NarSink) -> None:
        self._read = stream.read
        self._sink = sink
        self._offset = 0

    def _exact(self, n: int, path: bytes) -> bytes:
        data = self._read(n)
        if data is None or len(data) != n:
            parts = [data or b""]
            got = len(parts[0])
            while got < n:
                more = self._read(n - got)
                if not more:
                    raise NarError(self._offset + got, path, "unexpected end of NAR")
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self._offset += n
        return data

    def _u64(self, path: bytes) -> int:
        return int.from_bytes(self._exact(8, path), "little")

    def _str(self, path: bytes, limit: int, what: str) -> bytes:
        start = self._offset
        n = self._u64(path)
        if n > limit:
            raise NarError(start, path, f"{what} is {n} bytes long (limit {limit})")
        if not n:
            return b""
        padded = n + (-n % 8)
        data = self._exact(padded, path)
        if padded != n and data[n:] != _ZEROS[: padded - n]:
            raise NarError(start + 8 + n, path, f"non-zero padding after {what}")
        return data[:n]

    # Every keyword takes at least 16 bytes (length, then one padded word),
    # so reading 16 at once never reads past the end of a well-formed NAR;
    # halving the read calls matters for trees of many small files.

    def _keyword(self, path: bytes) -> tuple[bytes, int]:
        start = self._offset
        return self._finish_keyword(self._exact(16, path), start, path), start

    def _finish_keyword(self, data: bytes, start: int, path: bytes) -> bytes:
        n = int.from_bytes(data[:8], "little")
        if n > MAX_KEYWORD_LEN:
            raise NarError(start, path, f"a string where a keyword was expected is {n} bytes long "
                                        f"(limit {MAX_KEYWORD_LEN})")
        end = 8 + n + (-n % 8)
        if end > len(data):
            data += self._exact(end - len(data), path)
        if data[8 + n : end] != _ZEROS[: end - 8 - n]:
            raise NarError(start + 8 + n, path, "non-zero padding after a keyword")
        return data[8 : 8 + n]

    def _expect(self, token: bytes, path: bytes, seen: tuple[bytes, ...] = ()) -> None:
        start = self._offset
        encoded = _ENCODED[token]
        data = self._exact(len(encoded), path)
        if data != encoded:
            tok = self._finish_keyword(data, start, path)
            raise self._unexpected(tok, start, path, f"'{token.decode()}'", seen)

    def _unexpected(
        self, tok: bytes, start: int, path: bytes, expected: str, seen: tuple[bytes, ...]
    ) -> NarError:
        shown = f"'{_show(tok)}'"
        if tok in seen:
            problem = f"duplicated field {shown}"
        elif tok == b")":
            problem = f"missing field {expected}"
        elif tok in _FIELDS:
            problem = f"field {shown} is not allowed here (expected {expected})"
        else:
            problem = f"unknown field {shown} (expected {expected})"
        return NarError(start, path, problem)

    def read(self) -> None:
        # Checked by length first so that a non-NAR (say, a compressed one)
        # gets a plain "not a NAR" rather than a complaint about its bytes.
        n = self._u64(b"")
        magic = self._exact(16, b"") if n == 13 else b""
        if magic[:13] != b"nix-archive-1" or magic[13:] != _ZEROS[:3]:
            raise NarError(0, b"", "bad magic: not a NAR (expected 'nix-archive-1')")
        self._node(b"", 0)

    def _node(self, path: bytes, depth: int) -> None:
        self._expect(b"(", path)
        self._expect(b"type", path)
        kind, start = self._keyword(path)
        if kind == b"regular":
            self._regular(path)
        elif kind == b"symlink":
            self._symlink(path)
        elif kind == b"directory":
            self._directory(path, depth)
        else:
            raise NarError(start, path, f"unknown node type '{_show(kind)}'")

    def _regular(self, path: bytes) -> None:
        tok, start = self._keyword(path)
        executable = tok == b"executable"
        if executable:
            value_at = self._offset
            if self._str(path, MAX_KEYWORD_LEN, "'executable' marker value"):
                raise NarError(value_at, path, "'executable' marker has a non-empty value")
            tok, start = self._keyword(path)
            if tok != b"contents":
                raise self._unexpected(tok, start, path, "'contents'", (b"type", b"executable"))
        elif tok == b")":
            raise NarError(start, path, "missing field 'contents'")
        elif tok != b"contents":
            raise self._unexpected(tok, start, path, "'contents' or 'executable'", (b"type",))

        size_at = self._offset
        size = self._u64(path)
        if size > MAX_CONTENTS_SIZE:
            raise NarError(size_at, path,
                           f"contents length {size} is larger than {MAX_CONTENTS_SIZE}")
        sink = self._sink
        sink.regular_start(path, executable, size)
        read = self._read
        remaining = size
        while remaining:
            chunk = read(remaining if remaining < CHUNK_SIZE else CHUNK_SIZE)
            if not chunk:
                raise NarError(self._offset, path, "unexpected end of NAR")
            self._offset += len(chunk)
            remaining -= len(chunk)
            sink.regular_data(chunk)
        pad = -size % 8
        if pad:
            pad_at = self._offset
            if self._exact(pad, path) != _ZEROS[:pad]:
                raise NarError(pad_at, path, "non-zero padding after file contents")
        sink.regular_end()
        seen = (b"type", b"contents", b"executable") if executable else (b"type", b"contents")
        self._expect(b")", path, seen)

    def _symlink(self, path: bytes) -> None:
        self._expect(b"target", path, (b"type",))
        start = self._offset
        target = self._str(path, MAX_TARGET_LEN, "symlink target")
        problem = symlink_target_problem(target)
        if problem:
            raise NarError(start, path, problem)
        self._expect(b")", path, (b"type", b"target"))
        self._sink.symlink(path, target)

    def _directory(self, path: bytes, depth: int) -> None:
        self._sink.directory(path)
        prefix = path + b"/" if path else b""
        prev: bytes | None = None
        while True:
            tok, start = self._keyword(path)
            if tok == b")":
                return
            if tok != b"entry":
                raise self._unexpected(tok, start, path, "'entry' or ')'", (b"type",))
            self._expect(b"(", path)
            self._expect(b"name", path)
            start = self._offset
            name = self._str(path, MAX_NAME_LEN, "entry name")
            problem = entry_name_problem(name)
            if problem:
                raise NarError(start, path, problem)
            if prev is not None and name <= prev:
                if name == prev:
                    problem = f"duplicate directory entry '{_show(name)}'"
                else:
                    problem = (f"directory entries not sorted "
                               f"('{_show(name)}' after '{_show(prev)}')")
                raise NarError(start, path, problem)
            prev = name
            self._expect(b"node", path, (b"name",))
            child = prefix + name
            if depth >= MAX_DEPTH:
                raise NarError(self._offset, child,
                               f"directories nested deeper than {MAX_DEPTH} levels")
            self._node(child, depth + 1)
            self._expect(b")", path, (b"name", b"node"))


# --------------------------------------------------------------------------
# Hashing.


class HashingReader:
    """Wraps a stream; hashes and counts every byte read through it."""

    def __init__(self, stream: Readable, algo: str = "sha256") -> None:
        self._stream = stream
        self._hasher = new_hasher(algo)
        self.algo = algo
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if data:
            self._hasher.update(data)
            self.size += len(data)
        return data

    def hash(self) -> Hash:
        return Hash(self.algo, self._hasher.digest())


def nar_digest(stream: Readable, algo: str = "sha256") -> tuple[Hash, int]:
    """Validate the NAR at the head of ``stream`` without unpacking it and
    return its hash and size."""
    reader = HashingReader(stream, algo)
    read_nar(reader, NullSink())
    return reader.hash(), reader.size
