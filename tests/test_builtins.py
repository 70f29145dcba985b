"""Builtin builders (``builtin:buildenv``, ``builtin:fetchurl``) against Nix 2.8 as the oracle.

The oracle tests run one client session twice at the same store path (as
tests/test_build.py does): first against the real ``nix-daemon``, then, the first
store moved aside, against ours; every output tree, NAR hash, log and message must
come out the same.  The unit tests at the end need no Nix.
"""

from __future__ import annotations

import http.server
import io
import lzma
import os
import pwd
import re
import socket
import subprocess
import sys
import tarfile as tf
import threading

import pytest
from conftest import needs_nix
from daemon_util import strip_ansi
from test_build import SYSTEM, Area, area_factory, build_users  # noqa: F401 -- (fixtures)

from storekeeper.build.builtins import buildenv, fetchurl, unpackchannel
from storekeeper.build.builtins.common import BuiltinError
from storekeeper.build.jsonlog import BuilderJSONLog
from storekeeper.fs.narfs import dump_path

# --- buildenv derivations ------------------------------------------------------------------

_PKGS = r"""
let
  mk = name: script: derivation { inherit name; system = "SYSTEM"; builder = "/bin/sh";
    args = ["-c" ("PATH=/bin:/usr/bin; " + script)]; };
in rec {
  c = mk "c" "mkdir -p $out/lib $out/bin; echo c > $out/lib/libc; echo c > $out/bin/x; echo c > $out/bin/onlyc";
  a = mk "a" "mkdir -p $out/bin $out/share/doc/a $out/nix-support $out/lib $out/share/info $out/info; echo a > $out/bin/x; echo a > $out/bin/onlya; echo a > $out/share/doc/a/README; for f in log perllocal.pod manifest.json manifest.nix propagated-build-inputs share/info/dir share/info/keep info/dir lib/dir; do echo > $out/$f; done; mkdir -p $out/share/log; echo ${c} > $out/nix-support/propagated-user-env-packages; ln -s /nonexistent $out/dangling";
  b = mk "b" "mkdir -p $out/bin $out/share/doc/b $out/share/info; echo b > $out/bin/x; echo b > $out/share/doc/b/README; echo > $out/share/info/b; ln -s ${c}/lib $out/lib";
  same = mk "same" "mkdir -p $out/bin; echo a > $out/bin/x";
  fdir = mk "fdir" "mkdir -p $out/bin/x; echo > $out/bin/x/y";
  la = mk "la" "mkdir -p $out/lib";
  lb = mk "lb" "mkdir $out; ln -s ${c}/lib $out/lib";
  f1 = mk "f1" "mkdir -p $out/x/y";
  f2 = mk "f2" "mkdir -p $out/x; echo > $out/x/y";
  g1 = mk "g1" "mkdir -p $out/x/z";
  g3 = mk "g3" "mkdir $out; echo > $out/x";
  env = drvs: derivation { name = "env"; system = "builtin"; builder = "builtin:buildenv";
    manifest = builtins.toFile "manifest.nix" "[ ]"; derivations = drvs; };
  cases = {
    priorities = env [ "true" 5 1 a "true" 6 1 b ];
    reversed = env [ "true" 6 1 a "true" 5 1 b ];
    same-priority = env [ "true" 5 1 a "true" 5 1 b ];
    same-priority-swapped = env [ "true" 5 1 b "true" 5 1 a ];
    identical-files-conflict = env [ "true" 5 2 a same ];
    inactive = env [ "false" 4 1 a "true" 5 1 b ];
    dir-vs-file = env [ "true" 5 1 b "true" 6 1 fdir ];
    file-vs-dir = env [ "true" 5 1 fdir "true" 6 1 b ];
    linked-dirs = env [ "true" 5 1 lb "true" 5 1 la ];
    nested-conflict = env [ "true" 5 1 f2 "true" 5 1 f1 ];
    nested-priority = env [ "true" 5 1 f1 "true" 6 1 f2 ];
    file-vs-real-dir = env [ "true" 5 1 f1 "true" 5 1 g1 "true" 6 1 g3 ];
    propagated-loses = env [ "true" 5 1 c "true" 7 1 a ];
    empty = env [ ];
  };
}
"""


