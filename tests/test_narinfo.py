"""Binary-cache text formats and signatures (spec binary-cache.md §2, §3, §5), golden
against the caches real Nix 2.8 wrote (../shared/spec/binary-cache-vectors)."""

from __future__ import annotations

import glob
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storekeeper.formats.errors import FormatError
from storekeeper.formats.hashes import Hash
from storekeeper.formats.narinfo import CacheInfo, NarInfo, NarInfoError, nar_url
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.signatures import (
    PublicKey,
    SecretKey,
    SignatureError,
    fingerprint,
    is_content_addressed,
    is_trusted,
    parse_public_keys,
    sign_info,
    verify_sig,
)
from storekeeper.formats.storepath import StoreDir, StorePath

VECTORS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                        "shared", "spec", "binary-cache-vectors"))
NIX = StoreDir("/nix/store")
CS = StoreDir("/tmp/research-bc/cs/store")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def vector_narinfos() -> list[str]:
    found = sorted(glob.glob(os.path.join(VECTORS, "nix28-file-*", "*.narinfo")))
    assert len(found) >= 18, "the binary-cache vectors are missing"
    return found


def _store_dir_of(narinfo_file: str) -> StoreDir:
    return StoreDir(CacheInfo.parse(_read(os.path.join(os.path.dirname(narinfo_file),
                                                       "nix-cache-info"))).store_dir)


PUBLIC = PublicKey.parse(_read(os.path.join(VECTORS, "keys", "research-bc-1.public")))
SECRET = SecretKey.parse(_read(os.path.join(VECTORS, "keys", "research-bc-1.secret")))


# --- golden: every narinfo Nix wrote ------------------------------------------------------

@pytest.mark.parametrize("path", vector_narinfos(), ids=lambda p: "/".join(p.split("/")[-2:]))
def test_vector_narinfo_round_trips_byte_exact(path):
    text = _read(path)
    ni = NarInfo.parse(text, _store_dir_of(path), os.path.basename(path))
    assert ni.path.hash_part == os.path.basename(path)[:32]
    assert ni.render() == text
    # the URL is Nix's name for the file: nar/<nix32 FileHash>.nar<ext>
    if ni.compression != "gzip":
        assert ni.file_hash is not None and ni.url == nar_url(ni.file_hash, ni.compression)
    assert os.path.exists(os.path.join(os.path.dirname(path), ni.url))


@pytest.mark.parametrize("path", vector_narinfos(), ids=lambda p: "/".join(p.split("/")[-2:]))
def test_vector_signatures_verify_and_resign_identically(path):
    sd = _store_dir_of(path)
    ni = NarInfo.parse(_read(path), sd)
    info = ni.path_info()
    keys = {PUBLIC.name: PUBLIC}
    for sig in ni.sigs:
        assert verify_sig(sd, info, sig, keys)
        assert sign_info(sd, info, SECRET) == sig  # ed25519 is deterministic
    other = SecretKey.generate(PUBLIC.name).public()
    for sig in ni.sigs:
        assert not verify_sig(sd, info, sig, {other.name: other})
    # unsigned caches: only CA paths are trusted without a signature
    if not ni.sigs:
        assert is_trusted(sd, info, keys) == is_content_addressed(sd, info)


def test_fingerprints_of_the_spec():
    """The three fingerprints spec §5.2 shows, from the vectors' narinfos."""
    def fp(cache: str, hash_part: str, sd: StoreDir) -> str:
        ni = NarInfo.parse(_read(os.path.join(VECTORS, cache, hash_part + ".narinfo")), sd)
        return fingerprint(sd, ni.path_info()).decode()
    assert fp("nix28-file-zstd", "2qzxavkmc1a53hdc058phqdqyic53b67", NIX) == (
        "1;/nix/store/2qzxavkmc1a53hdc058phqdqyic53b67-a.txt;"
        "sha256:1pbgcf0rz5j7gd1rq5pb4bp58qxqmm79i0yhk7yiv6ng0dls90pj;120;")
    assert fp("nix28-file-zstd", "abdy0gp06c21k6cn2fd0w9l07x5drjgh", NIX) == (
        "1;/nix/store/abdy0gp06c21k6cn2fd0w9l07x5drjgh-b.txt;"
        "sha256:0kdwaimc9cngf8dbk3p020f1iv1njicg61cy5pdlm82bq245j6ia;168;"
        "/nix/store/2qzxavkmc1a53hdc058phqdqyic53b67-a.txt")
    assert fp("nix28-file-xz", "qsy18l8rk7lnkvv5cn8zf7xa7hvmz2ak", CS) == (
        "1;/tmp/research-bc/cs/store/qsy18l8rk7lnkvv5cn8zf7xa7hvmz2ak-demo-1.0;"
        "sha256:04f4j7s6jrlqp2l885g9i005dgxnm87z9k5jw7gpsfhzwjiqgjpp;608;"
        "/tmp/research-bc/cs/store/47azgk2sj1r1p469lpmqhmm00jsirb06-dep.txt,"
        "/tmp/research-bc/cs/store/qsy18l8rk7lnkvv5cn8zf7xa7hvmz2ak-demo-1.0")


