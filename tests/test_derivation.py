"""Derivations: ATerm parse/print, hashDerivationModulo, output and .drv paths (spec §3)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from storekeeper.formats.derivation import (
    Derivation,
    DerivationOutput,
    DerivationParseError,
    DerivationType,
    OutputKind,
    check_derivation_outputs,
    derivation_output_paths,
    derivation_store_path,
    derivation_type,
    fill_output_paths,
    fixed_output,
    hash_derivation_modulo,
    parse_derivation,
    print_derivation,
)
from storekeeper.formats.errors import FormatError
from storekeeper.formats.hashes import nix32_encode
from storekeeper.formats.storepath import StoreDir

SD = StoreDir("/nix/store")

# --- spec §3.5 vectors ----------------------------------------------------------

FO_PATH = "/nix/store/2znqizxjbysr037wnbk0gylmv8jyj3lp-fo.drv"
A_PATH = "/nix/store/f0qhjmj9y3c83s5f97byr4rbf3a14mwf-a.drv"
FO_OUT = "/nix/store/nqf0xn3i5yddaqga5lmixksnxg099q5c-fo"
A_OUT = "/nix/store/4b422f4w9x1vkpyhmlqqxnpg3fcqirvv-a"
A_DEV = "/nix/store/kpsjnqrj0z495f1vi61kv8gw9agxm5il-a-dev"
BUILDER_SH = "/nix/store/cmjd9zmysnc584p1yy3wdlk3cildhn4l-builder.sh"
HELLO_SHA256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
FO_MODULO = "d90427fa7654d02c29f0563463fb00c0743e4454d146ce15cb7c1cf53750d987"
A_MODULO = "a901369fabe385458fa2ff46320da7281754f496f750e0cc1908a9d3eda37fc6"

FO_DRV = (
    b'Derive([("out","/nix/store/nqf0xn3i5yddaqga5lmixksnxg099q5c-fo","sha256",'
    b'"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")],[],[],'
    b'"x86_64-linux","/bin/sh",["-c","printf hello > $out"],[("builder","/bin/sh"),'
    b'("name","fo"),("out","/nix/store/nqf0xn3i5yddaqga5lmixksnxg099q5c-fo"),'
    b'("outputHash","2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"),'
    b'("outputHashAlgo","sha256"),("outputHashMode","flat"),("system","x86_64-linux")])'
)
A_DRV = (
    b'Derive([("dev","/nix/store/kpsjnqrj0z495f1vi61kv8gw9agxm5il-a-dev","",""),'
    b'("out","/nix/store/4b422f4w9x1vkpyhmlqqxnpg3fcqirvv-a","","")],'
    b'[("/nix/store/2znqizxjbysr037wnbk0gylmv8jyj3lp-fo.drv",["out"])],'
    b'["/nix/store/cmjd9zmysnc584p1yy3wdlk3cildhn4l-builder.sh"],"x86_64-linux","/bin/sh",'
    b'["-e","/nix/store/cmjd9zmysnc584p1yy3wdlk3cildhn4l-builder.sh"],[("builder","/bin/sh"),'
    b'("dep","/nix/store/nqf0xn3i5yddaqga5lmixksnxg099q5c-fo"),'
    b'("dev","/nix/store/kpsjnqrj0z495f1vi61kv8gw9agxm5il-a-dev"),("name","a"),'
    b'("out","/nix/store/4b422f4w9x1vkpyhmlqqxnpg3fcqirvv-a"),("outputs","out dev"),'
    b'("system","x86_64-linux"),("weird","line1\\nline2\\t\\"q\\" \\\\ back")])'
)
A_MASKED = (
    b'Derive([("dev","","",""),("out","","","")],'
    b'[("d90427fa7654d02c29f0563463fb00c0743e4454d146ce15cb7c1cf53750d987",["out"])],'
    b'["/nix/store/cmjd9zmysnc584p1yy3wdlk3cildhn4l-builder.sh"],"x86_64-linux","/bin/sh",'
    b'["-e","/nix/store/cmjd9zmysnc584p1yy3wdlk3cildhn4l-builder.sh"],[("builder","/bin/sh"),'
    b'("dep","/nix/store/nqf0xn3i5yddaqga5lmixksnxg099q5c-fo"),("dev",""),("name","a"),'
    b'("out",""),("outputs","out dev"),("system","x86_64-linux"),'
    b'("weird","line1\\nline2\\t\\"q\\" \\\\ back")])'
)


def reader(drvs: dict[str, Derivation], log: list[str] | None = None):
    def read(path: str) -> Derivation:
        if log is not None:
            log.append(path)
        return drvs[path]

    return read


def test_vector_files_have_the_stated_sizes_and_hash():
    assert len(FO_DRV) == 459
    assert len(A_DRV) == 648
    assert hashlib.sha256(A_DRV).hexdigest().startswith("081f9196")


@pytest.mark.parametrize("data", [FO_DRV, A_DRV])
def test_vectors_round_trip_byte_exact(data):
    assert print_derivation(parse_derivation(data)) == data
    assert print_derivation(parse_derivation(data, SD)) == data


def test_vector_models():
    fo = parse_derivation(FO_DRV, SD)
    assert fo.outputs == {"out": DerivationOutput(FO_OUT, "sha256", HELLO_SHA256)}
    assert fo.outputs["out"].kind is OutputKind.FIXED and not fo.outputs["out"].recursive
    assert fo.args == ["-c", "printf hello > $out"]
    assert derivation_type(fo) is DerivationType.CA_FIXED
    a = parse_derivation(A_DRV, SD)
    assert a.name == "a"
    assert a.input_drvs == {FO_PATH: frozenset({"out"})}
    assert a.input_srcs == {BUILDER_SH}
    assert a.env["weird"] == 'line1\nline2\t"q" \\ back'
    assert a.outputs["dev"].is_input_addressed
    assert derivation_type(a) is DerivationType.INPUT_ADDRESSED
    assert a.references == {FO_PATH, BUILDER_SH}


def test_vector_drv_store_paths():
    assert SD.print(derivation_store_path(parse_derivation(FO_DRV), SD)) == FO_PATH
    assert SD.print(derivation_store_path(parse_derivation(A_DRV), SD)) == A_PATH


def test_vector_hash_modulo_fixed():
    fo = parse_derivation(FO_DRV)
    inner = f"fixed:out:sha256:{HELLO_SHA256}:{FO_OUT}".encode()
    assert hashlib.sha256(inner).hexdigest() == FO_MODULO
    for mask in (False, True):
        assert hash_derivation_modulo(fo, SD, reader({}), mask) == {"out": bytes.fromhex(FO_MODULO)}


def test_vector_masked_text_and_output_paths():
    fo, a = parse_derivation(FO_DRV), parse_derivation(A_DRV)
    assert print_derivation(a, mask_outputs=True, input_drvs_override={FO_MODULO: ["out"]}) == A_MASKED
    assert hashlib.sha256(A_MASKED).hexdigest() == A_MODULO
    read = reader({FO_PATH: fo})
    h = hash_derivation_modulo(a, SD, read, mask_outputs=True)
    assert h == {"out": bytes.fromhex(A_MODULO), "dev": bytes.fromhex(A_MODULO)}
    paths = derivation_output_paths(a, SD, read)
    assert {k: SD.print(v) for k, v in paths.items()} == {"out": A_OUT, "dev": A_DEV}
    # unmasked, as when `a` is itself an input
    assert hash_derivation_modulo(a, SD, read, mask_outputs=False)["out"] != bytes.fromhex(A_MODULO)


def vector_inputs() -> tuple[Derivation, Derivation]:
    """fo and a as derivationStrict sees them: attributes, no paths."""
    fo = Derivation(
        outputs={"out": fixed_output(HELLO_SHA256, "sha256", "flat")},
        platform="x86_64-linux",
        builder="/bin/sh",
        args=["-c", "printf hello > $out"],
        env={"builder": "/bin/sh", "name": "fo", "outputHash": HELLO_SHA256,
             "outputHashAlgo": "sha256", "outputHashMode": "flat", "system": "x86_64-linux"},
    )
    a = Derivation(
        outputs={"out": DerivationOutput(), "dev": DerivationOutput()},
        input_drvs={FO_PATH: {"out"}},
        input_srcs={BUILDER_SH},
        platform="x86_64-linux",
        builder="/bin/sh",
        args=["-e", BUILDER_SH],
        env={"builder": "/bin/sh", "dep": FO_OUT, "name": "a", "outputs": "out dev",
             "system": "x86_64-linux", "weird": 'line1\nline2\t"q" \\ back'},
    )
    return fo, a


def test_fill_output_paths_reproduces_the_vectors():
    fo_in, a_in = vector_inputs()
    fo = fill_output_paths(fo_in, SD, reader({}))
    assert print_derivation(fo) == FO_DRV
    a = fill_output_paths(a_in, SD, reader({FO_PATH: fo}))
    assert print_derivation(a) == A_DRV
    assert SD.print(derivation_store_path(a, SD)) == A_PATH
    # the input was not modified, and filling twice changes nothing
    assert a_in.outputs["out"] == DerivationOutput() and "out" not in a_in.env
    assert fill_output_paths(a, SD, reader({FO_PATH: fo})) == a


def test_check_derivation_outputs_accepts_vectors():
    fo, a = parse_derivation(FO_DRV), parse_derivation(A_DRV)
    read = reader({FO_PATH: fo})
    check_derivation_outputs(FO_PATH, fo, SD, read)
    check_derivation_outputs(A_PATH, a, SD, read)


def test_check_derivation_outputs_messages():
    fo, a = parse_derivation(FO_DRV), parse_derivation(A_DRV)
    read = reader({FO_PATH: fo})
    wrong = A_OUT[:-1] + "b"
    bad = replace(a, outputs={**a.outputs, "out": DerivationOutput(wrong)})
    with pytest.raises(FormatError, match=re.escape(
            f"derivation '{A_PATH}' has incorrect output '{wrong}', should be '{A_OUT}'")):
        check_derivation_outputs(A_PATH, bad, SD, read)
    # env vars named like outputs enter the masked hash only by key
    bad = replace(a, env={**a.env, "dev": A_OUT})
    assert hash_derivation_modulo(bad, SD, read, True) == hash_derivation_modulo(a, SD, read, True)
    # ... but whether the key exists does matter
    bad = replace(a, env={k: v for k, v in a.env.items() if k != "dev"})
    with pytest.raises(FormatError, match=re.escape(
            f"derivation '{A_PATH}' has incorrect output '{A_DEV}', should be '/nix/store/")):
        check_derivation_outputs(A_PATH, bad, SD, read)


def test_check_derivation_outputs_env_message():
    fo, a = parse_derivation(FO_DRV), parse_derivation(A_DRV)
    read = reader({FO_PATH: fo})
    bad = replace(a, env={**a.env, "dev": A_OUT})
    with pytest.raises(FormatError, match=re.escape(
            f"derivation '{A_PATH}' has incorrect environment variable 'dev', should be '{A_DEV}'")):
        check_derivation_outputs(A_PATH, bad, SD, read)
    bad_fo = replace(fo, env={**fo.env, "out": A_OUT})
    with pytest.raises(FormatError, match="incorrect environment variable 'out'"):
        check_derivation_outputs(FO_PATH, bad_fo, SD, read)
    # stricter than 2.8, which ignores a fixed output's path field
    bad_fo = replace(fo, outputs={"out": replace(fo.outputs["out"], path=A_OUT)})
    with pytest.raises(FormatError, match="incorrect output"):
        check_derivation_outputs(FO_PATH, bad_fo, SD, read)
    # the name comes from the .drv path, as in Nix
    other = "/nix/store/f0qhjmj9y3c83s5f97byr4rbf3a14mwf-b.drv"
    with pytest.raises(FormatError, match="should be '/nix/store/[a-z0-9]{32}-b-dev'"):
        check_derivation_outputs(other, a, SD, read)


# --- parser strictness ------------------------------------------------------------


def sub(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


DEV_T = b'("dev","/nix/store/kpsjnqrj0z495f1vi61kv8gw9agxm5il-a-dev","","")'
OUT_T = b'("out","/nix/store/4b422f4w9x1vkpyhmlqqxnpg3fcqirvv-a","","")'

BAD = [
    ("trailing byte", A_DRV + b"\n", "trailing bytes"),
    ("leading space", b" " + A_DRV, "expected 'Derive('"),
    ("wrong head", b"Derivation" + A_DRV[6:], "expected 'Derive('"),
    ("missing comma", sub(A_DRV, b'"x86_64-linux",', b'"x86_64-linux"'), "expected ','"),
    ("space", sub(A_DRV, b"],[", b"], ["), "expected '['"),
    ("truncated", A_DRV[:-1], "expected ')'"),
    ("eof in string", A_DRV[:40], "unterminated string"),
    ("empty", b"", "expected 'Derive('"),
    ("unknown escape", sub(A_DRV, b"line1", b"line\\1"), "non-canonical escape"),
    ("raw newline in env", sub(A_DRV, b"line1", b"line\n1"), "unescaped"),
    ("raw tab in arg", sub(A_DRV, b'"-e"', b'"-\te"'), "unescaped"),
    ("backslash in platform", sub(A_DRV, b'"x86_64-linux","/bin', b'"x86_64\\-linux","/bin'),
     "backslash"),
    ("backslash in output name", sub(A_DRV, b'("dev","/', b'("d\\ev","/'), "backslash"),
    ("relative output path", sub(A_DRV, b'"dev","/nix', b'"dev","nix'), "bad path"),
    ("relative input src", sub(A_DRV, b'["/nix/store/cmjd', b'["nix/store/cmjd'), "bad path"),
    ("relative input drv", sub(A_DRV, b'[("/nix/store/2zn', b'[("nix/store/2zn'), "bad path"),
    ("unsorted outputs", sub(A_DRV, DEV_T + b"," + OUT_T, OUT_T + b"," + DEV_T), "out-of-order output 'dev'"),
    ("duplicate env", sub(A_DRV, b'("name","a"),', b'("name","a"),("name","a"),'),
     "duplicate environment variable"),
    ("unsorted env", sub(A_DRV, b'("builder","/bin/sh"),("dep"', b'("dep"').replace(
        b'("weird"', b'("builder","/bin/sh"),("weird"', 1), "out-of-order environment variable"),
    ("unsorted srcs", sub(A_DRV, b'["/nix/store/cmjd9zmysnc584p1yy3wdlk3cildhn4l-builder.sh"],"x86',
                          b'["/nix/store/cmjd9zmysnc584p1yy3wdlk3cildhn4l-builder.sh","/nix/store/0000000000000000000000000000000a-x"],"x86'),
     "out-of-order input source"),
    ("duplicate output name", sub(A_DRV, b'["out"]', b'["out","out"]'), "duplicate output name"),
    ("bad hash algo", sub(FO_DRV, b'"sha256","2cf', b'"sha3","2cf'), "unknown hash algorithm 'sha3'"),
    ("upper-case hash", sub(FO_DRV, HELLO_SHA256.encode(), HELLO_SHA256.upper().encode()), "lower-case base16"),
    ("short hash", sub(FO_DRV, b'"sha256","2cf2', b'"sha256","2cf'), "lower-case base16"),
    ("nix32 hash", sub(FO_DRV, b'"sha256","' + HELLO_SHA256.encode(),
                       b'"sha256","' + nix32_encode(bytes.fromhex(HELLO_SHA256)).encode()), "lower-case base16"),
    ("fixed without path", sub(FO_DRV, b'("out","/nix/store/nqf0xn3i5yddaqga5lmixksnxg099q5c-fo","sha',
                               b'("out","","sha'), "bad path ''"),
    ("floating with path", sub(FO_DRV, b'"sha256","' + HELLO_SHA256.encode(), b'"r:sha256","'),
     "floating or impure output with a path"),
    ("hash without algo", sub(A_DRV, b'-a","","")', b'-a","","abc")'), "hash without a hash algorithm"),
    ("not a list", sub(A_DRV, b'["-e",', b'("-e",'), "expected '['"),
    ("not a string", sub(A_DRV, b'"/bin/sh",["-e"', b'/bin/sh,["-e"'), "expected a string"),
]


@pytest.mark.parametrize("data,message", [(d, m) for _, d, m in BAD], ids=[n for n, _, _ in BAD])
def test_parser_rejects(data, message):
    with pytest.raises(DerivationParseError, match=re.escape(message)) as info:
        parse_derivation(data)
    assert 0 <= info.value.offset <= len(data)
    assert f"at byte {info.value.offset}" in str(info.value)


def test_parse_error_offsets_point_at_the_problem():
    data = A_DRV + b"X"
    with pytest.raises(DerivationParseError) as info:
        parse_derivation(data)
    assert info.value.offset == len(A_DRV)
    data = sub(A_DRV, b"line1", b"line\\q1")
    with pytest.raises(DerivationParseError) as info:
        parse_derivation(data)
    assert data[info.value.offset:info.value.offset + 2] == b"\\q"
    data = sub(A_DRV, b'("name","a"),', b'("name","a"),("name","a"),')
    with pytest.raises(DerivationParseError) as info:
        parse_derivation(data)
    first = data.index(b'("name","a"),')
    assert info.value.offset == first + len(b'("name","a"),')


def test_store_dir_checks():
    other = StoreDir("/other/store")
    with pytest.raises(DerivationParseError, match="not in the Nix store"):
        parse_derivation(A_DRV, other)
    not_store = sub(A_DRV, BUILDER_SH.encode() + b'"],', b'/tmp/builder.sh"],')
    parse_derivation(not_store)  # only absolute-ness is checked without a store dir
    with pytest.raises(DerivationParseError, match="input source"):
        parse_derivation(not_store, SD)
    bad_out = sub(FO_DRV, FO_OUT.encode() + b'","sha', b'/nix/store/x","sha')
    with pytest.raises(DerivationParseError, match="output 'out'"):
        parse_derivation(bad_out, SD)
    # 2.8 parses store paths laxly (no '-' after the hash part); we refuse them (issue 11)
    lax = sub(A_DRV, b"4b422f4w9x1vkpyhmlqqxnpg3fcqirvv-a\",\"\"", b"4b422f4w9x1vkpyhmlqqxnpg3fcqirvvXa\",\"\"")
    with pytest.raises(DerivationParseError, match="no '-' after its hash part"):
        parse_derivation(lax, SD)


ACCEPTED = [
    ("deferred", sub(A_DRV, b'"out","/nix/store/4b422f4w9x1vkpyhmlqqxnpg3fcqirvv-a","",""',
                     b'"out","","",""'), None),
    ("all deferred", b'Derive([("out","","","")],[],[],"p","b",[],[])', DerivationType.DEFERRED),
    ("floating", b'Derive([("out","","r:sha256","")],[],[],"p","b",[],[])', DerivationType.CA_FLOATING),
    ("impure", b'Derive([("out","","sha256","impure")],[],[],"p","b",[],[])', DerivationType.IMPURE),
    ("no outputs", b'Derive([],[],[],"","",[],[])', None),
    ("empty output list", sub(A_DRV, b'["out"]', b"[]"), DerivationType.INPUT_ADDRESSED),
    ("raw LF in platform", sub(A_DRV, b'"x86_64-linux","/bin', b'"x86_64\nli\tnux","/bin'), None),
    ("non-utf8 and NUL", sub(A_DRV, b"line1", b"\xff\xfe\x00\x01\x7f\xc3\xa9\xe2\x82"), None),
    ("md5 recursive", sub(FO_DRV, b'"sha256","' + HELLO_SHA256.encode(),
                          b'"r:md5","' + hashlib.md5(b"x").hexdigest().encode()), DerivationType.CA_FIXED),
]


@pytest.mark.parametrize("data,kind", [(d, k) for _, d, k in ACCEPTED], ids=[n for n, _, _ in ACCEPTED])
def test_parser_accepts_canonical_oddities(data, kind):
    drv = parse_derivation(data)
    assert print_derivation(drv) == data
    if kind is not None:
        assert derivation_type(drv) is kind


def test_non_utf8_representation():
    data = sub(A_DRV, b"line1", b"\xff\xc3\xa9")
    drv = parse_derivation(data)
    assert drv.env["weird"].startswith("\udcff\u00e9")
    assert print_derivation(drv) == data


def test_printer_refuses_unparseable_text():
    _, a = vector_inputs()
    for field_value in ('x86"64', "x86\\64"):
        with pytest.raises(FormatError, match="unescaped"):
            print_derivation(replace(a, platform=field_value))
    with pytest.raises(FormatError, match="cannot be encoded"):
        print_derivation(replace(a, builder="\ud800"))
    with pytest.raises(FormatError, match="unescaped"):
        print_derivation(replace(a, input_srcs={'/nix/store/a"b'}))


def test_print_sorts_bytewise():
    # str order would be U+00E9 < U+DCFF < U+FFFF, but the surrogate stands
    # for the byte FF, which sorts after EF BF BF
    d = Derivation(outputs={"out": DerivationOutput()}, env={"\udcff": "1", "\u00e9": "2", "\uffff": "3"})
    text = print_derivation(d)
    assert text.index(b'"\xc3\xa9"') < text.index(b'"\xef\xbf\xbf"') < text.index(b'"\xff"')
    assert parse_derivation(text) == d


# --- derivation type ----------------------------------------------------------------

FIX = DerivationOutput("/nix/store/nqf0xn3i5yddaqga5lmixksnxg099q5c-fo", "sha256", HELLO_SHA256)


@pytest.mark.parametrize("outputs,message", [
    ({}, "must have at least one output"),
    ({"out": FIX, "dev": FIX}, "only one fixed output is allowed for now"),
    ({"foo": FIX}, 'single fixed output must be named "out"'),
    ({"out": FIX, "dev": DerivationOutput(A_DEV)}, "can't mix derivation output types"),
    ({"out": DerivationOutput(), "dev": DerivationOutput(A_DEV)}, "can't mix derivation output types"),
    ({"out": DerivationOutput("", "sha256"), "dev": DerivationOutput("", "r:sha1")},
     "all floating outputs must use the same hash type"),
])
def test_derivation_type_errors(outputs, message):
    with pytest.raises(FormatError, match=re.escape(message)):
        derivation_type(Derivation(outputs=outputs))


def test_output_kinds():
    assert DerivationOutput().kind is OutputKind.DEFERRED
    assert DerivationOutput(A_OUT).kind is OutputKind.INPUT_ADDRESSED
    assert DerivationOutput("", "r:sha256").kind is OutputKind.FLOATING
    assert DerivationOutput("", "r:sha256", "impure").kind is OutputKind.IMPURE
    o = DerivationOutput("", "r:sha512", "00" * 64)
    assert o.is_fixed and o.recursive and o.algo == "sha512" and o.fixed_hash().digest == bytes(64)
    with pytest.raises(FormatError):
        _ = DerivationOutput("", "", "abc").kind
    assert derivation_type(Derivation(outputs={"a": DerivationOutput("", "sha256"),
                                               "b": DerivationOutput("", "r:sha256")})) \
        is DerivationType.CA_FLOATING


# --- fixed_output -------------------------------------------------------------------


def test_fixed_output_accepts_every_hash_form():
    digest = bytes.fromhex(HELLO_SHA256)
    forms = [
        (HELLO_SHA256, "sha256"),
        (nix32_encode(digest), "sha256"),
        (base64.b64encode(digest).decode(), "sha256"),
        ("sha256:" + HELLO_SHA256, None),
        ("sha256:" + nix32_encode(digest), ""),
        ("sha256-" + base64.b64encode(digest).decode(), None),
        ("sha256-" + base64.b64encode(digest).decode(), "sha256"),
    ]
    for h, algo in forms:
        assert fixed_output(h, algo) == DerivationOutput("", "sha256", HELLO_SHA256)
        assert fixed_output(h, algo, "recursive") == DerivationOutput("", "r:sha256", HELLO_SHA256)
    assert fixed_output("", "sha1") == DerivationOutput("", "sha1", "00" * 20)


@pytest.mark.parametrize("args,message", [
    ((HELLO_SHA256, "sha256", "text"), "outputHashMode"),
    ((HELLO_SHA256, None), "algorithm"),
    (("sha1-" + base64.b64encode(bytes(20)).decode(), "sha256"), "should be sha256"),
    (("", None), "does not include a type"),
    (("abc", "sha256"), "wrong length"),
])
def test_fixed_output_errors(args, message):
    with pytest.raises(FormatError, match=message):
        fixed_output(*args)


# --- hashDerivationModulo -----------------------------------------------------------


def make_fo(name: str, builder: str, content: bytes = b"hello") -> Derivation:
    return fill_output_paths(Derivation(
        outputs={"out": fixed_output(hashlib.sha256(content).hexdigest(), "sha256")},
        platform="x86_64-linux", builder=builder, env={"name": name, "builder": builder}), SD, reader({}))


def add(drvs: dict[str, Derivation], drv: Derivation) -> str:
    path = SD.print(derivation_store_path(drv, SD))
    drvs[path] = drv
    return path


def test_equal_input_hashes_are_merged():
    drvs: dict[str, Derivation] = {}
    p1 = add(drvs, make_fo("same", "/bin/sh"))
    p2 = add(drvs, make_fo("same", "/bin/bash"))
    assert p1 != p2 and drvs[p1].outputs == drvs[p2].outputs
    user = Derivation(outputs={"out": DerivationOutput()}, input_drvs={p1: {"out"}, p2: {"out"}},
                      platform="x86_64-linux", builder="/bin/sh", env={"name": "user"})
    fo_hash = hash_derivation_modulo(drvs[p1], SD, reader(drvs), False)["out"].hex()
    filled = fill_output_paths(user, SD, reader(drvs))
    masked = print_derivation(filled, True, {fo_hash: {"out"}})
    assert masked.count(fo_hash.encode()) == 1
    expected = hashlib.sha256(masked).digest()
    assert hash_derivation_modulo(filled, SD, reader(drvs), True)["out"] == expected


def test_inputs_are_read_once_and_cached():
    drvs: dict[str, Derivation] = {}
    fo = add(drvs, make_fo("fo", "/bin/sh"))
    mid = add(drvs, fill_output_paths(Derivation(
        outputs={"out": DerivationOutput(), "lib": DerivationOutput()}, input_drvs={fo: {"out"}},
        env={"name": "mid"}), SD, reader(drvs)))
    left = add(drvs, fill_output_paths(Derivation(
        outputs={"out": DerivationOutput()}, input_drvs={mid: {"lib"}}, env={"name": "left"}),
        SD, reader(drvs)))
    top = Derivation(outputs={"out": DerivationOutput()},
                     input_drvs={mid: {"out", "lib"}, left: {"out"}, fo: {"out"}}, env={"name": "top"})
    log: list[str] = []
    cache: dict = {}
    first = hash_derivation_modulo(top, SD, reader(drvs, log), True, cache)
    assert sorted(log) == sorted([fo, mid, left])
    again = hash_derivation_modulo(top, SD, reader(drvs, log), True, cache)
    assert first == again and len(log) == 3
    fresh = hash_derivation_modulo(top, SD, reader(drvs), True)
    assert fresh == first


def test_fixed_output_inputs_are_not_read():
    drvs: dict[str, Derivation] = {}
    missing = "/nix/store/0000000000000000000000000000000a-gone.drv"
    fo = replace(make_fo("fo", "/bin/sh"), input_drvs={missing: {"out"}})
    log: list[str] = []
    assert hash_derivation_modulo(fo, SD, reader(drvs, log), False)
    assert log == []


def test_deep_chain_needs_no_recursion():
    drvs: dict[str, Derivation] = {}
    prev = add(drvs, make_fo("base", "/bin/sh"))
    for i in range(1500):
        # deeper than the recursion limit; the paths need not be right for hashing
        prev = add(drvs, Derivation(outputs={"out": DerivationOutput(f"/nix/store/{'0' * 32}-n{i}")},
                                    input_drvs={prev: {"out"}}, env={"name": f"n{i}"}))
    top = Derivation(outputs={"out": DerivationOutput()}, input_drvs={prev: {"out"}}, env={"name": "top"})
    assert len(hash_derivation_modulo(top, SD, reader(drvs), True)["out"]) == 32


def test_cycles_and_missing_outputs_are_errors():
    a = "/nix/store/0000000000000000000000000000000a-a.drv"
    b = "/nix/store/0000000000000000000000000000000b-b.drv"
    drvs = {
        a: Derivation(outputs={"out": DerivationOutput(A_OUT)}, input_drvs={b: {"out"}}, env={"name": "a"}),
        b: Derivation(outputs={"out": DerivationOutput(A_OUT)}, input_drvs={a: {"out"}}, env={"name": "b"}),
    }
    top = Derivation(outputs={"out": DerivationOutput()}, input_drvs={a: {"out"}}, env={"name": "t"})
    with pytest.raises(FormatError, match="depends on itself"):
        hash_derivation_modulo(top, SD, reader(drvs), True)
    fo = make_fo("fo", "/bin/sh")
    top = Derivation(outputs={"out": DerivationOutput()}, input_drvs={FO_PATH: {"dev"}}, env={"name": "t"})
    with pytest.raises(FormatError, match="does not have an output named 'dev'"):
        hash_derivation_modulo(top, SD, reader({FO_PATH: fo}), True)


def test_impure_and_floating():
    impure = Derivation(outputs={"out": DerivationOutput("", "r:sha256", "impure")}, env={"name": "i"})
    with pytest.raises(FormatError, match="impure"):
        hash_derivation_modulo(impure, SD, reader({}), True)
    floating = Derivation(outputs={"out": DerivationOutput("", "r:sha256")}, env={"name": "f"})
    assert derivation_output_paths(floating, SD, reader({})) == {"out": None}
    with pytest.raises(FormatError, match="experimental"):
        fill_output_paths(floating, SD, reader({}))
    # a derivation depending on a floating one stays deferred
    fpath = "/nix/store/0000000000000000000000000000000f-f.drv"
    user = Derivation(outputs={"out": DerivationOutput()}, input_drvs={fpath: {"out"}}, env={"name": "u"})
    filled = fill_output_paths(user, SD, reader({fpath: floating}))
    assert filled.outputs == {"out": DerivationOutput()} and filled.env["out"] == ""


# --- property tests -----------------------------------------------------------------

HASH_CHARS = "0123456789abcdfghijklmnpqrsvwxyz"
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?="
PIECES = [b'"', b"\\", b"\n", b"\r", b"\t", b"\\n", b'\\"', b"\x00", b"\x01", b"\x1b", b"\x7f",
          b"\xff", b"\xc3", b"\xc3\xa9", "€".encode(), b"\xe2\x82", b"(", b")", b",", b"[", b"]"]


def decoded(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


byte_strings = st.lists(st.sampled_from(PIECES) | st.binary(max_size=6), max_size=6).map(b"".join)
texts = byte_strings.map(decoded)
raw_texts = byte_strings.filter(lambda b: b'"' not in b and b"\\" not in b).map(decoded)
names = st.text(NAME_CHARS, min_size=1, max_size=12)


def store_paths(suffix: str = "") -> st.SearchStrategy[str]:
    return st.builds(lambda h, n: f"/nix/store/{h}-{n}{suffix}",
                     st.text(HASH_CHARS, min_size=32, max_size=32), names)


algos = st.sampled_from(["md5", "sha1", "sha256", "sha512"])
methods = st.sampled_from(["", "r:"])


@st.composite
def fixed_outputs(draw):
    algo = draw(algos)
    digest = draw(st.binary(min_size={"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}[algo],
                            max_size={"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}[algo]))
    return {"out": DerivationOutput(draw(store_paths()), draw(methods) + algo, digest.hex())}


outputs = st.one_of(
    fixed_outputs(),
    st.dictionaries(names, store_paths().map(DerivationOutput), min_size=1, max_size=4),
    st.dictionaries(names, st.just(DerivationOutput()), min_size=1, max_size=3),
    st.dictionaries(names, st.builds(lambda m, a: DerivationOutput("", m + a), methods, algos),
                    min_size=1, max_size=3),
    st.dictionaries(raw_texts, st.just(DerivationOutput()), max_size=2),
)

derivations = st.builds(
    Derivation,
    outputs=outputs,
    input_drvs=st.dictionaries(store_paths(".drv"), st.frozensets(names, max_size=3), max_size=3),
    input_srcs=st.frozensets(store_paths(), max_size=3),
    platform=raw_texts,
    builder=texts,
    args=st.lists(texts, max_size=4),
    env=st.dictionaries(texts, texts, max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(derivations)
def test_print_parse_round_trip(drv):
    text = print_derivation(drv)
    again = parse_derivation(text, SD)
    assert again == drv
    assert print_derivation(again) == text
    if not any(o.is_fixed for o in drv.outputs.values()):
        # (a masked fixed output has a hash but no path: never parsed, only hashed)
        masked = print_derivation(drv, mask_outputs=True)
        assert print_derivation(parse_derivation(masked)) == masked


mutations = st.lists(st.tuples(st.sampled_from(["del", "ins", "set", "cut"]),
                               st.integers(0, 10_000), st.sampled_from(PIECES + [b"a", b"/"])),
                     min_size=1, max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=derivations | st.sampled_from([parse_derivation(FO_DRV), parse_derivation(A_DRV)]),
       ops=mutations)
@example(base=parse_derivation(A_DRV), ops=[("cut", 40, b"")])
def test_mutated_text_parses_canonically_or_raises_format_error(base, ops):
    data = bytearray(print_derivation(base))
    for op, pos, piece in ops:
        pos = pos % (len(data) + 1)
        if op == "del":
            del data[pos:pos + 1]
        elif op == "ins":
            data[pos:pos] = piece
        elif op == "set":
            data[pos:pos + len(piece)] = piece
        else:
            del data[pos:]
    data = bytes(data)
    for sd in (None, SD):
        try:
            drv = parse_derivation(data, sd)
        except DerivationParseError as e:
            assert 0 <= e.offset <= len(data)
        else:
            assert print_derivation(drv) == data


# --- real Nix as the oracle ---------------------------------------------------------

needs_nix_instantiate = pytest.mark.skipif(shutil.which("nix-instantiate") is None,
                                           reason="nix-instantiate not installed")


@dataclass(frozen=True)
class Out:
    """``${<drv>.<output>}``"""

    drv: str
    output: str = "out"


@dataclass(frozen=True)
class Src:
    """``${srcs."<name>"}``, a builtins.toFile."""

    name: str


@dataclass(frozen=True)
class DrvPath:
    """``${<drv>.drvPath}``: Nix adds the .drv's whole closure."""

    drv: str