def tree(path: str) -> list[tuple[str, str, str]]:
    """(relative path, type, link target) of everything under ``path``, sorted."""
    out = []
    for d, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(d, n)
            kind = "l" if os.path.islink(p) else "d" if os.path.isdir(p) else "f"
            out.append((os.path.relpath(p, path), kind, os.readlink(p) if kind == "l" else ""))
    return sorted(out)


def _record(a: Area, args: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr); the "building '…'" lines sorted: independent
    derivations are built in an order of the scheduler's choosing (not what is compared)."""
    p = a.run(args, timeout=120)
    lines = strip_ansi(p.stderr.decode()).split("\n")
    at = [i for i, line in enumerate(lines) if line.startswith("building '")]
    for i, line in zip(at, sorted(lines[i] for i in at)):
        lines[i] = line
    return p.returncode, p.stdout.decode().strip(), "\n".join(lines)


def buildenv_session(a: Area) -> dict:
    expr = os.path.join(a.work, "pkgs.nix")
    with open(expr, "w") as f:
        f.write(_PKGS.replace("SYSTEM", SYSTEM))
    out: dict = {}
    names = re.findall(r"^    ([a-z-]+) = env", _PKGS, re.M)
    for name in names:
        res = _record(a, ["nix-build", "--no-out-link", expr, "-A", f"cases.{name}"])
        out[name] = res
        if res[0] == 0:
            out[name + "-tree"] = tree(res[1])
            out[name + "-hash"] = a.run(["nix-store", "-q", "--hash", res[1]], check=True).stdout
        drv = a.run(["nix-instantiate", expr, "-A", f"cases.{name}"], check=True).stdout.decode().strip()
        # the stored log, byte for byte (colours and @nix lines included)
        out[name + "-log"] = a.run(["nix-store", "-l", drv]).stdout
    # any builder's @nix lines: messages, not log lines (kept in the stored log)
    with open(os.path.join(a.work, "jsonlog.sh"), "w") as f:
        f.write("""echo '@nix {"action":"msg","level":0,"msg":"from the builder"}'\n"""
                "echo plain\nexit 1\n")
    with open(os.path.join(a.work, "jsonlog.nix"), "w") as f:
        f.write(f'derivation {{ name = "jsonlog"; system = "{SYSTEM}"; builder = "/bin/sh"; '
                'args = [ ./jsonlog.sh ]; }')
    expr = os.path.join(a.work, "jsonlog.nix")
    out["jsonlog"] = _record(a, ["nix-build", "--no-out-link", expr])
    drv = a.run(["nix-instantiate", expr], check=True).stdout.decode().strip()
    out["jsonlog-log"] = a.run(["nix-store", "-l", drv]).stdout
    return out


def _twice(area_factory, session) -> tuple[dict, dict]:
    a = area_factory()
    real = session(a.start("nix"))
    a.stop()
    os.rename(a.base, a.base + "-nix")
    a = area_factory(base=a.base)
    ours = session(a.start("ours"))
    with open(os.path.join(a.base, "ours-daemon.log"), "rb") as f:
        assert b"Traceback" not in f.read()
    return real, ours


@needs_nix
@pytest.mark.nix
def test_buildenv_trees_priorities_and_conflicts_like_nix(area_factory):
    real, ours = _twice(area_factory, buildenv_session)
    assert sorted(ours) == sorted(real)
    for key in real:
        assert ours[key] == real[key], f"{key} differs:\n{ours[key]!r}\n{real[key]!r}"
    # what the comparison covered (so that it cannot pass vacuously)
    assert real["priorities"][0] == 0 and ("bin/x", "l", real["priorities-tree"][3][2]) in \
        real["priorities-tree"] and real["priorities-tree"][3][2].endswith("-a/bin/x")
    assert "warning: skipping dangling symlink" in real["priorities"][2]
    assert "have the same priority 5; use 'nix-env --set-flag priority" in real["same-priority"][2]
    assert "collision between" in real["dir-vs-file"][2]
    assert "collision between non-directory" in real["file-vs-real-dir"][2]
    assert [real[k][0] for k in ("file-vs-dir", "linked-dirs", "nested-priority", "empty")] == [0] * 4
    assert b"\x1b[31;1merror:\x1b[0m packages '\x1b[35;1m" in real["same-priority-log"]
    assert ("lib/libc", "l") == real["linked-dirs-tree"][1][:2]
    assert "from the builder" in real["jsonlog"][2] and "last 1 log lines" in real["jsonlog"][2]


