"""The worker-protocol wire primitives (formats/wire.py), against the spec and the captures."""

from __future__ import annotations

import io
import os

import pytest
from daemon_util import CAPTURES, SD, load_capture
from hypothesis import given, settings
from hypothesis import strategies as st

from storekeeper.formats.errors import FormatError
from storekeeper.formats.hashes import Hash
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.storepath import StorePath
from storekeeper.formats.wire import (
    MAX_PATH_LEN,
    PROTOCOL_1_34,
    PROTOCOL_VERSION,
    WORKER_MAGIC_1,
    WORKER_MAGIC_2,
    DerivedPath,
    FramedReader,
    FramedWriter,
    Stderr,
    WireEOF,
    WireError,
    WireReader,
    WireWriter,
    frame,
    read_error,
    read_path_info,
    read_stderr_message,
    write_error,
    write_path_info,
    write_result,
    write_start_activity,
    write_stop_activity,
)


def reader(data: bytes) -> WireReader:
    return WireReader(io.BytesIO(data))


class Trickle:
    """A stream that hands out at most ``step`` bytes per read (short reads)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def read(self, n: int) -> bytes:
        n = min(n, self.step)
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


# --- primitives ------------------------------------------------------------------

def test_constants_match_the_spec_bytes():
    assert WireWriter().u64(WORKER_MAGIC_1).take() == b"cxin\0\0\0\0"
    assert WireWriter().u64(WORKER_MAGIC_2).take() == b"oixd\0\0\0\0"
    assert PROTOCOL_VERSION == (1 << 8) | 38
    assert WireWriter().u64(Stderr.LAST).take() == bytes.fromhex("73746c6100000000")


def test_strings_are_padded_and_the_empty_string_is_eight_zeros():
    assert WireWriter().string("").take() == bytes(8)
    assert WireWriter().string("abc").take() == (3).to_bytes(8, "little") + b"abc" + bytes(5)
    assert WireWriter().string(b"12345678").take() == (8).to_bytes(8, "little") + b"12345678"


def test_bools_are_strict():
    assert reader((1).to_bytes(8, "little")).boolean() is True
    assert reader(bytes(8)).boolean() is False
    with pytest.raises(WireError, match="expected a boolean"):
        reader((2).to_bytes(8, "little")).boolean("repair")


def test_non_zero_padding_is_refused():
    data = (3).to_bytes(8, "little") + b"abc" + b"\0\0\0\0\1"
    with pytest.raises(WireError, match="non-zero padding"):
        reader(data).string()


def test_lengths_and_counts_are_capped_before_reading():
    huge = (1 << 40).to_bytes(8, "little")
    with pytest.raises(WireError, match="limit"):
        reader(huge).string("name")
    with pytest.raises(WireError, match="too large"):
        reader(huge).strings("references")
    long_path = WireWriter().string("/nix/store/" + "a" * MAX_PATH_LEN).take()
    with pytest.raises(WireError, match="limit"):
        reader(long_path).store_path(SD)


def test_truncation_is_wire_eof():
    with pytest.raises(WireEOF):
        reader(b"\1\0\0").u64()
    with pytest.raises(WireEOF):
        reader((10).to_bytes(8, "little") + b"short").string()
    assert isinstance(WireEOF("x"), FormatError)


def test_u64_range_checks():
    with pytest.raises(WireError):
        WireWriter().u64(-1)
    with pytest.raises(WireError):
        WireWriter().u64(1 << 64)
    with pytest.raises(WireError, match="too large"):
        reader((1 << 32).to_bytes(8, "little")).u64("verbosity", 0xFFFFFFFF)


def test_store_paths_are_parsed_against_the_store_dir():
    ok = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
    assert reader(WireWriter().string(ok).take()).store_path(SD).name == "hello.txt"
    for bad in ("/tmp/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt", "/nix/store/short",
                "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-bad/name"):
        with pytest.raises(WireError):
            reader(WireWriter().string(bad).take()).store_path(SD)
    assert reader(bytes(8)).opt_store_path(SD) is None


@settings(max_examples=60, deadline=None)
@given(u=st.integers(0, 2**64 - 1), b=st.booleans(), data=st.binary(max_size=100),
       items=st.lists(st.text(max_size=20), max_size=8),
       mapping=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5),
       step=st.integers(1, 9))
def test_round_trips(u, b, data, items, mapping, step):
    enc = WireWriter().u64(u).boolean(b).string(data).strings(items).string_map(mapping).take()
    assert len(enc) % 8 == 0
    r = WireReader(Trickle(enc, step))
    assert (r.u64(), r.boolean(), r.bytes(), r.strings(), r.string_map()) == (u, b, data, items, mapping)
    assert r.offset == len(enc)


@settings(max_examples=30, deadline=None)
@given(raw=st.binary(max_size=40))
def test_strings_carry_any_bytes(raw):
    text = reader(WireWriter().string(raw).take()).string()
    assert WireWriter().string(text).take() == WireWriter().string(raw).take()


# --- framing -------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=3000), chunk=st.integers(1, 700), step=st.integers(1, 50),
       read_size=st.integers(1, 900))
def test_framed_round_trip(payload, chunk, step, read_size):
    after = WireWriter().string("next message").take()
    stream = WireReader(Trickle(frame(payload, chunk) + after, step))
    fr = FramedReader(stream)
    got = bytearray()
    while piece := fr.read(read_size):
        assert len(piece) <= read_size
        got += piece
    assert bytes(got) == payload and fr.finished and fr.read(10) == b""
    assert stream.string() == "next message"  # not one byte past the terminator


def test_framed_drain_and_frame_sizes():
    payload = bytes(range(256)) * 10
    out = []
    w = FramedWriter(out.append, chunk_size=1000)
    w.write(payload[:10])
    w.write(payload[10:])
    w.close()
    assert [int.from_bytes(c[:8], "little") for c in out] == [1000, 1000, 560, 0]
    stream = reader(b"".join(out) + b"tail")
    fr = FramedReader(stream)
    assert fr.read(5) == payload[:5]
    assert fr.drain() == len(payload) - 5 and fr.finished
    assert stream.read_exact(4) == b"tail"
    assert frame(b"") == bytes(8)


def test_broken_framing_is_remembered():
    fr = FramedReader(reader((100).to_bytes(8, "little") + b"only a few"))
    with pytest.raises(WireEOF):
        fr.read(100)
    assert fr.broken is not None
    with pytest.raises(WireEOF):
        fr.read(1)
    too_big = FramedReader(reader((1 << 40).to_bytes(8, "little")))
    with pytest.raises(WireError, match="larger than the limit"):
        too_big.read(1)
    assert too_big.broken is not None


# --- ValidPathInfo ----------------------------------------------------------------------

hash_parts = st.text("0123456789abcdfghijklmnpqrsvwxyz", min_size=32, max_size=32)
names = st.from_regex(r"[a-z][a-z0-9+._-]{0,20}", fullmatch=True)
store_paths = st.builds(lambda h, n: StorePath(f"{h}-{n}"), hash_parts, names)
infos = st.builds(
    ValidPathInfo,
    path=store_paths,
    nar_hash=st.binary(min_size=32, max_size=32).map(lambda d: Hash("sha256", d)),
    nar_size=st.integers(0, 2**63),
    references=st.frozensets(store_paths, max_size=4),
    deriver=st.none() | store_paths,
    registration_time=st.integers(0, 2**40),
    ultimate=st.booleans(),
    sigs=st.frozensets(st.from_regex(r"[a-z]{1,8}-1:[A-Za-z0-9+/]{4,12}=?=?", fullmatch=True), max_size=3),
    ca=st.none() | st.just("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"),
)


@settings(max_examples=60, deadline=None)
@given(info=infos, with_path=st.booleans())
def test_path_info_round_trip(info, with_path):
    data = write_path_info(WireWriter(), SD, info, with_path).take()
    r = reader(data)
    got = read_path_info(r, SD, path=None if with_path else info.path)
    assert got == info and r.offset == len(data)


def test_path_info_matches_a_captured_reply():
    # q_references: the second QueryPathInfo reply (hello.txt), after LAST + valid=1.
    _, s2c = load_capture("q_references")
    info = ValidPathInfo(
        SD.parse("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"),
        Hash.parse("sha256:1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"),
        120, registration_time=1795317863,
        ca="fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
    reply = WireWriter().u64(Stderr.LAST).boolean(True).take() + \
        write_path_info(WireWriter(), SD, info, with_path=False).take()
    assert s2c.endswith(reply)


def test_nar_hash_accepts_any_encoding():
    h = Hash.parse("sha256:1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13")
    for text in (h.base16, h.typed("base16"), h.typed("nix32"), h.sri):
        data = WireWriter().string("").string(text).strings([]).u64(0).u64(1).boolean(False) \
            .strings([]).string("").take()
        assert read_path_info(reader(data), SD, path=StorePath("0" * 32 + "-x")).nar_hash == h
    bad = WireWriter().string("").string("nothex").strings([]).take()
    with pytest.raises(WireError, match="narHash"):
        read_path_info(reader(bad), SD, path=StorePath("0" * 32 + "-x"))


# --- DerivedPath --------------------------------------------------------------------------

def test_derived_paths():
    drv = "/nix/store/mh3rz2qzm0lrcxk22g2b1kifak7q2nj9-x.drv"
    assert DerivedPath.parse(SD, drv + "!out").outputs == {"out"}
    assert DerivedPath.parse(SD, drv + "!out,dev").render(SD) == drv + "!dev,out"
    star = DerivedPath.parse(SD, drv + "!*")
    assert star.all_outputs and star.render(SD) == drv + "!*"
    assert not DerivedPath.parse(SD, drv).is_built
    assert DerivedPath.parse(SD, "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt!out").is_built
    for bad in (drv + "!", drv + "!out,", "/tmp/x.drv!out"):
        with pytest.raises(WireError):
            DerivedPath.parse(SD, bad)


# --- the log channel -------------------------------------------------------------------------

def test_error_record_matches_the_capture():
    # untrusted_import_error ends with exactly one STDERR_ERROR record.
    _, s2c = load_capture("untrusted_import_error")
    msg = ("cannot add path '\x1b[35;1m/nix/store/426makpv1w1q1z4wgwvmlca5b86c289i-g3.txt\x1b[0m' "
           "because it lacks a valid signature")
    assert s2c.endswith(write_error(WireWriter(), msg).take())


@settings(max_examples=40, deadline=None)
@given(msg=st.text(max_size=50), traces=st.lists(st.text(max_size=20), max_size=3),
       minor=st.sampled_from([21, 25, 26, 34]))
def test_error_round_trip(msg, traces, minor):
    data = write_error(WireWriter(), msg, traces, client_minor=minor).take()
    m = read_stderr_message(reader(data), minor)
    assert m.kind is Stderr.ERROR and m.payload.message == msg
    assert m.payload.traces == (traces if minor >= 26 else [])


def test_activity_messages_round_trip():
    w = WireWriter()
    write_start_activity(w, 7, 3, 105, "building '/nix/store/x.drv'", ["/nix/store/x.drv", "", 1, 1], 0)
    write_result(w, 7, 101, ["a log line"])
    write_stop_activity(w, 7)
    r = reader(w.take())
    assert read_stderr_message(r).payload == (7, 3, 105, "building '/nix/store/x.drv'",
                                              ["/nix/store/x.drv", "", 1, 1], 0)
    assert read_stderr_message(r).payload == (7, 101, ["a log line"])
    assert read_stderr_message(r).payload == 7
    with pytest.raises(WireError, match="unknown log message code"):
        read_stderr_message(reader((12345).to_bytes(8, "little")))
    with pytest.raises(WireError):
        write_start_activity(WireWriter(), 1, 0, 0, "", [True])


def test_read_error_rejects_positions():
    data = WireWriter().string("Error").u64(0).string("Error").string("m").u64(1).take()
    with pytest.raises(WireError, match="havePos"):
        read_error(reader(data))


def test_every_capture_server_stream_starts_with_the_handshake():
    names = sorted(f[:-len(".s2c.hex")] for f in os.listdir(CAPTURES) if f.endswith(".s2c.hex"))
    assert len(names) >= 20
    for name in names:
        c2s, s2c = load_capture(name)
        r = reader(s2c)
        assert (r.u64(), r.u64(), r.string()) == (WORKER_MAGIC_2, PROTOCOL_1_34, "2.8.0")  # (real Nix 2.8 conversations)
        assert read_stderr_message(r).kind is Stderr.LAST
        c = reader(c2s)
        assert (c.u64(), c.u64(), c.u64(), c.u64()) == (WORKER_MAGIC_1, PROTOCOL_1_34, 0, 0)