def lit(s: str | bytes) -> bytes:
    return s.encode() if isinstance(s, str) else s


ODD = b'q"uote b\\ack nl\n cr\r tab\t bell\x07 esc\x1b del\x7f caf\xc3\xa9 bad\xff\xfe half\xe2\x82 ${x} $$ \\n'
SRCS = {
    "builder.sh": [b"#!/bin/sh\necho hi\n"],
    "ref.txt": [b"see ", Src("builder.sh"), b"\n"],
}


def _drvs_spec() -> dict[str, dict[bytes, object]]:
    hello = b"hello"

    def fo(name, algo, mode, hash_text, hash_algo=None, builder="/bin/sh"):
        attrs = {b"name": [lit(name)], b"system": [b"x86_64-linux"], b"builder": [lit(builder)],
                 b"outputHash": [lit(hash_text)], b"outputHashMode": [lit(mode)]}
        if hash_algo is not None:
            attrs[b"outputHashAlgo"] = [lit(hash_algo)]
        return attrs

    sha1 = hashlib.sha1(hello).digest()
    sha512 = hashlib.sha512(hello).digest()
    md5 = hashlib.md5(hello).digest()
    base = {b"system": [b"x86_64-linux"], b"builder": [b"/bin/sh"]}
    return {
        "fo_flat": fo("fo-flat", "sha256", "flat", HELLO_SHA256, "sha256"),
        "fo_sha1": fo("fo-sha1", "sha1", "flat", nix32_encode(sha1), "sha1"),
        "fo_sha512": fo("fo-sha512", "sha512", "recursive", "sha512-" + base64.b64encode(sha512).decode()),
        "fo_rsha256": fo("fo-rsha256", "sha256", "recursive", "sha256:" + nix32_encode(bytes.fromhex(HELLO_SHA256))),
        "fo_md5": fo("fo-md5", "md5", "flat", md5.hex(), "md5"),
        "twin_a": fo("twin", "sha256", "flat", HELLO_SHA256, "sha256", "/bin/sh"),
        "twin_b": fo("twin", "sha256", "flat", HELLO_SHA256, "sha256", "/bin/bash"),
        "simple": {**base, b"name": [b"simple"], b"args": [[b"-c"], [b"echo hi > $out"]]},
        "multi": {**base, b"name": [b"multi"], b"outputs": [[b"out"], [b"dev"], [b"bin"], [b"lib"]],
                  b"dep": [Out("fo_flat")], b"src": [Src("builder.sh")],
                  b"args": [[b"-e"], [Src("builder.sh")]]},
        "chain": {**base, b"name": [b"chain"], b"d": [Out("multi", "dev"), b" ", Out("multi", "lib")],
                  b"o": [Out("multi")], b"r": [Src("ref.txt")], b"f": [Out("fo_sha512")]},
        "twins": {**base, b"name": [b"twins"], b"a": [Out("twin_a")], b"b": [Out("twin_b")]},
        "closure": {**base, b"name": [b"closure"], b"p": [DrvPath("chain")], b"x": [Out("simple")]},
        "odd": {b"system": [b"x86_64-linux"], b"name": [b"odd"], b"builder": [b"/bin/sh \"odd\"\t\\"],
                b"args": [[ODD], [b""], [b"x y"]], b"v": [ODD, Out("chain")],
                ODD: [b"key is odd"], b"empty": [b""]},
        "oddsys": {b"system": [b"weird\nsys\xc3\xa9 \x01"], b"name": [b"oddsys"], b"builder": [b"/bin/sh"]},
    }


