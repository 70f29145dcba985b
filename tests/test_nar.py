"""NAR format: golden vectors, round trips, and the strict reader's refusals."""

from __future__ import annotations

import hashlib
import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storekeeper.formats.errors import FormatError
from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import (
    CHUNK_SIZE,
    MAX_DEPTH,
    Directory,
    HashingReader,
    NarError,
    NullSink,
    Regular,
    Symlink,
    dump_node,
    dump_string,
    nar_digest,
    nar_str,
    parse_to_node,
    read_nar,
)

# --- golden vectors (spec §2.4, §1.5) ------------------------------------------

VEC_A = bytes.fromhex(
    "0d000000000000006e69782d617263686976652d3100000001000000000000002800000000000000"
    "040000000000000074797065000000000700000000000000726567756c6172000800000000000000"
    "636f6e74656e7473060000000000000068656c6c6f0a000001000000000000002900000000000000"
)
VEC_B = bytes.fromhex(
    "0d000000000000006e69782d617263686976652d3100000001000000000000002800000000000000"
    "040000000000000074797065000000000700000000000000726567756c6172000a00000000000000"
    "65786563757461626c6500000000000000000000000000000800000000000000636f6e74656e7473"
    "0100000000000000780000000000000001000000000000002900000000000000"
)
VEC_C = bytes.fromhex(
    "0d000000000000006e69782d617263686976652d3100000001000000000000002800000000000000"
    "04000000000000007479706500000000070000000000000073796d6c696e6b000600000000000000"
    "746172676574000011000000000000002f6e69782f73746f72652f74617267657400000000000000"
    "01000000000000002900000000000000"
)

TV2 = Directory({
    b"Z": Regular(False, b"B"),
    b"hello": Regular(False, b"hello\n"),
    b"link": Symlink(b"hello"),
    b"run.sh": Regular(True, b"#!/bin/sh\necho hi\n"),
    b"sub": Directory({b"e": Regular(False, b"")}),
})
TV2_SHA256 = "51bcb00ed595c85661a237fed7cd2b8f89af6a3f4ecbe2a7c997704a7a66cd74"


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_vector_a_regular_file():
    nar = dump_string(b"hello\n")
    assert nar == VEC_A == dump_node(Regular(False, b"hello\n"))
    assert len(nar) == 120
    assert sha256(nar) == "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"
    assert Hash.of("sha256", nar).nix32 == "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"


def test_vector_b_executable():
    nar = dump_node(Regular(True, b"x"))
    assert nar == VEC_B and len(nar) == 152
    assert sha256(nar) == "f07b7b92bd7913e8ade1d804acbc8f938d47641bf65cef93a9472dc74099c3e1"
    assert Hash.of("sha256", nar).nix32 == "1qf3k50cfba7m69yyp7n3dj4g3ckiyyaq16qw6nyh4vrpn97nyzh"


def test_vector_c_symlink():
    nar = dump_node(Symlink(b"/nix/store/target"))
    assert nar == VEC_C and len(nar) == 136
    assert sha256(nar) == "186b3fe2db6c58e8a4ccfff75e316b7d4386f04e3fb0c213afadca6f1b854e90"
    assert Hash.of("sha256", nar).nix32 == "142fhldnzjmdmw9w5c1z9vq8chvxdcqmxxzzrjjfhn3cvgi3ysqq"


def test_vector_d_empty_file():
    nar = dump_string(b"")
    assert len(nar) == 112
    assert Hash.of("sha256", nar).nix32 == "0ip26j2h11n1kgkz36rl4akv694yz65hr72q4kv4b3lxcbi65b3p"


def test_vector_e_small_directory():
    nar = dump_node(Directory({b"x": Regular(False, b"x\n")}))
    assert len(nar) == 288
    assert sha256(nar) == "29bfe90aef5828d886bf632c3b7d8efd6f68858ca8de0ed9796142852a771975"


def test_vector_tv2_directory():
    nar = dump_node(TV2)
    assert len(nar) == 1264
    assert sha256(nar) == TV2_SHA256
    assert parse_to_node(nar) == TV2


@pytest.mark.parametrize("vec", [VEC_A, VEC_B, VEC_C])
def test_vectors_parse_back(vec):
    assert dump_node(parse_to_node(vec)) == vec