def test_signed_input_addressed_path_needs_a_trusted_key():
    ni = NarInfo.parse(_read(os.path.join(VECTORS, "nix28-file-xz",
                                          "qsy18l8rk7lnkvv5cn8zf7xa7hvmz2ak.narinfo")), CS)
    info = ni.path_info()
    assert ni.ca is None and not is_content_addressed(CS, info)
    assert is_trusted(CS, info, {PUBLIC.name: PUBLIC})
    assert not is_trusted(CS, info, parse_public_keys([
        "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]))
    # a tampered field that is signed (NarSize) breaks it; one that is not (URL) does not
    assert not is_trusted(CS, info.with_(nar_size=info.nar_size + 1), {PUBLIC.name: PUBLIC})
    assert is_trusted(CS, ni.with_(url="nar/elsewhere.nar").path_info(), {PUBLIC.name: PUBLIC})
    # the store dir is signed too
    assert not verify_sig(StoreDir("/other/store"), info, sorted(ni.sigs)[0], {PUBLIC.name: PUBLIC})


def test_a_trusted_name_with_a_short_signature_is_an_error():
    ni = NarInfo.parse(_read(os.path.join(VECTORS, "nix28-file-xz",
                                          "qsy18l8rk7lnkvv5cn8zf7xa7hvmz2ak.narinfo")), CS)
    with pytest.raises(SignatureError, match="not valid"):
        verify_sig(CS, ni.path_info(), "research-bc-1:AAAA", {PUBLIC.name: PUBLIC})
    assert not verify_sig(CS, ni.path_info(), "someone-else:AAAA", {PUBLIC.name: PUBLIC})


def test_ca_claim_that_does_not_reproduce_the_path_is_not_exempt():
    ni = NarInfo.parse(_read(os.path.join(VECTORS, "nix28-file-zstd",
                                          "abdy0gp06c21k6cn2fd0w9l07x5drjgh.narinfo")), NIX)
    info = ni.path_info()
    assert is_content_addressed(NIX, info)
    forged = info.with_(ca="text:sha256:" + "0" * 52, sigs=frozenset())
    assert not is_content_addressed(NIX, forged) and not is_trusted(NIX, forged, {})


# --- key files ----------------------------------------------------------------------------

def test_vector_key_files():
    assert SECRET.public() == PUBLIC
    assert SECRET.render() == _read(os.path.join(VECTORS, "keys", "research-bc-1.secret"))
    assert PUBLIC.render() == _read(os.path.join(VECTORS, "keys", "research-bc-1.public"))
    # a trailing newline is fine (Nix's base64 decoder skips '\n')
    assert SecretKey.parse(SECRET.render() + "\n") == SECRET


@pytest.mark.parametrize("text, message", [
    ("no-colon", "corrupt"), (":AAAA", "corrupt"), ("name:", "corrupt"),
    ("k:q3eDsFtacHQsCEHabxXsDlh6VxzQeFSb0s0rJoUx2Tw\r=", "invalid character"),
    ("k:q3eD sFtacHQsCEHabxXsDlh6VxzQeFSb0s0rJoUx2Tw=", "invalid character"),
    ("k:AAAA", "not valid"),
])
def test_bad_public_keys(text, message):
    with pytest.raises(SignatureError, match=message):
        PublicKey.parse(text)


def test_secret_key_whose_halves_disagree_is_refused():
    bad = SecretKey(SECRET.name, SECRET.key[:32] + bytes(32)).render()
    with pytest.raises(SignatureError, match="not valid"):
        SecretKey.parse(bad)
    with pytest.raises(SignatureError, match="not valid"):
        SecretKey.parse(PUBLIC.render())


def test_generated_keys_sign_and_verify():
    k = SecretKey.generate("host-1")
    assert SecretKey.parse(k.render()) == k and k.public().name == "host-1"
    info = ValidPathInfo(StorePath("2qzxavkmc1a53hdc058phqdqyic53b67-a.txt"),
                         Hash.of("sha256", b"x"), 120)
    sig = sign_info(NIX, info, k)
    assert sig.startswith("host-1:")
    assert verify_sig(NIX, info, sig, {"host-1": k.public()})
    # first key of a name wins in trusted-public-keys
    keys = parse_public_keys([k.public().render(), SecretKey.generate("host-1").public().render()])
    assert keys["host-1"] == k.public()


# --- strict parsing, with Nix's leniencies -------------------------------------------------

BASE = ("StorePath: /nix/store/2qzxavkmc1a53hdc058phqdqyic53b67-a.txt\n"
        "URL: nar/1pbgcf0rz5j7gd1rq5pb4bp58qxqmm79i0yhk7yiv6ng0dls90pj.nar\n"
        "Compression: none\n"
        "NarHash: sha256:1pbgcf0rz5j7gd1rq5pb4bp58qxqmm79i0yhk7yiv6ng0dls90pj\n"
        "NarSize: 120\n")


def test_leniencies_of_the_spec():
    ni = NarInfo.parse(BASE.replace("Compression: none\n", "") + "X-Extra: ignored\n"
                       "Deriver: unknown-deriver\n", NIX)
    assert ni.compression == "bzip2"          # missing Compression
    assert ni.references == frozenset()       # missing References
    assert ni.deriver is None                 # cachix's unknown-deriver
    assert ni.file_hash is None and ni.file_size is None
    sri = Hash.parse("sha256:1pbgcf0rz5j7gd1rq5pb4bp58qxqmm79i0yhk7yiv6ng0dls90pj").sri
    assert NarInfo.parse(BASE.replace("sha256:1pbg", "XX").replace(
        "NarHash: XXcf0rz5j7gd1rq5pb4bp58qxqmm79i0yhk7yiv6ng0dls90pj", f"NarHash: {sri}"),
        NIX).nar_hash == ni.nar_hash
    refs = NarInfo.parse(BASE + "References:  2qzxavkmc1a53hdc058phqdqyic53b67-a.txt \n", NIX)
    assert refs.references == {StorePath("2qzxavkmc1a53hdc058phqdqyic53b67-a.txt")}


@pytest.mark.parametrize("text, message", [
    (BASE[:-1], "no newline"),
    (BASE + "References:\nSig: k:AAAA\n", "expected 'Name: value'"),
    (BASE.replace("StorePath: /nix/store/2qzxavkmc1a53hdc058phqdqyic53b67-a.txt\n", ""), "no StorePath"),
    (BASE.replace("NarSize: 120", "NarSize: 0"), "NarSize is 0"),
    (BASE.replace("NarSize: 120", "NarSize: 12x"), "not a decimal"),
    (BASE.replace("URL: nar/", "URL: ").replace(
        "URL: 1pbgcf0rz5j7gd1rq5pb4bp58qxqmm79i0yhk7yiv6ng0dls90pj.nar", "URL: "), "no URL"),
    (BASE + "NarSize: 120\n", "given twice"),
    (BASE + "CA: text:x\nCA: text:y\n", "given twice"),
    (BASE + "References: 2qzxavkmc1a53hdc058phqdqyic53b67-a.txt\nReferences: x\n", "second References"),
    (BASE + "References: not-a-path\n", "too short"),
    (BASE.replace("/nix/store/", "/other/store/"), "not in the Nix store"),
    (BASE.replace("NarHash: sha256:", "NarHash: "), "does not say its algorithm"),
    (b"StorePath: \xff\n", "UTF-8"),
])
def test_malformed_narinfos_are_refused_with_a_clear_message(text, message):
    with pytest.raises(NarInfoError, match=message) as e:
        NarInfo.parse(text, NIX, "x.narinfo")
    assert "x.narinfo" in str(e.value) and isinstance(e.value, FormatError)


def test_empty_references_keep_their_trailing_space():
    text = NarInfo.parse(BASE, NIX).render()
    assert "\nReferences: \n" in text


_hashes = st.binary(min_size=32, max_size=32).map(lambda d: Hash("sha256", d))
_names = st.from_regex(r"[a-z0-9][a-z0-9+._=-]{0,20}", fullmatch=True)
_paths = st.builds(lambda h, n: StorePath(f"{h.nix32[:32]}-{n}"), _hashes, _names)


@settings(max_examples=60, deadline=None)
@given(path=_paths, refs=st.frozensets(_paths, max_size=4), nar_hash=_hashes,
       nar_size=st.integers(1, 2**63), file=st.one_of(st.none(), st.tuples(_hashes, st.integers(0, 2**40))),
       compression=st.sampled_from(["xz", "zstd", "bzip2", "br", "none"]),
       deriver=st.one_of(st.none(), _paths), system=st.sampled_from(["", "x86_64-linux"]),
       sigs=st.frozensets(st.from_regex(r"[a-z0-9.-]{1,10}:[A-Za-z0-9+/]{86}==", fullmatch=True), max_size=3),
       ca=st.one_of(st.none(), _hashes.map(lambda h: f"fixed:r:{h.typed('nix32')}")))
def test_render_parse_round_trip(path, refs, nar_hash, nar_size, file, compression, deriver,
                                 system, sigs, ca):
    fh, fs = file if file else (None, None)
    ni = NarInfo(NIX, path, f"nar/{(fh or nar_hash).nix32}.nar", nar_hash, nar_size, compression,
                 fh, fs, refs, deriver, system, sigs, ca)
    text = ni.render()
    assert NarInfo.parse(text, NIX) == ni
    assert NarInfo.parse(text.encode(), NIX).render() == text
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines][:3] == ["StorePath", "URL", "Compression"]
    assert lines[-1].startswith("CA: ") == bool(ca)


# --- nix-cache-info -------------------------------------------------------------------------

def test_nix_cache_info():
    assert CacheInfo.parse("StoreDir: /nix/store\n") == CacheInfo("/nix/store")
    ci = CacheInfo.parse("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\njunk\nX: y\n")
    assert (ci.want_mass_query, ci.priority, ci.extra) == (True, 40, {"X": "y"})
    assert CacheInfo.parse(ci.render()) == ci
    assert CacheInfo("/nix/store").render() == "StoreDir: /nix/store\n"  # what Nix writes
    assert not CacheInfo.parse("StoreDir: /s\nWantMassQuery: true\n").want_mass_query
    with pytest.raises(NarInfoError, match="no StoreDir"):
        CacheInfo.parse("Priority: 1\n")
    with pytest.raises(NarInfoError, match="Priority"):
        CacheInfo.parse("StoreDir: /s\nPriority: high\n")
    for d in glob.glob(os.path.join(VECTORS, "nix28-file-*")):
        text = _read(os.path.join(d, "nix-cache-info"))
        assert CacheInfo.parse(text).render() == text


_LINES = st.sampled_from(BASE.splitlines() + [
    "References: ", "References: 2qzxavkmc1a53hdc058phqdqyic53b67-a.txt", "Deriver: x",
    "Deriver: unknown-deriver", "Sig: k:abc", "Sig: ", "CA: fixed:sha256:x", "FileSize: -1",
    "FileHash: md5:00", "NarSize: 99999999999999999999999", "System: x86_64-linux", ":", "",
    "Compression:", "URL: ", "StorePath: /nix/store/x", "NarHash: sha256-AAAA"])


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.one_of(_LINES, st.text(max_size=40)), max_size=14),
       newline=st.booleans())
def test_any_text_parses_or_fails_with_a_narinfo_error(lines, newline):
    """Whatever the input, the parser answers a NarInfo that renders and re-parses to
    itself, or a NarInfoError; never another exception."""
    text = "\n".join(lines) + ("\n" if newline else "")
    try:
        ni = NarInfo.parse(text, NIX, "fuzz.narinfo")
    except NarInfoError as e:
        assert str(e).startswith("fuzz.narinfo")
        return
    assert NarInfo.parse(ni.render(), NIX) == ni