def nix_string(parts) -> bytes:
    out = [b'"']
    for p in parts:
        if isinstance(p, bytes):
            # $ always escaped so "${" can never start an interpolation; a raw CR
            # would be read as LF by the lexer
            out.append(p.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"$", b"\\$")
                       .replace(b"\r", b"\\r").replace(b"\n", b"\\n").replace(b"\t", b"\\t"))
        elif isinstance(p, Out):
            out.append(f"${{{p.drv}.{p.output}}}".encode())
        elif isinstance(p, Src):
            out.append(f'${{srcs."{p.name}"}}'.encode())
        else:
            out.append(f"${{{p.drv}.drvPath}}".encode())
    out.append(b'"')
    return b"".join(out)


def nix_value(value) -> bytes:
    if value and isinstance(value[0], list):
        return b"[ " + b" ".join(nix_string(v) for v in value) + b" ]"
    return nix_string(value)


def nix_expression(spec) -> bytes:
    lines = [b"let", b"  srcs = rec {"]
    for name, parts in SRCS.items():
        lines.append(b'    "%s" = builtins.toFile "%s" %s;' % (name.encode(), name.encode(), nix_string(parts)))
    lines.append(b"  };")
    lines.append(b"  drvs = rec {")
    for key, attrs in spec.items():
        body = b" ".join(b"%s = %s;" % (nix_string([k]), nix_value(v)) for k, v in attrs.items())
        lines.append(b"    %s = derivation { %s };" % (key.encode(), body))
    lines.append(b"  };")
    lines.append(b"in builtins.mapAttrs (n: d: d.drvPath) drvs")
    return b"\n".join(lines) + b"\n"