def test_entries_sorted_by_bytes_not_text():
    # As str (surrogateescape) b'\xc3\xa9' sorts before b'\x80x'; as bytes it is after.
    nar = dump_node(Directory({b"\xc3\xa9": Regular(False, b"1"), b"\x80x": Regular(False, b"2")}))
    assert nar.index(nar_str(b"\x80x")) < nar.index(nar_str(b"\xc3\xa9"))
    nar = dump_node(Directory({b"hello": Regular(False, b""), b"Z": Regular(False, b"")}))
    assert nar.index(nar_str(b"Z")) < nar.index(nar_str(b"hello"))


# --- hypothesis trees ----------------------------------------------------------

ODD_NAMES = [b"\xff", b"\x80x", b"\xc3\xa9", b"with space", b"new\nline", b"-dash", b"--",
             b"...", b".hidden", b"\t", b"Z", b"a", b"x" * 255, b"\\", b"*?[", b"\x01"]


def _legal_name(b: bytes) -> bytes:
    b = b.replace(b"/", b"_").replace(b"\0", b"_")
    return b + b"_" if b in (b".", b"..") else b


names = st.one_of(st.sampled_from(ODD_NAMES), st.binary(min_size=1, max_size=12).map(_legal_name))
targets = st.one_of(
    st.sampled_from([b"/nix/store/target", b"..", b".", b"../x/y", b"\xff\xfe", b"a" * 300]),
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"@")),
)
leaves = st.one_of(
    st.builds(Regular, st.booleans(), st.binary(max_size=300)),
    st.builds(Symlink, targets),
)
trees = st.recursive(
    leaves,
    lambda children: st.dictionaries(names, children, max_size=5).map(Directory),
    max_leaves=15,
)
dir_trees = st.dictionaries(names, trees, max_size=5).map(Directory)


class ShortReads:
    """A stream that returns at most a random few bytes per read."""

    def __init__(self, data: bytes, seed: int) -> None:
        self._io = io.BytesIO(data)
        self._rng = random.Random(seed)

    def read(self, n: int) -> bytes:
        return self._io.read(min(n, self._rng.randint(1, 9)))

    def tell(self) -> int:
        return self._io.tell()


@settings(max_examples=200)
@given(trees)
def test_roundtrip_dump_parse(node):
    nar = dump_node(node)
    assert parse_to_node(nar) == node


@settings(max_examples=50)
@given(trees, st.integers(0, 2**32), st.binary(min_size=1, max_size=20))
def test_reader_handles_short_reads_and_stops_at_the_end(node, seed, trailing):
    nar = dump_node(node)
    stream = ShortReads(nar + trailing, seed)
    read_nar(stream, NullSink())
    assert stream.tell() == len(nar)


@pytest.mark.parametrize("node", [TV2, Regular(True, b"x"), Symlink(b"t"), Directory({})])
def test_reader_consumes_exactly_the_nar(node):
    nar = dump_node(node)
    stream = io.BytesIO(nar + b"\x01more data after the NAR")
    read_nar(stream, NullSink())
    assert stream.tell() == len(nar)


def test_every_truncation_is_unexpected_end():
    nar = dump_node(TV2)
    for cut in range(len(nar)):
        with pytest.raises(NarError, match="unexpected end of NAR") as ei:
            read_nar(io.BytesIO(nar[:cut]), NullSink())
        assert ei.value.offset == cut


def test_parse_to_node_rejects_trailing_data():
    with pytest.raises(NarError, match="trailing data"):
        parse_to_node(VEC_A + b"\0" * 8)


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def directory(self, path):
        self.events.append(("dir", path))

    def regular_start(self, path, executable, size):
        self.events.append(("start", path, executable, size))

    def regular_data(self, chunk):
        self.events.append(("data", len(chunk)))

    def regular_end(self):
        self.events.append(("end",))

    def symlink(self, path, target):
        self.events.append(("link", path, target))


def test_sink_sees_paths_in_order_and_bounded_chunks():
    big = b"\xab" * (2 * CHUNK_SIZE + 5)
    tree = Directory({b"a": Directory({b"b": Regular(True, big), b"c": Symlink(b"../x")}),
                      b"z": Regular(False, b"")})
    sink = RecordingSink()
    read_nar(io.BytesIO(dump_node(tree)), sink)
    datas = [e[1] for e in sink.events if e[0] == "data"]
    assert datas == [CHUNK_SIZE, CHUNK_SIZE, 5]
    assert [e for e in sink.events if e[0] != "data"] == [
        ("dir", b""), ("dir", b"a"), ("start", b"a/b", True, len(big)), ("end",),
        ("link", b"a/c", b"../x"), ("start", b"z", False, 0), ("end",),
    ]