# --- fetchurl ------------------------------------------------------------------------------

HELLO = b"hello, fetchurl\n"


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 -- (http.server's name)
        if self.path == "/moved":
            self.send_response(301)
            self.send_header("Location", "/hello.txt")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


class Server:
    """A real HTTP server on loopback, in a thread, serving ``root``."""

    def __init__(self, root: str) -> None:
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), lambda *a: _Handler(*a, directory=root))
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def served(shared_dir):
    """A directory with a file, a NAR and an xz NAR of a small tree, served over HTTP
    (and readable by build users, for file:// URLs)."""
    root = os.path.join(shared_dir, "served")
    os.makedirs(os.path.join(root, "tree", "sub"))
    with open(os.path.join(root, "hello.txt"), "wb") as f:
        f.write(HELLO)
    with open(os.path.join(root, "tree", "sub", "f"), "w") as f:
        f.write("in a nar\n")
    os.symlink("sub/f", os.path.join(root, "tree", "link"))
    nar = b"".join(dump_path(os.path.join(root, "tree")))
    with open(os.path.join(root, "tree.nar"), "wb") as f:
        f.write(nar)
    with open(os.path.join(root, "tree.nar.xz"), "wb") as f:
        f.write(lzma.compress(nar))
    server = Server(root)
    try:
        yield root, server.port
    finally:
        server.close()


def _nix_hash(path: str, *flags: str) -> str:
    return subprocess.run(["nix-hash", "--type", "sha256", *flags, path], check=True,
                          capture_output=True, text=True).stdout.strip()


def fetch_cases(root: str, port: int) -> dict[str, str]:
    h = _nix_hash(os.path.join(root, "hello.txt"), "--flat")
    nar_h = _nix_hash(os.path.join(root, "tree"))
    exe = os.path.join(root, "exe")
    os.makedirs(exe, exist_ok=True)
    with open(os.path.join(exe, "x"), "wb") as f:
        f.write(HELLO)
    os.chmod(os.path.join(exe, "x"), 0o755)
    exe_h = _nix_hash(os.path.join(exe, "x"))
    http_ = f"http://127.0.0.1:{port}"

    def f(name: str, url: str, sha: str, extra: str = "") -> str:
        return (f'import <nix/fetchurl.nix> {{ name = "{name}"; url = "{url}"; '
                f'sha256 = "{sha}"; {extra} }}')
    return {
        "file": f("file", f"file://{root}/hello.txt", h),
        "file-executable": f("file-exe", f"file://{root}/hello.txt", exe_h, "executable = true;"),
        "file-unpack": f("file-nar", f"file://{root}/tree.nar", nar_h, "unpack = true;"),
        "file-unpack-xz": f("file-nar-xz", f"file://{root}/tree.nar.xz", nar_h, "unpack = true;"),
        "file-missing": f("file-missing", f"file://{root}/missing", h),
        "file-bad-hash": f("file-bad", f"file://{root}/hello.txt", "0" * 64),
        "http": f("http", f"{http_}/hello.txt", h),
        "http-redirect": f("http-moved", f"{http_}/moved", h),
        "http-unpack-xz": f("http-nar-xz", f"{http_}/tree.nar.xz", nar_h, "unpack = true;"),
        "http-404": f("http-404", f"{http_}/missing", h),
        "http-bad-hash": f("http-bad", f"{http_}/hello.txt", "1" * 64),
    }


def fetch_session(a: Area, cases: dict[str, str]) -> dict:
    out: dict = {}
    for name, expr in cases.items():
        res = _record(a, ["nix-build", "--no-out-link", "-E", expr])
        out[name] = res
        if res[0] == 0:
            out[name + "-tree"] = tree(res[1]) if os.path.isdir(res[1]) else \
                (open(res[1], "rb").read(), os.stat(res[1]).st_mode & 0o777)
            out[name + "-info"] = [a.run(["nix-store", "-q", q, res[1]], check=True).stdout
                                   for q in ("--hash", "--deriver", "--references")]
    return out