class Rebuild:
    """Our own derivationStrict for the spec above, independent of Nix's answers."""

    def __init__(self) -> None:
        self.drvs: dict[str, Derivation] = {}
        self.by_key: dict[str, str] = {}
        self.src_paths: dict[str, str] = {}
        self.refs: dict[str, frozenset[str]] = {}
        self.cache: dict = {}
        for name, parts in SRCS.items():
            inputs: dict[str, set[str]] = {}
            srcs: set[str] = set()
            content = self.resolve(parts, inputs, srcs)
            sp = SD.make_text_path_for(name, content.encode("utf-8", "surrogateescape"),
                                       [SD.parse(p) for p in srcs])
            self.src_paths[name] = SD.print(sp)
            self.refs[SD.print(sp)] = frozenset(srcs)

    def closure(self, path: str) -> set[str]:
        seen, todo = set(), [path]
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                todo.extend(self.refs[p])
        return seen

    def resolve(self, parts, inputs: dict[str, set[str]], srcs: set[str]) -> str:
        out = []
        for p in parts:
            if isinstance(p, bytes):
                out.append(decoded(p))
            elif isinstance(p, Out):
                path = self.by_key[p.drv]
                inputs.setdefault(path, set()).add(p.output)
                out.append(self.drvs[path].outputs[p.output].path)
            elif isinstance(p, Src):
                srcs.add(self.src_paths[p.name])
                out.append(self.src_paths[p.name])
            else:
                path = self.by_key[p.drv]
                for q in self.closure(path):
                    srcs.add(q)
                    if q.endswith(".drv"):
                        inputs.setdefault(q, set()).update(self.drvs[q].outputs)
                out.append(path)
        return "".join(out)

    def build(self, key: str, attrs: dict[bytes, object]) -> str:
        inputs: dict[str, set[str]] = {}
        srcs: set[str] = set()
        env: dict[str, str] = {}
        args: list[str] = []
        output_names = ["out"]
        for k, v in attrs.items():
            if v and isinstance(v[0], list):
                items = [self.resolve(x, inputs, srcs) for x in v]
                if k == b"args":
                    args = items
                    continue
                if k == b"outputs":
                    output_names = items
                env[decoded(k)] = " ".join(items)
            else:
                env[decoded(k)] = self.resolve(v, inputs, srcs)
        if "outputHash" in env:
            outs = {"out": fixed_output(env["outputHash"], env.get("outputHashAlgo"),
                                        env.get("outputHashMode", "flat"))}
        else:
            outs = {o: DerivationOutput() for o in output_names}
        drv = Derivation(outputs=outs, input_drvs=inputs, input_srcs=srcs, platform=env["system"],
                         builder=env["builder"], args=args, env=env)
        drv = fill_output_paths(drv, SD, self.drvs.__getitem__, self.cache)
        path = SD.print(derivation_store_path(drv, SD))
        self.drvs[path] = drv
        self.by_key[key] = path
        self.refs[path] = drv.references
        return path