def test_hashing_reader_and_nar_digest():
    nar = dump_node(TV2)
    stream = io.BytesIO(nar + b"tail")
    h, size = nar_digest(stream)
    assert (h.base16, size) == (TV2_SHA256, 1264)
    assert stream.read() == b"tail"
    reader = HashingReader(io.BytesIO(nar), "sha1")
    assert reader.read(10) + reader.read() == nar
    assert reader.size == len(nar)
    assert reader.hash() == Hash.of("sha1", nar)


# --- malformed NARs --------------------------------------------------------------


class Raw(bytes):
    """Bytes put in the NAR as they are, not as a string token."""


def nar(*tokens: bytes) -> bytes:
    return b"".join(t if isinstance(t, Raw) else nar_str(t) for t in tokens)


M = b"nix-archive-1"


def reg(*body: bytes) -> tuple[bytes, ...]:
    return (b"(", b"type", b"regular", *body, b")")


def dir_of(*entries: bytes) -> bytes:
    parts = [M, b"(", b"type", b"directory"]
    for name in entries:
        parts += [b"entry", b"(", b"name", name, b"node", *reg(b"contents", b""), b")"]
    parts.append(b")")
    return nar(*parts)


def nested(depth: int) -> bytes:
    parts = [M]
    for _ in range(depth):
        parts += [b"(", b"type", b"directory", b"entry", b"(", b"name", b"d", b"node"]
    parts += reg(b"contents", b"")
    for _ in range(depth):
        parts += [b")", b")"]
    return nar(*parts)


def u64(n: int) -> Raw:
    return Raw(n.to_bytes(8, "little"))


