"""The derivation environment (build/attrs.py, build/refgraph.py, build/environment.py).

Fast tier: the renderers against independent oracles (bash reading ``.attrs.sh``
back, Python's json module reading ``.attrs.json`` back) and the pure pieces.
Slow tier (real Nix): the same derivations built by the real nix-daemon and by
ours at the same store path, the builder dumping its environment and build dir
into its output; everything, bytes and messages, must come out the same.  And a
small stdenv-like chain (copied host tools as a fixed output, a setup script
through passAsFile, placeholders, multiple outputs, structured attrs,
exportReferencesGraph) with identical output hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess

import pytest
from conftest import needs_nix
from daemon_util import strip_ansi
from hypothesis import given, settings
from hypothesis import strategies as st
from test_build import area_factory, build_users  # noqa: F401 -- the fixtures

from storekeeper.build import refgraph
from storekeeper.build.attrs import (
    AttrError,
    DrvAttrs,
    OutputChecks,
    apply_checks,
    attr_file_name,
    output_checks,
    parse_json,
    placeholder,
    render_sh,
    structured_document,
)
from storekeeper.build.environment import GraphSource, builder_environment
from storekeeper.build.nljson import render_json
from storekeeper.build.rewrite import input_rewrites, rewrite_str
from storekeeper.formats.derivation import parse_derivation
from storekeeper.formats.hashes import Hash, nix32_encode
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.storepath import StoreDir, StorePath
from storekeeper.fs.narfs import dump_path

SD = StoreDir("/nix/store")


def sp(name: str, h: str = "0") -> StorePath:
    return StorePath.make(h * 32, name)


# --- .attrs.sh: bash is the oracle for the quoting ---------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)
_scalar = st.one_of(_text, st.booleans(), st.none(), st.integers(-(1 << 40), 1 << 40))
# (bash's own special variables all start with an upper-case letter or are "_")
_names = st.from_regex(r"[a-z][A-Za-z0-9_]{0,6}", fullmatch=True)


def _bash_value(v) -> str:
    """What bash should hold for a scalar: 32-bit wrapped ints, 1/'' for Booleans."""
    if v is True:
        return "1"
    if v is False or v is None:
        return ""
    if isinstance(v, int):
        n = v & 0xFFFFFFFF
        return str(n - (1 << 32) if n >= 1 << 31 else n)
    return v


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(_names, st.one_of(_scalar, st.lists(_scalar, max_size=4),
                                         # (bash refuses an empty key; Nix writes it all the same)
                                         st.dictionaries(_text.filter(bool), _scalar, max_size=4)),
                       max_size=5))
def test_attrs_sh_reads_back_in_bash(doc):
    script = render_sh(doc)
    names = sorted(doc)
    # print each variable back NUL-separated, after its item count: scalars and
    # array items as they are, associative arrays as key/value pairs
    dump = "".join(
        f'printf "%s\\0" "${{#{n}[@]}}"; '
        f'if declare -p {n} 2>/dev/null | grep -q "^declare -A"; then '
        f'for __k in "${{!{n}[@]}}"; do printf "%s\\0%s\\0" "$__k" "${{{n}[$__k]}}"; done; '
        f'else for __v in "${{{n}[@]}}"; do printf "%s\\0" "$__v"; done; fi; '
        for n in names)
    p = subprocess.run(["bash", "-c", script + dump], capture_output=True, timeout=20)
    assert p.returncode == 0, p.stderr
    got = p.stdout.decode("utf-8", "surrogateescape").split("\0")
    chunks = []
    for n in names:
        count = int(got.pop(0)) * (2 if isinstance(doc[n], dict) else 1)
        chunks.append(got[:count])
        del got[:count]
    for n, chunk in zip(names, chunks):
        v = doc[n]
        if isinstance(v, dict):
            want = dict(zip(chunk[::2], chunk[1::2]))
            assert want == {k: _bash_value(x) for k, x in v.items()}
        elif isinstance(v, list):
            # false is an empty word in an array: bash drops it (as in Nix's file)
            assert chunk == [_bash_value(x) for x in v if x is not False]
        else:
            assert chunk == [_bash_value(v)]


def test_attrs_sh_skips_what_bash_cannot_hold():
    doc = {"bad-name": "x", "nested": [[1]], "deep": {"a": {"b": 1}}, "float": 1.5,
           "whole": 2.0, "mixed": [1, 1.5], "big": 1e20, "ok": "y"}
    assert render_sh(doc) == ("declare big=-2147483648\ndeclare ok='y'\ndeclare whole=2\n")


# --- .attrs.json: Python's json reads it back; nlohmann's layout --------------------------------

_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), _text,
              st.floats(allow_nan=False, allow_infinity=False)),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(_text, kids, max_size=3)),
    max_leaves=12)


def _no_floats(v) -> bool:
    if isinstance(v, float):
        return False
    if isinstance(v, list):
        return all(map(_no_floats, v))
    if isinstance(v, dict):
        return all(map(_no_floats, v.values()))
    return True


@settings(max_examples=200, deadline=None)
@given(_json)
def test_attrs_json_round_trips(doc):
    text = render_json(doc)
    assert parse_json(text) == doc
    if _no_floats(doc):
        assert text == json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_doubles_round_trip_and_look_like_doubles(x):
    text = render_json(x)
    assert float(text) == x
    # always a double to a reader: a point or an exponent
    assert "." in text or "e" in text
    # Grisu2's digits: not always the shortest, never more than 17 (nix-daemon's own
    # bytes are checked in test_attrs_files_match_nix_on_random_documents)
    digits = text.lstrip("-").split("e")[0].replace(".", "").strip("0")
    assert len(digits) <= 17


def test_doubles_as_nlohmann_prints_them():
    # where nlohmann differs from Python's repr: exponents from 16 digits on, and
    # Grisu2's digits, which are not always the shortest
    assert render_json(1e15) == "1e+15" and repr(1e15) == "1000000000000000.0"
    assert render_json(123456789012345.0) == "123456789012345.0"
    assert render_json(0.0001) == "0.0001" and render_json(0.00001) == "1e-05"
    assert render_json(1e23) == "9.999999999999999e+22" and render_json(9.02054e20) == \
        "9.020540000000001e+20"  # (the latter seen in a .attrs.json of nix-daemon 2.8)


# --- names, rewrites -----------------------------------------------------------------------------

def test_placeholder_and_attr_file_names():
    h = hashlib.sha256(b"nix-output:dev").digest()
    assert placeholder("dev") == "/" + nix32_encode(h)
    assert attr_file_name("foo") == ".attr-" + nix32_encode(hashlib.sha256(b"foo").digest())


def test_rewrites_apply_in_key_order_each_to_the_whole_text():
    assert rewrite_str("ab", {"b": "c", "a": "b"}) == "cc"  # "a" first: "bb", then "cc"
    assert rewrite_str("ab", {"x": "y"}) == "ab"


# --- the environment ---------------------------------------------------------------------------

def _env(drv_env: dict[str, str], scratch=None, fixed=False, graphs=None, daemon_env=None):
    outputs = {"out": sp("x"), "dev": sp("x-dev", "1")}
    scratch = scratch or outputs
    attrs = DrvAttrs(drv_env, "/nix/store/" + "2" * 32 + "-x.drv")
    return builder_environment(SD, attrs, "/build/top", 3, scratch, input_rewrites(SD, outputs, scratch),
                       fixed, daemon_env or {}, graphs or (lambda: pytest.fail("not needed")))


def test_plain_environment_with_pass_as_file_and_placeholders():
    drv_env = {"out": "/nix/store/" + "0" * 32 + "-x", "foo": "at " + placeholder("out"),
               "passAsFile": "foo missing", placeholder("dev"): "key", "PATH": "/bin",
               "NIX_BUILD_TOP": "ignored"}
    built = _env(drv_env)
    fn = attr_file_name("foo")
    assert built.files == {fn: b"at /nix/store/" + b"0" * 32 + b"-x"}
    env = built.env
    assert env["fooPath"] == f"/build/top/{fn}" and "foo" not in env
    assert env["/nix/store/" + "1" * 32 + "-x-dev"] == "key"
    assert env["PATH"] == "/bin" and env["NIX_BUILD_TOP"] == "/build/top"
    assert env["NIX_BUILD_CORES"] == "3" and env["NIX_STORE"] == "/nix/store"
    assert "NIX_OUTPUT_CHECKED" not in env and "NIX_ATTRS_JSON_FILE" not in env
    for bad in ({"a=b": "x"}, {"a": "x\0y"}):
        with pytest.raises(AttrError, match="cannot be passed to the builder"):
            _env(bad)


def test_rebuilds_see_scratch_paths_everywhere():
    outputs = {"out": sp("x"), "dev": sp("x-dev", "1")}
    scratch = {"out": sp("x", "9"), "dev": outputs["dev"]}
    drv_env = {"out": SD.print(outputs["out"]), "p": placeholder("out") + "/bin",
               "__json": json.dumps({"a": SD.print(outputs["out"])})}
    built = _env({k: v for k, v in drv_env.items() if k != "__json"}, scratch=scratch)
    assert built.env["out"] == SD.print(scratch["out"])
    assert built.env["p"] == SD.print(scratch["out"]) + "/bin"
    doc = json.loads(_env(drv_env, scratch=scratch).files[".attrs.json"])
    assert doc["a"] == SD.print(scratch["out"]) and doc["outputs"]["out"] == SD.print(scratch["out"])


def test_structured_environment_hides_the_drv_variables():
    doc = {"name": "x", "PATH": "/bin", "outputChecks": {"out": {"maxSize": 5}},
           "list": [1, "a"], "impureEnvVars": ["FOO"]}
    built = _env({"__json": json.dumps(doc), "out": "/nix/store/" + "0" * 32 + "-x"},
                 fixed=True, daemon_env={"FOO": "bar"})
    env = built.env
    assert env["PATH"] == "/path-not-set" and "out" not in env and "name" not in env
    assert env["NIX_ATTRS_JSON_FILE"] == "/build/top/.attrs.json"
    assert env["NIX_ATTRS_SH_FILE"] == "/build/top/.attrs.sh"
    assert env["NIX_OUTPUT_CHECKED"] == "1" and env["FOO"] == "bar"
    full = structured_document(doc, {"dev": "/nix/store/" + "1" * 32 + "-x-dev",
                                     "out": "/nix/store/" + "0" * 32 + "-x"}, {})
    assert built.files[".attrs.json"].decode() == render_json(full)
    assert built.files[".attrs.sh"].decode() == render_sh(full)


def test_export_references_graph_plain_and_structured():
    dep2, dep, drv = sp("dep2", "a"), sp("dep", "b"), sp("dep.drv", "c")
    infos = {
        dep2: ValidPathInfo(dep2, Hash("sha256", bytes(32)), 120),
        dep: ValidPathInfo(dep, Hash("sha256", bytes(32)), 176, frozenset({dep2})),
        drv: ValidPathInfo(drv, Hash("sha256", bytes(32)), 500, ca="text:sha256:" + "0" * 52),
    }
    g = GraphSource(set(infos), infos.__getitem__, lambda d: [dep])
    built = _env({"exportReferencesGraph": f"a {SD.print(dep)}/sub b {SD.print(drv)}"},
                 graphs=lambda: g)
    p = SD.print
    assert built.files["a"].decode() == f"{p(dep2)}\n\n0\n{p(dep)}\n\n1\n{p(dep2)}\n"
    # a derivation brings the closures of its outputs along
    assert built.files["b"].decode() == built.files["a"].decode() + f"{p(drv)}\n\n0\n"
    doc = json.loads(_env({"__json": json.dumps({"exportReferencesGraph": {"b": p(drv)}})},
                          graphs=lambda: g).files[".attrs.json"])
    assert [i["path"] for i in doc["b"]] == [p(dep2), p(dep), p(drv)]
    assert doc["b"][1] == {"closureSize": 296, "narHash": "sha256:" + "0" * 52, "narSize": 176,
                           "path": p(dep), "references": [p(dep2)]}
    assert doc["b"][2]["ca"] == "text:sha256:" + "0" * 52
    for bad, msg in (("a", "odd number of tokens in 'exportReferencesGraph': 'a'"),
                     (f"a/b {p(dep)}", "invalid file name 'a/b' in 'exportReferencesGraph'"),
                     ("a /etc/passwd", "'exportReferencesGraph' contains a non-store path '/etc/passwd'")):
        with pytest.raises(AttrError, match="^" + msg.replace("(", r"\(") + "$"):
            _env({"exportReferencesGraph": bad}, graphs=lambda: g)
    g.inputs = {dep2}
    with pytest.raises(refgraph.InputRejected, match="not in the input closure"):
        _env({"exportReferencesGraph": f"a {p(dep)}"}, graphs=lambda: g)


# --- output checks -----------------------------------------------------------------------------

def test_output_checks_come_from_outputChecks_when_structured():
    drv = "/nix/store/" + "2" * 32 + "-x.drv"
    plain = DrvAttrs({"allowedReferences": "out  /nix/store/x", "outputChecks": "ignored"}, drv)
    assert output_checks(plain, "out") == OutputChecks(allowed_references=["out", "/nix/store/x"],
                                                       ignore_self_refs=True)
    doc = {"allowedReferences": [], "outputChecks": {"out": {"maxSize": 10, "allowedRequisites": "x",
                                                             "disallowedReferences": None}}}
    s = DrvAttrs({"__json": json.dumps(doc)}, drv)
    assert output_checks(s, "dev") is None
    assert output_checks(s, "out") == OutputChecks(max_size=10, allowed_requisites=["x"],
                                                   disallowed_references=[])
    bad = DrvAttrs({"__json": json.dumps({"outputChecks": {"out": {"allowedReferences": [1]}}})}, drv)
    with pytest.raises(AttrError, match=f"^attribute 'allowedReferences' of derivation '{drv}' "
                                        "must be a list of strings$"):
        output_checks(bad, "out")
    bad = DrvAttrs({"__json": json.dumps({"outputChecks": {"out": {"maxSize": "x"}}})}, drv)
    with pytest.raises(AttrError, match=r"type must be number, but is string"):
        output_checks(bad, "out")


def test_apply_checks_in_nix_order_with_nix_messages():
    def run(checks, refs=("/s/b",)):
        return apply_checks(checks, "/s/a", 100, refs, lambda: ({"/s/a", "/s/b", "/s/c"}, 300),
                            lambda i: {"out": "/s/a"}.get(i, i if i.startswith("/s/") else None))
    with pytest.raises(AttrError, match="^path '/s/a' is too large at 100 bytes; limit is 99 bytes$"):
        run(OutputChecks(max_size=99, max_closure_size=1))
    with pytest.raises(AttrError, match="^closure of path '/s/a' is too large at 300 bytes"):
        run(OutputChecks(max_size=100, max_closure_size=299))
    run(OutputChecks(allowed_references=["/s/b"], allowed_requisites=["out", "/s/b", "/s/c"]))
    run(OutputChecks(allowed_requisites=["/s/b", "/s/c"], ignore_self_refs=True))
    with pytest.raises(AttrError, match="^output '/s/a' is not allowed to refer to the following "
                                        "paths:\n  /s/a$"):
        run(OutputChecks(allowed_requisites=["/s/b", "/s/c"]))
    with pytest.raises(AttrError, match="illegal reference specifier 'dev'"):
        run(OutputChecks(disallowed_references=["dev"]))


def test_drv_attrs_typed_access():
    drv = "/nix/store/" + "2" * 32 + "-x.drv"
    plain = DrvAttrs({"a": " x\ty\n", "b": "1"}, drv)
    assert plain.get_strings("a") == ["x", "y"] and plain.get_bool("b") and not plain.get_bool("c")
    s = DrvAttrs({"__json": json.dumps({"a": "x", "b": True, "c": [1]})}, drv)
    assert s.get_string("a") == "x" and s.get_bool("b") and s.get_strings("z") is None
    with pytest.raises(AttrError, match="must be a list of strings"):
        s.get_strings("c")
    with pytest.raises(AttrError, match="must be a Boolean"):
        s.get_bool("a")
    assert parse_json(str(1 << 64)) == float(1 << 64)  # beyond 64 bits: a double
    assert isinstance(parse_json(str((1 << 64) - 1)), int)


# --- the oracle: real nix-daemon and ours, same derivations, same store path ------------------

DUMP = r'''
import json, os, sys
top = os.environ.get("NIX_BUILD_TOP", os.getcwd())
files = {}
for n in sorted(os.listdir(top)):
    with open(os.path.join(top, n), "rb") as f:
        files[n] = f.read().decode("utf-8", "backslashreplace")
res = {"env": dict(sorted(os.environ.items())), "files": files, "argv": sys.argv, "cwd": os.getcwd()}
if "out" in os.environ:
    outs = {k: os.environ[k] for k in ("out", "dev")}
else:
    with open(os.path.join(top, ".attrs.json")) as f:
        outs = json.load(f)["outputs"]
with open(outs["dev"], "w") as f:
    f.write("")
with open(outs["out"], "w") as f:
    f.write(json.dumps(res, indent=1, sort_keys=True))
'''

PROBES = r'''
let
  sys = builtins.currentSystem;
  dump = ./dump.py;
  dep2 = derivation { name = "dep2"; system = sys; builder = "/bin/sh"; args = ["-c" "echo x > $out"]; };
  dep = derivation { name = "dep"; system = sys; builder = "/bin/sh"; args = ["-c" "echo ${dep2} > $out"]; };
  mk = name: extra: derivation ({ inherit name; system = sys; builder = "/usr/bin/python3";
                                   args = [dump "${placeholder "out"}/arg"]; outputs = ["out" "dev"]; } // extra);
in {
  plain = mk "plain" {
    foo = "foo ${placeholder "out"} ${placeholder "dev"}"; bar = "bar\n"; "weird-name" = "w";
    passAsFile = ["foo" "bar" "weird-name" "missing" "foo"];
    plain = "x${placeholder "dev"}y"; "${placeholder "out"}" = "key"; PATH = "/usr/bin:/bin";
    exportReferencesGraph = ["graph" dep "g2" "${dump}/sub" "g3" dep.drvPath];
  };
  structured = mk "structured" {
    __structuredAttrs = true;
    str = "it's a \"str\"\n\t${placeholder "dev"} é \u{1}";
    int = 42; neg = -7; big = 4294967297; huge = 9223372036854775807;
    floats = [1.5 2.0 0.1 1000000000000000.0 123456789012345.6 0.00001 0.0001 (-3.25) 12345678901234567890.0];
    float = 1.5; whole = 2.0; t = true; f = false; n = null;
    list = [1 "a" true false null]; nested = [[1]]; emptyl = []; emptya = {};
    attrs = { a = 1; "b c" = "d'e"; z = false; "" = 1; }; deep = { a.b = 1; };
    "bad-name" = 1; PATH = "/bin"; passAsFile = ["str"];
    exportReferencesGraph = { graph = [ dep ]; g2 = dump; g3 = dep.drvPath; };
    outputChecks.out.maxSize = 100000;
  };
  fixed = derivation { name = "fixed"; system = sys; builder = "/usr/bin/python3";
    args = ["-c" "import os; print(sorted(os.environ.items())); open(os.environ['out'], 'w').write('')"];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    impureEnvVars = ["SK_PROBE_IMPURE" "SK_PROBE_UNSET"]; };
  odd = mk "odd" { exportReferencesGraph = ["a"]; };
  badname = mk "badname" { exportReferencesGraph = ["a/b" dep]; };
  nonstore = mk "nonstore" { exportReferencesGraph = ["a" "/etc/passwd"]; };
  notinput = mk "notinput" { exportReferencesGraph = ["a" (builtins.unsafeDiscardStringContext "${dep}")]; };
  maxsize = mk "maxsize" { __structuredAttrs = true; outputChecks.out.maxSize = 10; };
  maxclosure = mk "maxclosure" { __structuredAttrs = true; outputChecks.out.maxClosureSize = 10; };
  requisites = mk "requisites" { __structuredAttrs = true; outputChecks.out.allowedRequisites = [ ]; };
  references = mk "references" { __structuredAttrs = true; outputChecks.out.allowedReferences = [ "dev" ]; };
  devok = mk "devok" { __structuredAttrs = true; outputChecks.dev.allowedReferences = [ ];
                       outputChecks.out.allowedReferences = [ "out" "dev" dump ];
                       outputChecks.out.maxClosureSize = 100000; };
  badtype = mk "badtype" { __structuredAttrs = true; outputChecks.out.allowedReferences = [ 1 ]; };
  badsize = mk "badsize" { __structuredAttrs = true; outputChecks.out.maxSize = "x"; };
  unbuilt = mk "unbuilt" { exportReferencesGraph = ["a" (derivation { name = "never"; system = sys;
                             builder = "/bin/sh"; args = ["-c" "exit 1"]; }).drvPath]; };
  features = mk "features" { __structuredAttrs = true; requiredSystemFeatures = [ "sk-probe-feature" ]; };
}
'''
PROBE_NAMES = ["plain", "structured", "fixed", "odd", "badname", "nonstore", "notinput", "maxsize",
               "maxclosure", "requisites", "references", "devok", "badtype", "badsize", "features",
               "unbuilt"]


def _tmp_env(a) -> None:
    """Both daemons keep build dirs under the area, so their names match."""
    tmp = os.path.join(a.base, "tmp")
    os.makedirs(tmp, exist_ok=True)
    plain_env = a.env

    def env(remote: bool = True) -> dict[str, str]:
        e = plain_env(remote)
        e.update({"TMPDIR": tmp, "SK_PROBE_IMPURE": "from-the-daemon"})
        return e
    a.env = env


def _both(area_factory, files: dict[str, str], session, conf: str = "") -> list:
    """``session(area)`` against the real nix-daemon, then ours, at the same store path."""
    results = []
    base = None
    for kind in ("nix", "ours"):
        a = area_factory(conf=conf, base=base)
        _tmp_env(a)
        for name, text in files.items():
            with open(os.path.join(a.work, name), "w") as f:
                f.write(text)
        a.start(kind)
        try:
            results.append(session(a))
        finally:
            a.stop()
        base = a.base
        if kind == "nix":
            os.rename(base, base + "-nix")
    return results


def _probe_session(a) -> dict:
    out = {}
    for name in PROBE_NAMES:
        p = a.run(["nix-build", "probes.nix", "-A", name, "--no-out-link"])
        err = strip_ansi(p.stderr.decode())
        paths = p.stdout.decode().split()
        out[name] = (p.returncode, paths, err, [open(q).read() for q in paths])
    # rebuilt at scratch paths: the builder sees those (placeholders included), and the
    # result, rewritten back, must be the same bytes
    for name in ("plain", "structured"):
        p = a.run(["nix-build", "probes.nix", "-A", name, "--no-out-link", "--check"])
        out[name + "-check"] = (p.returncode, strip_ansi(p.stderr.decode()))
    return out


@needs_nix
@pytest.mark.nix
def test_builders_get_what_nix_daemon_gives(area_factory):
    real, ours = _both(area_factory, {"probes.nix": PROBES, "dump.py": DUMP}, _probe_session)
    for name in real:
        assert ours[name] == real[name], name
    assert real["plain-check"][0] == 0 and real["structured-check"][0] == 0
    # and what they got is what this feature is about
    plain = json.loads(real["plain"][3][0])
    out = real["plain"][1][0]
    assert plain["env"]["fooPath"].endswith("/" + attr_file_name("foo"))
    assert plain["files"][attr_file_name("foo")].startswith(f"foo {out} ")
    assert plain["argv"][1] == out + "/arg" and plain["env"][out] == "key"
    assert plain["files"]["graph"].count("\n\n") == 2
    structured = json.loads(real["structured"][3][0])
    assert "PATH" in structured["files"][".attrs.sh"] and structured["env"]["PATH"] == "/path-not-set"
    assert set(structured["env"]) >= {"NIX_ATTRS_JSON_FILE", "NIX_ATTRS_SH_FILE"}
    assert "FOO=" not in real["fixed"][2] and "'SK_PROBE_IMPURE', 'from-the-daemon'" in real["fixed"][2]
    assert "NIX_OUTPUT_CHECKED" in real["fixed"][2]
    for name in ("odd", "badname", "nonstore", "notinput", "maxsize", "maxclosure", "requisites",
                 "references", "badtype", "badsize", "features", "unbuilt"):
        assert real[name][0] != 0, name
    assert real["devok"][0] == 0, real["devok"][2]


# --- a small stdenv-like chain ----------------------------------------------------------------

#: host tools copied into the store as one fixed output (dynamically linked: builds here
#: are not sandboxed, so the host's libc serves them as it serves the daemons)
TOOLS = ["bash", "cat", "chmod", "cp", "dash", "head", "ln", "ls", "mkdir", "mv", "rm", "sed",
         "sort", "tr", "wc"]

SETUP = r"""
export PATH=@tools@/bin
fixupOutput() {
  [ -e "$1" ] || { echo "output $1 was not produced"; exit 1; }
  if [ -d "$1/bin" ]; then
    for f in "$1"/bin/*; do
      if [ "$(head -c 2 "$f")" = "#!" ]; then
        sed -i "1s|^#! */bin/sh|#!@tools@/bin/sh|" "$f"
        chmod +x "$f"
      fi
    done
  fi
}
genericBuild() {
  if [ -n "${buildCommandPath:-}" ]; then
    . "$buildCommandPath"
  else
    for phase in buildPhase installPhase; do
      eval "p=\${${phase}Path:-}"
      [ -z "$p" ] || { echo "running $phase"; . "$p"; }
    done
  fi
  for o in ${outputs:-out}; do eval "fixupOutput \"\$$o\""; done
}
"""

CHAIN = r'''
let
  sys = builtins.currentSystem;
  tools = derivation {
    name = "bootstrap-tools"; system = sys; builder = "/bin/sh";
    args = ["-c" "PATH=/usr/bin:/bin; mkdir -p $out/bin; for t in @toollist@; do cp $(command -v $t) $out/bin/$t; done; ln -s dash $out/bin/sh"];
    outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = "@toolshash@";
  };
  setup = builtins.replaceStrings ["@tools@"] ["${tools}"] (builtins.readFile ./setup.sh);
  mkDerivation = args: derivation ({
    system = sys; builder = "${tools}/bin/sh";
    args = ["-e" "-c" ". \"$setupPath\"; genericBuild"];
    inherit setup;
    passAsFile = ["setup" "buildCommand" "buildPhase" "installPhase"];
  } // args);
  libgreet = mkDerivation {
    name = "libgreet"; outputs = ["out" "dev"];
    buildCommand = ''
      mkdir -p $out/lib $dev/include $dev/nix-support
      echo "greetings from libgreet" > $out/lib/greeting
      echo "${placeholder "out"}/lib" > $dev/nix-support/libdir
      echo "#define GREETING_DIR \"${placeholder "out"}/lib\"" > $dev/include/greet.h
    '';
  };
  hello = mkDerivation {
    name = "hello"; buildInputs = [ libgreet.dev ];
    buildPhase = ''
      libdir=$(cat ${libgreet.dev}/nix-support/libdir)
      printf '#!/bin/sh\ncat %s/greeting\n' "$libdir" > hello
    '';
    installPhase = ''
      mkdir -p ${placeholder "out"}/bin
      cp hello $out/bin/hello
    '';
    allowedReferences = [ "out" tools libgreet.out ];
  };
  report = derivation {
    name = "hello-report"; system = sys; builder = "${tools}/bin/bash";
    __structuredAttrs = true;
    args = ["-e" "-c" "source \"$NIX_ATTRS_SH_FILE\"; eval \"$setup\"; main"];
    setup = setup + ''
      main() {
        mkdir -p ''${outputs[out]}
        cp "$NIX_ATTRS_JSON_FILE" ''${outputs[out]}/attrs.json
        echo "checks: ''${checks[@]}" > ''${outputs[out]}/summary
        echo "hello is ''${targets[hello]}" >> ''${outputs[out]}/summary
      }
    '';
    checks = [ "a" "b c" 3 true ];
    targets = { hello = "${hello}"; };
    exportReferencesGraph = { closure = [ hello ]; };
    outputChecks.out = { allowedRequisites = [ "out" hello libgreet.out tools ]; maxSize = 100000; };
  };
  closureInfo = mkDerivation {
    name = "closure-info";
    exportReferencesGraph = [ "graph" report ];
    buildCommand = ''
      mkdir -p $out
      cp graph $out/registration
      ls ${hello}/bin > $out/hello-bin
    '';
  };
in { inherit tools libgreet hello report closureInfo; }
'''
CHAIN_ATTRS = ["tools", "libgreet", "libgreet.dev", "hello", "report", "closureInfo"]


def _host_tool(name: str) -> str:
    # what the fixed output's `command -v` finds with PATH=/usr/bin:/bin
    return next(p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.access(p, os.X_OK))


def _tools_nar_hash() -> str:
    tree = os.path.join("/tmp", f"sk-tools-{os.getpid()}")
    os.makedirs(os.path.join(tree, "bin"))
    try:
        for t in TOOLS:
            shutil.copy(_host_tool(t), os.path.join(tree, "bin", t))
        os.symlink("dash", os.path.join(tree, "bin", "sh"))
        h = hashlib.sha256()
        for chunk in dump_path(tree):
            h.update(chunk)
        return h.hexdigest()
    finally:
        shutil.rmtree(tree)


def _chain_session(a) -> dict:
    out: dict = {}
    for attr in CHAIN_ATTRS:
        p = a.run(["nix-build", "chain.nix", "-A", attr, "-o", attr], timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        paths = p.stdout.decode().split()
        out[attr] = {q: a.run(["nix-store", "-q", "--hash", q], check=True).stdout.decode().strip()
                     for q in paths}
        out[attr + "-closure"] = a.run(["nix-store", "-qR", *paths], check=True).stdout.decode()
    hello = os.path.join(a.work, "hello", "bin", "hello")
    out["run"] = subprocess.run([hello], capture_output=True, timeout=20).stdout.decode()
    report = os.readlink(os.path.join(a.work, "report"))
    out["summary"] = open(os.path.join(report, "summary")).read()
    out["attrs.json"] = open(os.path.join(report, "attrs.json")).read()
    out["registration"] = open(os.path.join(a.work, "closureInfo", "registration")).read()
    return out


@needs_nix
@pytest.mark.nix
def test_stdenv_like_chain_builds_as_with_nix_daemon(area_factory):
    if not all(shutil.which(t) for t in TOOLS):
        pytest.skip("host tools for the bootstrap set are missing")
    chain = CHAIN.replace("@toollist@", " ".join(TOOLS)).replace("@toolshash@", _tools_nar_hash())
    real, ours = _both(area_factory, {"chain.nix": chain, "setup.sh": SETUP}, _chain_session)
    assert ours == real
    # the chain did what it says: placeholders, passAsFile phases, two outputs, structured
    # attrs and both exportReferencesGraph forms
    assert real["run"] == "greetings from libgreet\n"
    dev = next(iter(real["libgreet.dev"]))
    assert dev.endswith("-libgreet-dev") and next(iter(real["libgreet"])) in real["libgreet.dev-closure"]
    assert real["summary"].startswith("checks: a b c 3 1\nhello is /")
    doc = json.loads(real["attrs.json"])
    hello = next(iter(real["hello"]))
    assert hello in [i["path"] for i in doc["closure"]]
    assert real["registration"].startswith("/") and hello + "\n\n" in real["registration"]


OWNED = r'''
let mk = name: extra: derivation ({ inherit name; system = builtins.currentSystem; builder = "/bin/bash";
  args = ["-c" ''
    PATH=/usr/bin:/bin; cd "$NIX_BUILD_TOP"
    if [ -n "''${NIX_ATTRS_SH_FILE:-}" ]; then source "$NIX_ATTRS_SH_FILE"; out=''${outputs[out]}; fi
    for f in .attr-* .attrs.* graph; do
      [ -e "$f" ] || continue
      if [ -O "$f" ]; then echo "$f mine" >> $out; else echo "$f not mine" >> $out; fi
    done
  '']; } // extra);
in {
  plain = mk "owned-plain" { foo = "x"; passAsFile = ["foo"]; exportReferencesGraph = ["graph" ./owned.nix]; };
  structured = mk "owned-structured" { __structuredAttrs = true; };
}
'''


@needs_nix
@pytest.mark.nix
def test_build_dir_files_belong_to_the_build_user(area_factory, build_users):
    group, _users = build_users

    def session(a) -> dict:
        out = {}
        for attr in ("plain", "structured"):
            p = a.run(["nix-build", "owned.nix", "-A", attr, "--no-out-link"])
            out[attr] = (p.returncode, strip_ansi(p.stderr.decode())[-300:],
                         [open(q).read() for q in p.stdout.decode().split()])
        return out
    real, ours = _both(area_factory, {"owned.nix": OWNED}, session,
                       conf=f"build-users-group = {group}\n")
    assert ours == real
    assert real["plain"][2] == [f"{attr_file_name('foo')} mine\ngraph not mine\n"]
    assert real["structured"][2] == [".attrs.json mine\n.attrs.sh mine\n"]


def _random_document(seed: int) -> dict:
    rnd = random.Random(seed)
    chars = "ab'\"\\\n\t\x01\x1f\x7f é€😀 $`"

    def text() -> str:
        return "".join(rnd.choice(chars) for _ in range(rnd.randrange(8)))

    def double() -> float:
        kind = rnd.randrange(4)
        if kind == 0:
            return rnd.uniform(-1e6, 1e6)
        if kind == 1:
            return float(rnd.randrange(-10**17, 10**17)) / 10 ** rnd.randrange(0, 20)
        if kind == 2:
            return rnd.choice([1e15, 1e16, 123456789012345.6, 0.1, 1e-5, 5e-324, 1.7976931348623157e308])
        return rnd.uniform(-1, 1) * 10 ** rnd.randrange(-30, 30)
    return {
        "doubles": [double() for _ in range(300)],
        "ints": [rnd.randrange(-2**63, 2**63) for _ in range(50)],
        "strings": [text() for _ in range(50)],
        "attrs": {text() or "k": rnd.choice([text(), rnd.randrange(-2**40, 2**40), None, True, False])
                  for _ in range(20)},
    }


@needs_nix
@pytest.mark.nix
@pytest.mark.parametrize("seed", [2, 14, 21])
def test_attrs_files_match_nix_on_random_documents(area_factory, seed):
    """Nix's own bytes for documents made to hit the edge cases (number forms, escapes).
    (Nix's evaluator keeps 6 significant digits of a float in ``__json``: those are
    the doubles nlohmann, and we, then print.)"""
    a = area_factory()
    doc = _random_document(seed)
    with open(os.path.join(a.work, "doc.json"), "w") as f:
        json.dump(doc, f)
    expr = ('derivation ((builtins.fromJSON (builtins.readFile ./doc.json)) // { name = "rnd"; '
            '__structuredAttrs = true; system = builtins.currentSystem; builder = "/usr/bin/python3"; '
            'args = ["-c" "import json, os, shutil; o = json.load(open(\'.attrs.json\'))[\'outputs\'][\'out\']; '
            'os.mkdir(o); [shutil.copy(f, o) for f in (\'.attrs.json\', \'.attrs.sh\')]"]; })')
    with open(os.path.join(a.work, "rnd.nix"), "w") as f:
        f.write(expr)
    p = subprocess.run(["nix-build", "rnd.nix"], env=a.env(remote=False), cwd=a.work,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode().strip()
    drv_path = subprocess.run(["nix-instantiate", "rnd.nix"], env=a.env(remote=False), cwd=a.work,
                              capture_output=True, check=True, timeout=60).stdout.decode().strip()
    with open(drv_path, "rb") as f:
        drv = parse_derivation(f.read())
    full = structured_document(parse_json(drv.env["__json"]), {"out": out}, {})
    with open(os.path.join(out, ".attrs.json")) as f:
        assert render_json(full) == f.read()
    with open(os.path.join(out, ".attrs.sh")) as f:
        assert render_sh(full) == f.read()