@pytest.fixture(scope="module")
def nix_drvs(tmp_path_factory):
    from conftest import nix_env, run_nix

    tmp = str(tmp_path_factory.mktemp("nixdrv"))
    root = os.path.join(tmp, "root")
    spec = _drvs_spec()
    expr = os.path.join(tmp, "drvs.nix")
    with open(expr, "wb") as f:
        f.write(nix_expression(spec))
    env = nix_env(tmp)
    res = run_nix(["nix-instantiate", "--store", root, "--option", "substituters", "",
                   "--eval", "--strict", "--json", "--read-write-mode", expr], tmp, env=env)
    paths = json.loads(res.stdout)
    assert set(paths) == set(spec)
    files = {}
    for key, path in paths.items():
        with open(root + path, "rb") as f:
            files[key] = (path, f.read())
    return {"tmp": tmp, "root": root, "env": env, "spec": spec, "files": files}


@pytest.mark.nix
@needs_nix_instantiate
def test_nix_written_drvs_round_trip(nix_drvs):
    for key, (path, data) in nix_drvs["files"].items():
        drv = parse_derivation(data, SD)
        assert print_derivation(drv) == data, key
        assert SD.print(derivation_store_path(drv, SD)) == path, key


@pytest.mark.nix
@needs_nix_instantiate
def test_nix_instantiate_agrees_with_fill_output_paths(nix_drvs):
    ours = Rebuild()
    for key, attrs in nix_drvs["spec"].items():
        ours.build(key, attrs)
    for key, (path, data) in nix_drvs["files"].items():
        assert ours.by_key[key] == path, key
        mine = ours.drvs[path]
        assert print_derivation(mine) == data, key
        assert parse_derivation(data, SD) == mine, key
    # sanity: the interesting cases really are in there
    files = nix_drvs["files"]
    assert b'"r:sha512"' in files["fo_sha512"][1] and b'"md5"' in files["fo_md5"][1]
    twins = parse_derivation(files["twins"][1])
    assert len(twins.input_drvs) == 2
    assert "\n" in parse_derivation(files["oddsys"][1]).platform
    closure = parse_derivation(files["closure"][1])
    assert files["chain"][0] in closure.input_srcs and files["multi"][0] in closure.input_drvs


