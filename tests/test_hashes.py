import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storekeeper.formats.errors import FormatError
from storekeeper.formats.hashes import (
    ALGO_SIZES,
    Hash,
    compress_hash,
    nix32_decode,
    nix32_encode,
    nix32_len,
)


def reference_nix32(h: bytes) -> str:
    # The byte-walking loop of spec §1.2, as an independent check of our big-int version.
    a = "0123456789abcdfghijklmnpqrsvwxyz"
    out = []
    for n in range((len(h) * 8 - 1) // 5, -1, -1):
        i, j = divmod(n * 5, 8)
        c = h[i] >> j
        if i + 1 < len(h):
            c |= h[i + 1] << (8 - j)
        out.append(a[c & 31])
    return "".join(out)


def test_spec_vectors():
    assert nix32_encode(bytes([1] + [0] * 19)) == "00000000000000000000000000000001"
    assert nix32_encode(bytes([0] * 19 + [0x80])) == "h0000000000000000000000000000000"
    assert nix32_encode(hashlib.sha256(b"").digest()) == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    nar = bytes.fromhex("1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13")
    assert nix32_encode(nar) == "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
    # nix-hash --type sha256 --truncate a.txt: the NAR hash of "hello\n", folded to 160 bits
    assert compress_hash(nar).hex() == "ad4bb8ea749da9c7d6e0222fc3df44377a699afb"
    assert nix32_encode(compress_hash(nar)) == "zfd6jyip8kgw6br2w3bcgacxfkmbhjxd"


@pytest.mark.parametrize("algo,n", [("md5", 26), ("sha1", 32), ("sha256", 52), ("sha512", 103)])
def test_lengths(algo, n):
    assert nix32_len(ALGO_SIZES[algo]) == n
    assert len(Hash.of(algo, b"x").nix32) == n


@given(st.binary(min_size=1, max_size=64))
def test_nix32_matches_reference_and_round_trips(data):
    enc = nix32_encode(data)
    assert enc == reference_nix32(data)
    assert nix32_decode(enc, len(data)) == data


@given(st.sampled_from(sorted(ALGO_SIZES)), st.binary(max_size=100))
def test_hash_encodings_round_trip(algo, data):
    h = Hash.of(algo, data)
    for enc in ("base16", "nix32", "base64"):
        assert Hash.parse(h.encode(enc), algo) == h
        assert Hash.parse(h.typed(enc)) == h
    assert Hash.parse(h.sri) == h
    assert h.base64 == base64.b64encode(h.digest).decode()


def test_parse_errors_are_clear():
    with pytest.raises(FormatError, match="unknown hash algorithm"):
        Hash.parse("sha3:abcd")
    with pytest.raises(FormatError, match="does not say its algorithm"):
        Hash.parse("abcd")
    with pytest.raises(FormatError, match="invalid character"):
        Hash.parse("sha256:" + "e" * 52)
    with pytest.raises(FormatError, match="non-zero bits"):
        nix32_decode("z" * 52, 32)
    with pytest.raises(FormatError):
        Hash.parse("sha256:" + "0" * 63)
    with pytest.raises(FormatError, match="should be sha1"):
        Hash.parse("sha256:" + "0" * 64, "sha1")