@needs_nix
@pytest.mark.nix
def test_fetchurl_file_and_http_like_nix(area_factory, served):
    root, port = served
    cases = fetch_cases(root, port)
    real, ours = _twice(area_factory, lambda a: fetch_session(a, cases))
    for key in real:
        assert ours[key] == real[key], f"{key} differs:\n{ours[key]!r}\n{real[key]!r}"
    assert [real[k][0] for k in ("file", "file-executable", "file-unpack", "file-unpack-xz",
                                 "http", "http-redirect", "http-unpack-xz")] == [0] * 7
    assert real["file-tree"] == (HELLO, 0o444) and real["file-executable-tree"] == (HELLO, 0o555)
    assert ("link", "l", "sub/f") in real["file-unpack-tree"]
    assert "Couldn't read a file:// file (37)" in real["file-missing"][2]
    assert "HTTP error 404 ('File not found')" in real["http-404"][2]
    assert "hash mismatch in fixed-output derivation" in real["http-bad-hash"][2]


# --- the profile round trip ----------------------------------------------------------------

_PROFILE_PKGS = r"""
let mk = name: script: derivation { inherit name; system = "SYSTEM"; builder = "/bin/sh";
      args = ["-c" ("PATH=/bin:/usr/bin; mkdir -p $out/bin $out/share/" + name + "; " + script)]; };
in {
  hello = mk "hello-1.0" "printf '#!/bin/sh\\necho hello\\n' > $out/bin/hello; chmod +x $out/bin/hello";
  world = mk "world-2.1" "printf '#!/bin/sh\\necho world\\n' > $out/bin/world; chmod +x $out/bin/world";
  clash = mk "clash-0.1" "printf '#!/bin/sh\\necho clash\\n' > $out/bin/hello";
}
"""


def profile_session(a: Area) -> dict:
    expr = os.path.join(a.work, "pkgs.nix")
    with open(expr, "w") as f:
        f.write(_PROFILE_PKGS.replace("SYSTEM", SYSTEM))
    profile = os.path.join(a.work, "profiles", "me")
    os.makedirs(os.path.dirname(profile))
    out: dict = {}

    def state(step: str) -> None:
        links = {n: os.readlink(os.path.join(a.work, "profiles", n))
                 for n in sorted(os.listdir(os.path.dirname(profile)))}
        out[step + "-links"] = links
        gen = os.path.realpath(profile)
        out[step + "-tree"] = tree(gen) if os.path.isdir(gen) else None
        manifest = os.path.join(gen, "manifest.nix")
        out[step + "-manifest"] = open(manifest).read() if os.path.exists(manifest) else None
        out[step + "-query"] = _record(a, ["nix-env", "-p", profile, "-q"])
        gens = _record(a, ["nix-env", "-p", profile, "--list-generations"])
        # (generation number, current?) without the creation dates
        out[step + "-generations"] = (gens[0], [(line.split()[0], line.endswith("(current)"))
                                                for line in gens[1].splitlines()], gens[2])

    nix_env = ["nix-env", "-p", profile, "-f", expr]
    out["install-hello"] = _record(a, [*nix_env, "-iA", "hello"])
    state("install-hello")
    out["install-world"] = _record(a, [*nix_env, "-i", "world-2.1"])
    state("install-world")
    out["run"] = (a.run([os.path.join(profile, "bin", "hello")]).stdout,
                  a.run([os.path.join(profile, "bin", "world")]).stdout)
    out["install-clash"] = _record(a, [*nix_env, "-iA", "clash"])  # bin/hello twice
    state("install-clash")
    out["erase-hello"] = _record(a, ["nix-env", "-p", profile, "-e", "hello"])
    state("erase-hello")
    out["rollback"] = _record(a, ["nix-env", "-p", profile, "--rollback"])
    state("rollback")
    out["delete"] = _record(a, ["nix-env", "-p", profile, "--delete-generations", "1", "3"])
    state("delete")
    out["switch"] = _record(a, ["nix-env", "-p", profile, "--switch-generation", "1"])
    state("switch")
    out["gc-keeps"] = a.run(["nix-store", "--gc"]).returncode
    out["gc-alive"] = os.path.exists(os.path.realpath(profile))
    return out