# (id, NAR bytes, what the message must say)
MALFORMED = [
    ("bad-magic", nar(b"nix-archive-2", *reg(b"contents", b"")), "bad magic"),
    ("not-a-nar", b"\x1f\x8b\x08\x00" + bytes(100), "bad magic"),
    ("no-type", nar(M, b"(", b")"), "missing field 'type'"),
    ("unknown-field-before-type", nar(M, b"(", b"kind", b"regular"), "unknown field 'kind'"),
    ("unknown-type", nar(M, b"(", b"type", b"fifo", b")"), "unknown node type 'fifo'"),
    ("duplicated-type", nar(M, b"(", b"type", b"regular", b"type", b"regular", b")"),
     "duplicated field 'type'"),
    ("unknown-field", nar(M, *reg(b"size", b"1")), "unknown field 'size'"),
    ("missing-contents", nar(M, *reg()), "missing field 'contents'"),
    ("duplicated-contents", nar(M, *reg(b"contents", b"a", b"contents", b"b")),
     "duplicated field 'contents'"),
    ("duplicated-executable",
     nar(M, *reg(b"executable", b"", b"executable", b"", b"contents", b"")),
     "duplicated field 'executable'"),
    ("executable-after-contents", nar(M, *reg(b"contents", b"a", b"executable", b"")),
     "field 'executable' is not allowed here"),
    ("executable-value", nar(M, *reg(b"executable", b"1", b"contents", b"")),
     "'executable' marker has a non-empty value"),
    ("target-in-regular", nar(M, *reg(b"target", b"x")), "field 'target' is not allowed here"),
    ("symlink-no-target", nar(M, b"(", b"type", b"symlink", b")"), "missing field 'target'"),
    ("symlink-empty-target", nar(M, b"(", b"type", b"symlink", b"target", b"", b")"),
     "empty symlink target"),
    ("symlink-nul-target", nar(M, b"(", b"type", b"symlink", b"target", b"a\0b", b")"),
     "symlink target contains a NUL byte"),
    ("symlink-long-target", nar(M, b"(", b"type", b"symlink", b"target", b"a" * 4096, b")"),
     "symlink target is 4096 bytes long (limit 4095)"),
    ("symlink-two-targets",
     nar(M, b"(", b"type", b"symlink", b"target", b"a", b"target", b"b", b")"),
     "duplicated field 'target'"),
    ("directory-unknown-field", nar(M, b"(", b"type", b"directory", b"file", b")"),
     "unknown field 'file' (expected 'entry' or ')')"),
    ("entry-unknown-field", nar(M, b"(", b"type", b"directory", b"entry", b"(", b"name", b"a",
                                b"inode"), "unknown field 'inode'"),
    ("entry-without-name", nar(M, b"(", b"type", b"directory", b"entry", b"(", b"node"),
     "field 'node' is not allowed here"),
    ("name-empty", dir_of(b""), "empty entry name"),
    ("name-dot", dir_of(b"."), "entry name '.' is not allowed"),
    ("name-dotdot", dir_of(b".."), "entry name '..' is not allowed"),
    ("name-slash", dir_of(b"a/b"), "contains '/'"),
    ("name-nul", dir_of(b"a\0b"), "contains a NUL byte"),
    ("name-too-long", dir_of(b"n" * 256), "entry name is 256 bytes long (limit 255)"),
    ("unsorted", dir_of(b"a", b"c", b"b"), "directory entries not sorted ('b' after 'c')"),
    ("unsorted-bytes", dir_of(b"\xc3\xa9", b"\x80x"), "not sorted"),
    ("duplicate-entry", dir_of(b"a", b"a"), "duplicate directory entry 'a'"),
    ("padding-in-token", nar(M) + u64(1) + Raw(b"(\0\0\0\0\0\0\x01"), "non-zero padding"),
    ("padding-after-contents", nar(M, b"(", b"type", b"regular", b"contents") + u64(1)
     + Raw(b"x\0\0\0\0\0\x07\0") + nar(b")"), "non-zero padding after file contents"),
    ("padding-in-name", nar(M, b"(", b"type", b"directory", b"entry", b"(", b"name")
     + u64(1) + Raw(b"a\0\0\0\0\0\0\x02"), "non-zero padding after entry name"),
    ("huge-keyword", nar(M, b"(") + u64(2**40) + Raw(bytes(64)), "bytes long (limit 64)"),
    ("huge-contents", nar(M, b"(", b"type", b"regular", b"contents") + u64(2**63),
     "contents length 9223372036854775808 is larger"),
    ("contents-beyond-eof",
     nar(M, b"(", b"type", b"regular", b"contents") + u64(2**40) + Raw(b"x" * 64),
     "unexpected end of NAR"),
    ("too-deep", nested(MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
    ("missing-close", nar(M, b"(", b"type", b"regular", b"contents", b"x"),
     "unexpected end of NAR"),
    ("empty", b"", "unexpected end of NAR"),
]


@pytest.mark.parametrize("data,problem", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_is_refused(data, problem):
    with pytest.raises(NarError) as ei:
        read_nar(io.BytesIO(data), NullSink())
    assert problem in str(ei.value)
    assert str(ei.value).startswith(f"NAR error at byte {ei.value.offset} in ")
    assert isinstance(ei.value, FormatError)


def test_error_names_offset_and_archive_path():
    data = nar(M, b"(", b"type", b"directory",
               b"entry", b"(", b"name", b"sub", b"node", b"(", b"type", b"directory",
               b"entry", b"(", b"name", b"x", b"node", b"(", b"type", b"directory",
               b"entry", b"(", b"name", b"c", b"node", *reg(b"contents", b""), b")",
               b"entry", b"(", b"name", b"b")
    with pytest.raises(NarError) as ei:
        read_nar(io.BytesIO(data), NullSink())
    e = ei.value
    assert (e.offset, e.path) == (len(data) - 16, b"sub/x")
    assert str(e) == (f"NAR error at byte {len(data) - 16} in 'sub/x': "
                      "directory entries not sorted ('b' after 'c')")


def test_depth_limit_is_exact():
    parse_to_node(nested(MAX_DEPTH))
    with pytest.raises(NarError, match="nested deeper"):
        parse_to_node(nested(MAX_DEPTH + 1))


@pytest.mark.parametrize("node,problem", [
    (Directory({b"a/b": Regular(False, b"")}), "contains '/'"),
    (Directory({b"..": Regular(False, b"")}), "is not allowed"),
    (Directory({b"": Regular(False, b"")}), "empty entry name"),
    (Directory({b"d": Directory({b"x\0": Symlink(b"t")})}), "NUL"),
    (Symlink(b""), "empty symlink target"),
    (Directory({b"l": Symlink(b"x" * 4096)}), "limit 4095"),
])
def test_writer_refuses_what_the_reader_refuses(node, problem):
    with pytest.raises(NarError, match=problem):
        dump_node(node)
