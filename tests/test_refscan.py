import random

from hypothesis import given
from hypothesis import strategies as st

from storekeeper.formats.hashes import NIX32_ALPHABET
from storekeeper.formats.refscan import RefScanner, scan_references

HASHES = ["".join(random.Random(i).choice(NIX32_ALPHABET) for _ in range(32)) for i in range(8)]


def test_finds_hash_parts_anywhere():
    data = b"xx/nix/store/" + HASHES[0].encode() + b"-foo\0" + HASHES[3].encode() + b"yy"
    assert scan_references([data], HASHES) == {HASHES[0], HASHES[3]}


def test_ignores_partial_and_neighbouring_matches():
    data = HASHES[1][:31].encode() + b"!" + HASHES[2][1:].encode()
    assert scan_references([data], HASHES) == set()


def test_hash_inside_a_longer_nix32_run_is_found():
    data = b"abc" + HASHES[4].encode() + b"0123"
    assert scan_references([data], HASHES) == {HASHES[4]}


@given(st.lists(st.sampled_from(HASHES), max_size=5), st.binary(max_size=200),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20))
def test_chunk_boundaries_do_not_matter(present, noise, cuts):
    data = noise
    for h in present:
        data += h.encode() + noise[:7]
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(data[pos:pos + c])
        pos += c
    chunks.append(data[pos:])
    assert scan_references(chunks, HASHES) == scan_references([data], HASHES)
    assert set(present) <= scan_references(chunks, HASHES)


def test_scanner_incremental_found():
    s = RefScanner(HASHES)
    s.feed(HASHES[5][:10].encode())
    assert s.found == set()
    s.feed(HASHES[5][10:].encode())
    assert s.found == {HASHES[5]}