@needs_nix
@pytest.mark.nix
def test_profile_round_trip_with_nix_env_like_nix(area_factory):
    real, ours = _twice(area_factory, profile_session)
    for key in real:
        assert ours[key] == real[key], f"{key} differs:\n{ours[key]!r}\n{real[key]!r}"
    assert real["run"] == (b"hello\n", b"world\n")
    assert real["install-world-query"][1].split() == ["hello-1.0", "world-2.1"]
    assert real["erase-hello-query"][1].split() == ["world-2.1"]
    assert real["rollback-query"][1].split() == ["hello-1.0", "world-2.1"]
    assert real["delete-generations"][1] == [("2", True)]
    assert real["install-hello-links"]["me"] == "me-1-link"
    assert real["install-clash"][0] == 1 and "have the same priority 5" in real["install-clash"][2]
    assert real["install-clash-links"] == real["install-world-links"]
    assert real["install-world-manifest"].startswith("[ {")


@needs_nix
@pytest.mark.nix
@pytest.mark.root
def test_builtins_run_as_the_build_user(area_factory, build_users, served):
    """The builtin is a child process like any builder: as the build user.  So
    fetchurl reads a ``file://`` URL with the build user's rights (a root-only file
    fails as it does under nix-daemon), and nix-env works with build users."""
    group, (u1, _u2) = build_users
    root, port = served
    cases = fetch_cases(root, port)
    secret = os.path.join(root, "secret")
    with open(secret, "wb") as f:
        f.write(HELLO)
    os.chmod(secret, 0o600)
    cases["secret"] = cases["file"].replace("hello.txt", "secret").replace('"file"', '"secret"')
    a = area_factory(conf=f"build-users-group = {group}\n").start("ours")
    res = fetch_session(a, {k: cases[k] for k in ("file", "http", "file-unpack-xz", "secret")})
    assert [res[k][0] for k in ("file", "http", "file-unpack-xz")] == [0, 0, 0], res
    assert res["secret"][0] == 1 and "Couldn't read a file:// file (37)" in res["secret"][2]
    prof = profile_session(a)
    assert prof["run"] == (b"hello\n", b"world\n")
    assert prof["delete-generations"][1] == [("2", True)]
    assert os.path.exists(os.path.join(a.state, "userpool", str(u1.pw_uid)))


# --- unpack-channel ------------------------------------------------------------------------

def _channel_tarball(path: str, tops: list[str]) -> None:
    """A channel tarball (xz) with the given top-level directories."""
    with tf.open(path, "w:xz") as tar:
        for top in tops:
            def add(name: str, data: bytes = b"", mode: int = 0o644, top: str = top, **kw) -> None:
                ti = tf.TarInfo(f"{top}/{name}" if name else top)
                ti.mode, ti.size = mode, len(data)
                for k, v in kw.items():
                    setattr(ti, k, v)
                tar.addfile(ti, io.BytesIO(data) if data else None)
            add("", type=tf.DIRTYPE, mode=0o755)
            add("default.nix", b"{ }: { hi = 1; }\n")
            add("sub", type=tf.DIRTYPE, mode=0o700)
            add("sub/f", b"#!/bin/sh\n", mode=0o755)
            add("l", type=tf.SYMTYPE, linkname="sub/f")
            add("hard", type=tf.LNKTYPE, linkname=f"{top}/default.nix")


def channel_session(a: Area) -> dict:
    chan = os.path.join(a.work, "chan")
    os.makedirs(chan)
    _channel_tarball(os.path.join(chan, "nixexprs.tar.xz"), ["nixpkgs-unstable"])
    _channel_tarball(os.path.join(a.work, "two.tar.xz"), ["one", "two"])
    out: dict = {}
    out["add"] = _record(a, ["nix-channel", "--add", f"file://{chan}", "mychan"])
    out["update"] = _record(a, ["nix-channel", "--update"])
    profile = os.path.join(a.state, "profiles", "per-user", pwd.getpwuid(os.getuid()).pw_name,
                           "channels")
    gen = os.path.realpath(profile)
    out["profile-tree"] = tree(gen)
    unpacked = os.path.realpath(os.path.join(gen, "mychan"))
    out["channel-tree"] = [(p, k, t, os.lstat(os.path.join(unpacked, p)).st_mode & 0o777)
                           for p, k, t in tree(unpacked)]
    out["channel-hash"] = a.run(["nix-store", "-q", "--hash", os.path.dirname(unpacked)],
                                check=True).stdout
    out["list"] = _record(a, ["nix-channel", "--list"])
    out["two"] = _record(a, ["nix-build", "--no-out-link", "-E",
                             'derivation { builder = "builtin:unpack-channel"; system = "builtin"; '
                             f'name = "two"; channelName = "two"; src = {a.work}/two.tar.xz; }}'])
    return out


