import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storekeeper.formats.contentaddress import ContentAddress
from storekeeper.formats.hashes import Hash
from storekeeper.formats.storepath import StoreDir, StorePath, StorePathError

SD = StoreDir()
NAME_CHARS = string.ascii_letters + string.digits + "+-._?="


def test_source_path_tv1():
    nar = Hash.parse("sha256:1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13")
    assert SD.print(SD.make_fixed_output_path("a.txt", True, nar)) == \
        "/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt"


def test_dir_paths_tv2():
    h = Hash.parse("sha256:51bcb00ed595c85661a237fed7cd2b8f89af6a3f4ecbe2a7c997704a7a66cd74")
    assert str(SD.make_fixed_output_path("dir1", True, h)) == "aw86ds5imvy8ds8434689rw2slfc8lvx-dir1"
    h = Hash.parse("sha256:29bfe90aef5828d886bf632c3b7d8efd6f68858ca8de0ed9796142852a771975")
    assert str(SD.make_fixed_output_path("d", True, h)) == "sh3dfhbqwb9ms0j73f1zsx8k72hmdm74-d"


@pytest.mark.parametrize("algo,recursive,digest,expected", [
    ("sha256", False, None, "fdwm55r4skpypx1gwzb7x69ckav1rv09-a.txt"),
    ("sha1", False, "f572d396fae9206628714fb2ce00f72e94f2258f", "ai1nh82p4c5ylq44c5yqamdsl6s74p63-a.txt"),
    ("md5", False, "b1946ac92492d2347c6235b4d2611184", "ql4vf9nr3hjsc5rjwh6bsycgb65khwb4-a.txt"),
])
def test_fixed_output_tv3(algo, recursive, digest, expected):
    h = Hash.of(algo, b"hello\n")
    if digest:
        assert h.base16 == digest
    assert str(SD.make_fixed_output_path("a.txt", recursive, h)) == expected


def test_recursive_sha512_and_sha1_tv3():
    from storekeeper.formats.nar import dump_string
    h = Hash.of("sha512", dump_string(b"hello\n"))
    assert str(SD.make_fixed_output_path("a.txt", True, h)) == "kvjq34s6w9i0ikda7kkfp45ggkahc8ww-a.txt"
    h = Hash.parse("sha1:50837f93e20545dabad68b10d19004ed6f5457c6")
    assert str(SD.make_fixed_output_path("dir1", True, h)) == "4cysl4mbc1dpcj72hswsfifbp9bgf6zq-dir1"


def test_text_paths_tv4():
    foo = SD.make_text_path_for("foo.txt", b"bar")
    assert SD.print(foo) == "/nix/store/71bjzxqgii13agm1np9jl9aqxim5pp51-foo.txt"
    ref = SD.make_text_path_for("ref.txt", f"see {SD.print(foo)}".encode(), [foo])
    assert SD.print(ref) == "/nix/store/mhvkn5ih8352mzkrvdyq8mxpnih2nx5a-ref.txt"


def test_content_address_forms():
    ca = ContentAddress.parse("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
    assert ca.render() == "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
    assert str(ca.store_path(SD, "a.txt")) == "z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt"
    md5 = ContentAddress.parse("fixed:md5:4425hx5d1mc9y39llj4k4nm55i")
    assert md5.hash.algo == "md5" and md5.render() == "fixed:md5:4425hx5d1mc9y39llj4k4nm55i"


def test_parse_strict_and_lax():
    good = "/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt"
    assert SD.parse(good).name == "a.txt"
    # 2.8 does not check the '-' after the hash part (we do, lax or not: issue 11),
    # and accepts '.' and '..' names (we do when lax)
    odd = "/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vqXfoo.txt"
    for lax in (False, True):
        with pytest.raises(StorePathError, match="no '-' after its hash part"):
            SD.parse(odd, lax=lax)
        with pytest.raises(StorePathError):
            StorePath.from_base("z3n6ml62lc6l9glpaz6fq7fvi2rks9vq/etc", lax=lax)
    with pytest.raises(StorePathError):
        SD.parse("/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-..")
    assert SD.parse("/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-..", lax=True)
    for bad, why in [
        ("/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-", "too short"),
        ("/nix/store/e3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a", "nix32"),
        ("/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a b", "forbidden character"),
        ("/other/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a", "not in the Nix store"),
        ("/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-" + "x" * 212, "longer than 211"),
    ]:
        with pytest.raises(StorePathError, match=why):
            SD.parse(bad)


def test_split_sub_path():
    sp, rest = SD.split("/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt/bin/x")
    assert sp.name == "a.txt" and rest == "/bin/x"


@given(st.text(NAME_CHARS, min_size=1, max_size=211).filter(
    lambda n: n not in (".", "..") and not n.startswith((".-", "..-"))))
def test_names_round_trip(name):
    sp = SD.make_text_path_for(name, b"x")
    assert SD.parse(SD.print(sp)) == sp
    assert StorePath.from_base(sp.base).name == name