@pytest.mark.nix
@needs_nix_instantiate
def test_nix_written_drvs_pass_output_check(nix_drvs):
    root = nix_drvs["root"]

    def read(path: str) -> Derivation:
        with open(root + path, "rb") as f:
            return parse_derivation(f.read(), SD)

    cache: dict = {}
    for path, data in nix_drvs["files"].values():
        check_derivation_outputs(path, parse_derivation(data, SD), SD, read, cache)


@pytest.mark.nix
@needs_nix_instantiate
def test_output_check_messages_match_nix(nix_drvs):
    """Tampered .drv files added with nix-store --add fail LocalStore's check with our message."""
    from conftest import run_nix

    root, tmp = nix_drvs["root"], nix_drvs["tmp"]
    path, data = nix_drvs["files"]["chain"]
    drv = parse_derivation(data, SD)
    out = drv.outputs["out"].path
    wrong_out = out[:-len("chain")] + "chaim"
    tampered = {
        "output": data.replace(b'("out","' + out.encode(), b'("out","' + wrong_out.encode(), 1),
        "env": data.replace(b'("out","' + out.encode() + b'")', b'("out","' + wrong_out.encode() + b'")'),
    }

    def read(p: str) -> Derivation:
        with open(root + p, "rb") as f:
            return parse_derivation(f.read(), SD)

    for label, text in tampered.items():
        assert text != data
        d = os.path.join(tmp, "tamper-" + label)
        os.makedirs(d)
        with open(os.path.join(d, "chain.drv"), "wb") as f:
            f.write(text)
        res = run_nix(["nix-store", "--store", root, "--add", os.path.join(d, "chain.drv")], tmp,
                      check=False, env=nix_drvs["env"])
        assert res.returncode != 0
        err = res.stderr.decode()
        m = re.search(r"derivation '(/nix/store/[^']+\.drv)'", err)
        assert m, err
        with pytest.raises(FormatError) as info:
            check_derivation_outputs(m.group(1), parse_derivation(text, SD), SD, read)
        assert f"error: {info.value}" in err