@needs_nix
@pytest.mark.nix
def test_unpack_channel_through_nix_channel_like_nix(area_factory):
    real, ours = _twice(area_factory, channel_session)
    for key in real:
        assert ours[key] == real[key], f"{key} differs:\n{ours[key]!r}\n{real[key]!r}"
    assert real["update"][0] == 0 and ("mychan", "l") == real["profile-tree"][1][:2]
    assert ("sub/f", "f", "", 0o555) in real["channel-tree"] and \
        ("l", "l", "sub/f", 0o777) in real["channel-tree"]
    assert real["two"][0] == 1 and "contains more than one file" in real["two"][2]


# --- without Nix ---------------------------------------------------------------------------

def _pkg(base: str, name: str, files: dict[str, str]) -> str:
    root = os.path.join(base, name)
    for rel, content in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(content)
    return root


def test_buildenv_writes_only_inside_out(tmp_path):
    """A link planted in $out (by the build user, before or during the build) is
    replaced by a directory of our own: nothing is written through it."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "kept").write_text("x")
    pkg = _pkg(str(tmp_path), "pkg", {"bin/x": "x"})
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "bin")
    buildenv.build_env(str(out), [buildenv.Package(pkg, True, 5)], "/m")
    assert sorted(os.listdir(victim)) == ["kept"]
    assert not os.path.islink(out / "bin") and os.readlink(out / "bin" / "x") == pkg + "/bin/x"
    assert os.readlink(out / "manifest.nix") == "/m"
    os.symlink(victim, tmp_path / "out-link")
    with pytest.raises(OSError):  # an $out that is a link is not followed either
        buildenv.build_env(str(tmp_path / "out-link"), [], "/m")
    assert sorted(os.listdir(victim)) == ["kept"]


def test_buildenv_rejects_a_malformed_derivations_list():
    assert buildenv.parse_packages("true 5 2 /a /b false 3 1 /c") == [
        buildenv.Package("/a", True, 5), buildenv.Package("/b", True, 5),
        buildenv.Package("/c", False, 3)]
    for bad in ("true 5 2 /a", "true x 1 /a", "true 5"):
        with pytest.raises(BuiltinError, match="malformed 'derivations'"):
            buildenv.parse_packages(bad)


def test_builtin_child_process_reports_errors_as_nix_does(tmp_path):
    env = {"out": str(tmp_path / "out"), "PATH": "/path-not-set"}
    for name, expect in (("buildenv", "attribute '\x1b[35;1mderivations\x1b[0m' missing"),
                         ("nosuch", "unsupported builtin builder '\x1b[35;1mnosuch\x1b[0m'")):
        p = subprocess.run([sys.executable, "-I", "-m", "storekeeper.build.builtins", name],
                           env=env, cwd=tmp_path, capture_output=True, timeout=60)
        assert p.returncode == 1
        assert p.stderr.decode() == f"\x1b[31;1merror:\x1b[0m {expect}\n"


def test_fetchurl_unpack_and_executable_stay_inside_out(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("f")
    os.symlink("/etc/passwd", src / "esc")
    nar = tmp_path / "x.nar"
    nar.write_bytes(b"".join(dump_path(str(src))))
    out = tmp_path / "out"
    fetchurl.fetch(str(out), f"file://{nar}", unpack=True, executable=False)
    assert os.readlink(out / "esc") == "/etc/passwd" and (out / "d" / "f").read_text() == "f"
    # $out already there (as a link to elsewhere): O_EXCL|O_NOFOLLOW refuses it
    os.symlink(tmp_path / "elsewhere", tmp_path / "out2")
    with pytest.raises(FileExistsError):
        fetchurl.fetch(str(tmp_path / "out2"), f"file://{nar}", unpack=False, executable=True)
    assert not os.path.lexists(tmp_path / "elsewhere")


def test_fetchurl_retries_a_refused_connection_then_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetchurl, "_BASE_DELAY_MS", 1)
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    with pytest.raises(BuiltinError, match=re.escape(f"unable to download '{url}': "
                                                     "Couldn't connect to server (7)")):
        fetchurl.fetch(str(tmp_path / "out"), url, unpack=False, executable=False)
    lines = capsys.readouterr().err.splitlines()
    warnings = [w for w in lines if w.startswith('@nix {"action":"msg","level":1,')]
    assert len(warnings) == fetchurl.TRIES - 1 and all("retrying in" in w for w in warnings)
    # inside the download activity, which ends with the failure
    assert lines[0].startswith('@nix {"action":"start","fields":["http://127.0.0.1:')
    assert lines[-1].startswith('@nix {"action":"stop","id":') and len(lines) == fetchurl.TRIES + 1
    assert not os.path.lexists(tmp_path / "out")


class _Log:
    def __init__(self) -> None:
        self.events: list = []

    def log(self, level, message):
        self.events.append(("log", level, message))

    def start_activity(self, level, act_type, text, fields=(), parent=0):
        self.events.append(("start", level, act_type, text, list(fields), parent))
        return 77

    def stop_activity(self, act_id):
        self.events.append(("stop", act_id))

    def result(self, act_id, result_type, fields):
        self.events.append(("result", act_id, result_type, list(fields)))


def test_builder_json_log_lines():
    log = _Log()
    j = BuilderJSONLog(log, parent=5)
    assert not j.handle(b"plain line")
    assert j.handle(b'@nix {"action":"msg","level":1,"msg":"hi"}')
    assert j.handle(b'@nix {"action":"start","id":9,"level":4,"type":101,"text":"dl","fields":["u"]}')
    assert j.handle(b'@nix {"action":"result","id":9,"type":105,"fields":[1,2,0,0]}')
    assert j.handle(b'@nix {"action":"stop","id":9}')
    assert not j.handle(b"@nix {not json")  # reported, then a log line as any other
    assert log.events[:4] == [("log", 1, "hi"), ("start", 4, 101, "dl", ["u"], 5),
                              ("result", 77, 105, [1, 2, 0, 0]), ("stop", 77)]
    assert log.events[4][0] == "log" and log.events[4][2].startswith("bad JSON log message")


def test_xz_reader_reads_in_pieces(tmp_path):
    data = os.urandom(300_000)
    r = fetchurl._Reader(io.BytesIO(lzma.compress(data)), "u", xz=True)
    got = b""
    while chunk := r.read(7777):
        got += chunk
    assert got == data


@pytest.mark.parametrize("members", [
    [("../escape", tf.REGTYPE, "")],
    [("/abs", tf.REGTYPE, "")],
    [("top", tf.DIRTYPE, ""), ("top/l", tf.SYMTYPE, "VICTIM"), ("top/l/f", tf.REGTYPE, "")],
    [("top", tf.SYMTYPE, "VICTIM"), ("top", tf.DIRTYPE, "")],
    [("top", tf.DIRTYPE, ""), ("top/h", tf.LNKTYPE, "../outside")],
    [("top", tf.DIRTYPE, ""), ("top/dev", tf.CHRTYPE, "")],
], ids=["dotdot", "absolute", "through-symlink", "dir-over-symlink", "hardlink-out", "device"])
def test_unpack_channel_writes_only_inside_out(tmp_path, members):
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "outside").write_text("o")
    src = tmp_path / "c.tar"
    with tf.open(src, "w") as tar:
        for name, kind, link in members:
            ti = tf.TarInfo(name)
            ti.type, ti.linkname = kind, link.replace("VICTIM", str(victim))
            tar.addfile(ti, io.BytesIO(b"") if kind == tf.REGTYPE else None)
    with pytest.raises((BuiltinError, OSError)):
        unpackchannel.unpack_channel(str(tmp_path / "out"), str(src), "chan")
    assert os.listdir(victim) == [] and sorted(os.listdir(tmp_path)) == [
        "c.tar", "out", "outside", "victim"]
