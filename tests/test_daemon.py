"""The daemon: captured conversations replayed, real Nix 2.8 clients, trust, robustness.

Three ways in:

* in-process: a :class:`Session` on one end of a socketpair (fast; replays);
* our daemon as a subprocess on a temp chroot store, with the real clients
  (``NIX_REMOTE=unix://SOCKET?root=ROOT``: the client reads store files itself,
  so it must be told where the chroot is);
* the real ``nix-daemon`` on an identical temp store, as the oracle.
"""

from __future__ import annotations

import io
import json
import os
import random
import socket
import stat
import subprocess
import sys
import time

import pytest
from conftest import needs_nix, nix_env
from daemon_util import (
    CAPTURES,
    SD,
    Client,
    decode,
    load_capture,
    normalise,
    our_daemon_cmd,
    read_log,
    run_session,
    start_daemon,
    stop_process,
    strip_ansi,
    wait_for_socket,
)

from storekeeper.daemon import DaemonConfig, PeerInfo, default_socket_path, parse_nix_conf
from storekeeper.daemon.cli import NIX_VERSION_LINE, main_daemon, main_nix_daemon
from storekeeper.daemon.trust import matches
from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import dump_string
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import (
    PROTOCOL_VERSION,
    Stderr,
    WireReader,
    WireWriter,
    frame,
    read_stderr_message,
    write_path_info,
)
from storekeeper.store.local import LocalStore

HELLO = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
Y = "/nix/store/vqnhyqnj75pmfbf32brdpznycy6h2d2l-y"
YDRV = "/nix/store/jv2qq65hw7jym4q0rrdf605w40xhizgj-y.drv"
NIX_CMD = ["--extra-experimental-features", "nix-command"]


# --- store preparation (to match the stores the captures were taken on) ------------

def add_hello(store: LocalStore) -> None:
    nar = dump_string(b"hello\n")
    store.add_nar(ValidPathInfo(SD.parse(HELLO), Hash.of("sha256", nar), len(nar),
                                registration_time=1795317863,
                                ca="fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"),
                  io.BytesIO(nar))


def add_y(store: LocalStore) -> None:
    nar = dump_string(HELLO.encode() + b"\n")
    store.add_nar(ValidPathInfo(SD.parse(Y), Hash.of("sha256", nar), len(nar),
                                frozenset({SD.parse(HELLO)}), SD.parse(YDRV), 1795317941, True),
                  io.BytesIO(nar))


def add_fake_y_drv(store: LocalStore) -> None:
    """y.drv with y as its output, registered straight in the DB: its real text
    is not in the captures, and only its DerivationOutputs row matters here."""
    text = f'Derive([("out","{Y}","","")],[],[],"x86_64-linux","/bin/sh",[],[("out","{Y}")])'.encode()
    real = store.real_path(SD.parse(YDRV))
    with open(real, "wb") as f:
        f.write(text)
    os.chmod(real, 0o444)
    nar = dump_string(text)
    with store.db.transaction():
        drv_id = store.db.upsert_info(ValidPathInfo(SD.parse(YDRV), Hash.of("sha256", nar), len(nar)))
        store.db.add_derivation_output(drv_id, "out", Y)


PREPARE = {"hello": add_hello, "y": add_y, "ydrv": add_fake_y_drv}


@pytest.fixture
def mem_store(tmp_path):
    s = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    yield s
    s.close()


# --- replaying the captures ----------------------------------------------------------------

# capture -> (store contents, trusted, byte-exact?)
REPLAYS = {
    "q_references": (["hello", "y"], True, True),
    "q_references_invalid_path": ([], True, True),
    "add_file": ([], True, False),            # registrationTime is "now"
    "add_directory": ([], True, False),
    "add_fixed_flat": ([], True, True),
    "import_trusted": ([], True, True),
    "verify": ([], True, True),
    "nix_copy_to_daemon": ([], True, True),
    "untrusted_setoptions": (["hello"], False, True),
    "untrusted_import_error": ([], False, False),  # the real daemon colours the path
    "nix_store_sign": (["hello", "y"], True, False),  # activity ids carry the pid
    "probe_misc_ops": (["hello", "y", "ydrv"], True, False),
}

# (capture, index of the exchange) -> what we knowingly answer differently
KNOWN_DIFFERENCES = {
    ("probe_misc_ops", 26): "unknown op: one STDERR_ERROR (the real daemon sends two)",
}


@pytest.mark.parametrize("name", sorted(REPLAYS))
def test_replay_capture(name, mem_store):
    prep, trusted, exact = REPLAYS[name]
    for what in prep:
        PREPARE[what](mem_store)
    c2s, real_s2c = load_capture(name)
    ours_s2c = run_session(mem_store, c2s, trusted=trusted)
    real, ours = decode(c2s, real_s2c), decode(c2s, ours_s2c)
    assert ours.server_bytes_left == 0 and ours.version == "2.8.0"
    want, got = normalise(real), normalise(ours)
    assert len(got) == len(want)
    for i, (w, g) in enumerate(zip(want, got)):
        if (name, i) in KNOWN_DIFFERENCES:
            assert w[0] == g[0]
            continue
        assert g == w, f"{name}: exchange {i} (op {w[0]}) differs"
    if exact:
        # Byte for byte, but for the version we announce (the client's 1.34 is spoken).
        assert ours_s2c[8:16] == WireWriter().u64(PROTOCOL_VERSION).take()
        assert ours_s2c[:8] + real_s2c[8:16] + ours_s2c[16:] == real_s2c
    if name == "untrusted_import_error":
        op, ok, msgs, _ = got[1]
        assert not ok and "g3.txt' because it lacks a" in msgs[-1][1]
        assert not mem_store.is_valid(SD.parse("/nix/store/426makpv1w1q1z4wgwvmlca5b86c289i-g3.txt"))
    if name == "probe_misc_ops":
        assert got[22][1] is True  # AddBuildLog, answered as the real daemon does
        assert got[26][2] == [("ERROR", "invalid operation 99", [])]
        assert ours.trailing_errors == 0
    if "ydrv" not in prep:
        assert mem_store.verify(check_contents=True).ok


def test_replayed_adds_register_the_same_paths(mem_store):
    for name, path in [("add_file", HELLO),
                       ("add_directory", "/nix/store/z04j7xys7hzs2z033m17n5g53zpk20n0-dir1"),
                       ("add_fixed_flat", "/nix/store/c2g5v8hhyrnaww5gnkjkz5nmhw26bbrk-flat.txt"),
                       ("nix_copy_to_daemon", "/nix/store/cnv8hi44wgdjvqcdg0aprfy227ch4fpj-z")]:
        run_session(mem_store, load_capture(name)[0])
        assert mem_store.is_valid(SD.parse(path)), name
    z = mem_store.path_info(SD.parse("/nix/store/cnv8hi44wgdjvqcdg0aprfy227ch4fpj-z"))
    assert z.deriver == SD.parse("/nix/store/nfk4bq34bhkd1rbbdvqx806xbp0rf9sg-z.drv")
    assert not z.ultimate
    assert mem_store.verify(check_contents=True).ok


# --- sessions driven by hand ------------------------------------------------------------------

def handshake_bytes() -> bytes:
    return WireWriter().u64(0x6E697863).u64(0x122).u64(0).u64(0).take()


def set_options_bytes(overrides: dict[str, str] | None = None) -> bytes:
    w = WireWriter().u64(19)
    for v in (0, 0, 0, 3, 1, 0, 1, 0, 0, 0, 1, 1):
        w.u64(v)
    return w.string_map(overrides or {}).take()


def converse(store, requests: bytes, trusted: bool = True, config=None):
    c2s = handshake_bytes() + set_options_bytes() + requests
    return decode(c2s, run_session(store, c2s, trusted, config))


def test_unsupported_ops_answer_and_keep_the_connection(mem_store):
    add_hello(mem_store)
    is_valid = WireWriter().u64(1).string(HELLO).take()
    # (a path that is no .drv: refused by the op itself, whatever the store can build)
    basic_drv = (WireWriter().u64(36).string(Y).u64(1).string("out").string(Y).string("").string("")
                 .strings([]).string("x86_64-linux").string("/bin/sh").strings(["-c", "x"])
                 .string_map({"out": Y}).u64(0).take())
    requests = (WireWriter().u64(34).take() + is_valid + basic_drv + is_valid
                # AddBuildLog of a name that is no store path: an answer, the log read past
                + WireWriter().u64(45).string("x.drv").raw(frame(b"log line\n" * 1000, 100)).take()
                + WireWriter().u64(20).u64(1).strings([]).boolean(False).u64(2**64 - 1).u64(0).u64(0).u64(0)
                .take()
                + WireWriter().u64(12).string("/tmp/result").take() + WireWriter().u64(14).take()
                + WireWriter().u64(9).strings([Y]).u64(0).take() + is_valid)
    conv = converse(mem_store, requests)
    ops = [(e.op, e.ok) for e in conv.exchanges[1:]]
    assert ops == [(34, True), (1, True), (36, False), (1, True), (45, False),
                   (20, True), (12, True), (14, True), (9, False), (1, True)]
    # print-dead: HELLO is pinned by this very connection, so nothing is dead
    assert conv.exchanges[6].response == ([], 0, 0)
    # OptimiseStore is implemented (store.optimise): Nix's summary line
    assert conv.exchanges[1].messages[-1].payload == "0.00 MiB freed by hard-linking 0 files\n"


def test_invalid_paths_are_answers_not_errors(mem_store):
    missing = "/nix/store/00000000000000000000000000000000-nope"
    requests = (WireWriter().u64(26).string(missing).take() + WireWriter().u64(6).string(missing).take()
                + WireWriter().u64(1).string(missing).take()
                + WireWriter().u64(40).strings([missing, YDRV + "!out"]).take()
                + WireWriter().u64(10).string(missing).take()
                + WireWriter().u64(1).string(missing).take())
    ex = converse(mem_store, requests).exchanges[1:]
    assert [e.response for e in ex[:3]] == [{"valid": False}, [], 0]
    assert ex[3].response["unknown"] == sorted([missing, YDRV])
    assert not ex[4].ok and "does not exist and cannot be created" in ex[4].messages[-1].payload.message
    assert ex[5].ok


def test_query_missing_will_build_when_outputs_are_invalid(mem_store):
    add_fake_y_drv(mem_store)  # y.drv valid, its output y not
    ex = converse(mem_store, WireWriter().u64(40).strings([YDRV + "!out", YDRV + "!*"]).take()).exchanges
    assert ex[1].response["willBuild"] == [YDRV] and ex[1].response["unknown"] == []
    assert [m.kind for m in ex[1].messages] == [Stderr.START_ACTIVITY, Stderr.STOP_ACTIVITY]
    add_hello(mem_store)
    add_y(mem_store)
    ex = converse(mem_store, WireWriter().u64(40).strings([YDRV + "!out"]).take()
                  + WireWriter().u64(9).strings([YDRV + "!out", Y]).u64(0).take()
                  + WireWriter().u64(46).strings([Y]).u64(0).take()).exchanges
    assert ex[1].response["willBuild"] == []
    assert ex[2].ok and ex[2].response == 1  # nothing to build: BuildPaths succeeds
    assert ex[3].response == [(Y, 2, "", 0, False, 0, 0, {})]


def test_malformed_request_closes_only_that_connection(mem_store):
    add_hello(mem_store)
    prefix = handshake_bytes() + set_options_bytes()
    prefix_reply = len(run_session(mem_store, prefix))
    is_valid = WireWriter().u64(1).string(HELLO).take()
    bad_bool = WireWriter().u64(7).string("x").string("fixed:r:sha256").strings([]).u64(2).take()
    bad_padding = WireWriter().u64(1).take() + (3).to_bytes(8, "little") + b"abc\0\0\0\0\1"
    outside = WireWriter().u64(1).string("/etc/passwd").take()
    for bad, why in [(bad_bool, "expected a boolean"), (bad_padding, "non-zero padding"),
                     (outside, "not in the Nix store")]:
        s2c = run_session(mem_store, prefix + bad + is_valid)
        r = WireReader(io.BytesIO(s2c[prefix_reply:]))
        m = read_stderr_message(r)
        assert m.kind is Stderr.ERROR and why in m.payload.message
        assert r.offset == len(s2c) - prefix_reply  # then closed: the IsValidPath got no answer
    conv = converse(mem_store, is_valid)  # a new connection is fine
    assert conv.exchanges[1].response == 1


def test_add_errors_drain_the_frames_and_keep_the_connection(mem_store):
    nar = dump_string(b"some content")
    wrong = ValidPathInfo(SD.parse("/nix/store/00000000000000000000000000000000-w"),
                          Hash.of("sha256", b"not the nar"), len(nar))
    bad_nar = (WireWriter().u64(39).raw(write_path_info(WireWriter(), SD, wrong, True).take())
               .boolean(False).boolean(True).raw(frame(nar, 7)).take())
    bad_method = WireWriter().u64(7).string("x").string("fixed:r:blake3").strings([]).boolean(False) \
        .raw(frame(nar, 5)).take()
    garbage_nar = WireWriter().u64(7).string("x").string("fixed:r:sha256").strings([]).boolean(False) \
        .raw(frame(b"not a NAR at all" * 5, 3)).take()
    truncated_multi = WireWriter().u64(44).boolean(False).boolean(True).raw(frame(
        WireWriter().u64(2).take() + write_path_info(WireWriter(), SD, wrong, True).take() + nar[:40])).take()
    ok_text = WireWriter().u64(8).string("t.txt").string("text").strings([]).take()
    conv = converse(mem_store, bad_nar + bad_method + garbage_nar + truncated_multi + ok_text)
    ex = conv.exchanges[1:]
    assert [e.ok for e in ex] == [False, False, False, False, True]
    assert "hash mismatch" in ex[0].messages[-1].payload.message
    assert "blake3" in ex[1].messages[-1].payload.message
    assert "NAR" in ex[2].messages[-1].payload.message
    assert ex[4].response.endswith("-t.txt")
    assert mem_store.query_all_valid_paths() == {SD.parse(ex[4].response)}
    assert not [n for n in os.listdir(mem_store.real_store_dir) if n.startswith("tmp-")]


def test_untrusted_restrictions(mem_store):
    add_hello(mem_store)
    nar = dump_string(b"unsigned")
    info = ValidPathInfo(SD.parse("/nix/store/11111111111111111111111111111111-u"),
                         Hash.of("sha256", nar), len(nar), ultimate=True)
    import_req = (WireWriter().u64(39).raw(write_path_info(WireWriter(), SD, info, True).take())
                  .boolean(False).boolean(True).raw(frame(nar)).take())
    requests = (import_req
                + WireWriter().u64(37).string(HELLO).strings(["k-1:c2ln"]).take()
                + WireWriter().u64(35).boolean(False).boolean(True).take()
                + WireWriter().u64(7).string("r").string("fixed:r:sha256").strings([]).boolean(True)
                .raw(frame(nar)).take()
                + WireWriter().u64(9).strings([HELLO]).u64(1).take()
                + WireWriter().u64(8).string("ok.txt").string("fine").strings([HELLO]).take())
    for trusted in (False, True):
        conv = converse(mem_store, requests, trusted=trusted)
        ex = conv.exchanges[1:]
        if not trusted:
            assert [e.ok for e in ex] == [False, False, False, False, False, True]
            msgs = [e.messages[-1].payload.message for e in ex[:5]]
            assert "lacks a valid signature" in msgs[0]
            assert msgs[1] == "you are not privileged to add signatures"
            assert msgs[2] == msgs[3] == "you are not privileged to repair paths"
            assert "repairing is not allowed" in msgs[4]
            assert not mem_store.is_valid(info.path)
        else:
            assert [e.ok for e in ex][:4] == [True, True, True, True]
            assert mem_store.path_info(info.path).ultimate
            assert mem_store.path_info(SD.parse(HELLO)).sigs == {"k-1:c2ln"}
    relaxed = DaemonConfig(require_sigs=False)
    mem_store2_path = SD.parse("/nix/store/22222222222222222222222222222222-u")
    info2 = info.with_(path=mem_store2_path)
    req2 = (WireWriter().u64(39).raw(write_path_info(WireWriter(), SD, info2, True).take())
            .boolean(False).boolean(False).raw(frame(nar)).take())
    conv = converse(mem_store, req2, trusted=False, config=relaxed)
    assert conv.exchanges[1].ok and not mem_store.path_info(mem_store2_path).ultimate


def test_untrusted_set_options_filters_overrides(mem_store):
    cfg = DaemonConfig(trusted_substituters=("https://ok.example",))
    c2s = handshake_bytes() + set_options_bytes(
        {"substituters": "https://ok.example http://bad.example", "sandbox": "false", "timeout": "7"})
    conv = decode(c2s, run_session(mem_store, c2s, trusted=False, config=cfg))
    texts = [m.payload for m in conv.exchanges[0].messages]
    assert texts == ["\x1b[35;1mwarning:\x1b[0m ignoring untrusted substituter 'http://bad.example'\n"]


def test_old_clients_are_refused_with_an_error_they_can_read(mem_store):
    c2s = WireWriter().u64(0x6E697863).u64(0x115).u64(0).u64(0).take()
    s2c = run_session(mem_store, c2s)
    r = WireReader(io.BytesIO(s2c))
    assert (r.u64(), r.u64(), r.u64()) == (0x6478696F, PROTOCOL_VERSION, Stderr.ERROR)
    assert "1.21 is not supported" in r.string() and r.u64() == 1  # the pre-1.26 error form
    assert run_session(mem_store, b"GET / HTTP/1.0\r\n\r\n") == b""  # not a Nix client: no bytes


def test_nar_from_path_and_export(mem_store):
    add_hello(mem_store)
    conv = converse(mem_store, WireWriter().u64(38).string(HELLO).take()
                    + WireWriter().u64(16).string(HELLO).u64(0).take())
    assert conv.exchanges[1].response == 120
    data = b"".join(m.payload for m in conv.exchanges[2].messages)
    assert data.startswith(dump_string(b"hello\n")) and data.endswith(bytes(8))
    assert conv.exchanges[2].response == 1


# --- trust and configuration ---------------------------------------------------------------------

def test_user_patterns():
    peer = PeerInfo(1, 1000, 1000, "alice", "staff")
    assert matches(["*"], peer) and matches(["bob", "alice"], peer) and matches(["@staff"], peer)
    assert not matches(["bob", "@wheel", "@"], peer)
    root = PeerInfo.from_ids(1, 0, 0)
    assert root.user == "root" and matches(["@root"], root)
    assert PeerInfo.from_ids(1, 54321, 54321).user == "54321"
    cfg = DaemonConfig(trusted_users=("root",), allowed_users=("@staff",), build_users_group="nixbld")
    assert cfg.refusal(peer) is None and not cfg.is_trusted(peer)
    assert "allowed-users" in cfg.refusal(PeerInfo(1, 1001, 1001, "eve", "users"))
    assert "build users group" in cfg.refusal(PeerInfo(1, 30001, 30000, "nixbld1", "nixbld"))
    assert cfg.refusal(root) is None and cfg.is_trusted(root)


def test_nix_conf_parsing(tmp_path):
    (tmp_path / "more.conf").write_text("extra-trusted-users = carol\n")
    text = ("# comment\ntrusted-users = root alice # trailing comment\n"
            "allowed-users = @users\nextra-trusted-users = bob\ninclude more.conf\n"
            "!include missing.conf\nrequire-sigs = false\nsandbox = false\n")
    cfg = DaemonConfig().with_settings(parse_nix_conf(text, base_dir=str(tmp_path)))
    assert cfg.trusted_users == ("root", "alice", "bob", "carol")
    assert cfg.allowed_users == ("@users",) and cfg.require_sigs is False
    assert DaemonConfig().with_settings([("extra-trusted-users", "x")]).trusted_users == ("root", "x")
    (tmp_path / "nix.conf").write_text(text)
    assert DaemonConfig.from_nix_conf(str(tmp_path / "nix.conf")).trusted_users[-1] == "carol"
    assert DaemonConfig.from_nix_conf(str(tmp_path / "absent.conf")) == DaemonConfig()
    with pytest.raises(Exception, match="expected 'name = value'"):
        parse_nix_conf("just words\n")
    with pytest.raises(Exception, match="does not exist"):
        parse_nix_conf("include nowhere.conf\n", base_dir=str(tmp_path))


def test_nix_daemon_version(capsys):
    assert main_nix_daemon(["--version"], env={}) == 0
    assert capsys.readouterr().out.strip() == NIX_VERSION_LINE == "nix-daemon (Nix) 2.8.0"


def test_daemon_command_line_errors(tmp_path, capsys):
    assert main_daemon(["--store", "unix:///some/socket"]) == 1
    assert "serves a local store" in capsys.readouterr().err
    assert main_daemon(["--store", str(tmp_path / "r"), "--config", str(tmp_path / "nope.conf")]) == 1
    assert "does not exist" in capsys.readouterr().err
    layout = LocalLayout.chroot(str(tmp_path / "r"))
    assert default_socket_path(layout) == str(tmp_path / "r/nix/var/nix/daemon-socket/socket")


# --- daemon processes -------------------------------------------------------------------------------

class Daemon:
    def __init__(self, proc: subprocess.Popen, socket_path: str, root: str, log: str) -> None:
        self.proc, self.socket, self.root, self.log = proc, socket_path, root, log

    @property
    def remote(self) -> str:
        return f"unix://{self.socket}?root={self.root}"

    def store(self) -> LocalStore:
        return LocalStore(LocalLayout.chroot(self.root))


@pytest.fixture
def daemons(tmp_path):
    """Start daemons (ours or the real one) on temp chroot stores; all are stopped at the end."""
    procs: list[subprocess.Popen] = []
    counter = iter(range(100))

    def start(kind: str = "ours", *args: str, root: str | None = None, env=None) -> Daemon:
        n = next(counter)
        root = root or str(tmp_path / f"{kind}-root{n}")
        sock = str(tmp_path / f"{kind}{n}.sock")
        log = str(tmp_path / f"{kind}{n}.log")
        cwd = tmp_path / "cwd"
        cwd.mkdir(exist_ok=True)
        with open(log, "wb") as logf:
            proc = start_daemon(kind, root, sock, env or nix_env(str(tmp_path)),
                                *(("-v",) if kind == "ours" else ()), *args, log=logf, cwd=str(cwd))
        procs.append(proc)
        return Daemon(proc, sock, root, log)

    yield start
    for proc in procs:
        stop_process(proc)


def client_env(tmp_path, daemon: Daemon) -> dict[str, str]:
    env = nix_env(str(tmp_path))
    env["NIX_REMOTE"] = daemon.remote
    return env


def nix(args: list[str], env, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, input=input, capture_output=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc


def make_sources(base) -> dict[str, str]:
    base.mkdir(exist_ok=True)
    (base / "hello.txt").write_text("hello\n")
    (base / "flat.bin").write_bytes(bytes(range(256)) * 3)
    d = base / "tree"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(d / "sub" / "run.sh", 0o755)
    (d / "data").write_bytes(b"\0" * 1000 + b"end")
    if not os.path.lexists(d / "link"):
        os.symlink("sub/run.sh", d / "link")
    return {k: str(base / k) for k in ("hello.txt", "flat.bin", "tree")}


def client_session(env, src: dict[str, str]) -> list[str]:
    """The same client commands, run against whatever store ``env`` points at."""
    out = []
    run = lambda args, **kw: nix(args, env, **kw).stdout.decode()  # noqa: E731
    hello = run(["nix-store", "--add", src["hello.txt"]]).strip()
    tree = run(["nix-store", "--add", src["tree"]]).strip()
    out += [hello, tree]
    out.append(run(["nix-store", "--add-fixed", "sha256", src["flat.bin"]]))
    out.append(run(["nix-store", "--add-fixed", "sha1", src["flat.bin"]]))
    out.append(run(["nix-store", "--add-fixed", "--recursive", "sha256", src["tree"]]))
    out.append(run(["nix-store", "--add-fixed", "--recursive", "sha512", src["tree"]]))
    # Text paths with references, as builtins.toFile writes them (AddToStore text:sha256).
    ref = run(["nix-instantiate", "--read-write-mode", "--eval", "-E",
               f'builtins.toFile "r.txt" "see ${{builtins.toFile "h.txt" "hi"}} and {hello}"']).strip()
    ref = json.loads(ref)
    out.append(ref)
    for q in ("--references", "--referrers", "--requisites", "--hash", "--size", "--deriver"):
        for p in (hello, ref, tree):
            out.append(f"{q} {p}: " + run(["nix-store", "-q", q, p]))
    out.append(run(["nix-store", "--verify-path", hello, tree, ref]))
    out.append(run(["nix-store", "--check-validity", "--print-invalid", hello,
                    "/nix/store/00000000000000000000000000000000-nope"]))
    info = json.loads(run(["nix", *NIX_CMD, "path-info", "--json", "-r", ref, tree]))
    for entry in info:
        entry.pop("registrationTime", None)
    out.append(json.dumps(info, sort_keys=True))
    return out


@needs_nix
@pytest.mark.nix
def test_real_clients_same_answers_as_the_real_daemon(daemons, tmp_path):
    src = make_sources(tmp_path / "src")
    ours, real = daemons("ours"), daemons("nix")
    got = client_session(client_env(tmp_path, ours), src)
    want = client_session(client_env(tmp_path, real), src)
    assert got == want
    assert got[0] == HELLO
    with ours.store() as store:
        assert store.verify(check_contents=True).ok
        assert len(store.query_all_valid_paths()) == 7


@needs_nix
@pytest.mark.nix
def test_derivations_instantiate_and_dry_run_like_the_real_daemon(daemons, tmp_path):
    expr = ('derivation { name = "x"; builder = "/bin/sh"; args = ["-c" "echo hi > $out"]; '
            'system = builtins.currentSystem; outputs = ["out" "dev"]; }')
    results = []
    for kind in ("ours", "nix"):
        d = daemons(kind)
        env = client_env(tmp_path, d)
        drv = nix(["nix-instantiate", "-E", expr], env).stdout.decode().strip()
        dry = nix(["nix-store", "-r", "--dry-run", drv], env).stderr.decode()
        outputs = nix(["nix-store", "-q", "--outputs", drv], env).stdout.decode()
        c = Client.connect(d.socket).handshake()
        out_map = c.op(WireWriter().u64(41).string(drv), 41)[1]
        missing = c.op(WireWriter().u64(40).strings([drv + "!dev", drv + "!*"]), 40)[1]
        c.close()
        results.append((drv, dry, outputs, out_map, missing))
    assert results[0] == results[1]
    assert "will be built" in results[0][1]


@needs_nix
@pytest.mark.nix
def test_export_import_and_copy_between_daemons(daemons, tmp_path):
    src = make_sources(tmp_path / "src")
    a, b, real = daemons("ours"), daemons("ours"), daemons("nix")
    env_a, env_b = client_env(tmp_path, a), client_env(tmp_path, b)
    hello = nix(["nix-store", "--add", src["hello.txt"]], env_a).stdout.decode().strip()
    ref = json.loads(nix(["nix-instantiate", "--read-write-mode", "--eval", "-E",
                          f'builtins.toFile "r.txt" "${{builtins.storePath "{hello}"}}"'], env_a).stdout)
    exported = nix(["nix-store", "--export", ref, hello], env_a).stdout
    for target in (b, real):  # into our daemon and into the real one
        env = client_env(tmp_path, target)
        imported = nix(["nix-store", "--import"], env, input=exported).stdout.decode().split()
        assert sorted(imported) == sorted([ref, hello])
        assert nix(["nix-store", "-q", "--references", ref], env).stdout.decode().split() == [hello]
        nix(["nix-store", "--verify-path", ref, hello], env)
    # nix copy: QueryValidPaths + AddMultipleToStore, from a local chroot store into ours.
    local_root = str(tmp_path / "local-root")
    tree = nix(["nix-store", "--store", local_root, "--add", src["tree"]], nix_env(str(tmp_path))
               ).stdout.decode().strip()
    nix(["nix", *NIX_CMD, "copy", "--from", local_root, "--to", b.remote, tree], env_b)
    nix(["nix-store", "--verify-path", tree], env_b)
    got = json.loads(nix(["nix", *NIX_CMD, "path-info", "--json", tree], env_b).stdout)
    want = json.loads(nix(["nix", *NIX_CMD, "path-info", "--json", "--store", local_root, tree],
                          nix_env(str(tmp_path))).stdout)
    for x in got + want:
        x.pop("registrationTime", None)
    assert got == want
    with b.store() as store:
        assert store.verify(check_contents=True).ok


@needs_nix
@pytest.mark.nix
def test_real_client_untrusted_and_refused(daemons, tmp_path):
    src = make_sources(tmp_path / "src")
    untrusted = daemons("ours", "--trusted-users", "nobody")
    env = client_env(tmp_path, untrusted)
    hello = nix(["nix-store", "--add", src["hello.txt"]], env).stdout.decode().strip()
    nix(["nix-store", "--add-fixed", "sha256", src["flat.bin"]], env)  # CA: no signature needed
    exported = nix(["nix-store", "--export", hello], env).stdout
    other = daemons("ours", "--trusted-users", "nobody")
    bad = nix(["nix-store", "--import"], client_env(tmp_path, other), input=exported, check=False)
    assert bad.returncode != 0 and b"lacks a valid signature" in bad.stderr
    repair = nix(["nix-store", "--verify", "--repair"], env, check=False)
    assert repair.returncode != 0 and b"you are not privileged to repair paths" in repair.stderr
    warn = nix(["nix-store", "--option", "substituters", "http://example.invalid", "-q", "--hash", hello],
               env)
    assert b"warning: ignoring untrusted substituter 'http://example.invalid'" in warn.stderr
    refused = daemons("ours", "--trusted-users", "nobody", "--allowed-users", "nobody")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(refused.socket)
    try:
        s.sendall(handshake_bytes())
    except OSError:
        pass
    try:
        assert s.recv(100) == b""  # closed before a single byte was written
    except ConnectionResetError:
        pass
    s.close()
    fail = nix(["nix-store", "-q", "--hash", hello], client_env(tmp_path, refused), check=False)
    assert fail.returncode != 0 and b"cannot open connection" in fail.stderr


# --- process behaviour ---------------------------------------------------------------------------------

def test_temp_roots_live_as_long_as_the_connection(daemons, tmp_path):
    d = daemons("ours")
    with d.store() as store:
        add_hello(store)
    c = Client.connect(d.socket).handshake()
    c.op(WireWriter().u64(11).string(HELLO), 11)
    temproots = os.path.join(d.root, "nix/var/nix/temproots")
    files = os.listdir(temproots)
    assert len(files) == 1
    with open(os.path.join(temproots, files[0]), "rb") as f:
        assert f.read() == HELLO.encode() + b"\0"
    c.close()
    deadline = time.monotonic() + 10
    while os.listdir(temproots) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.listdir(temproots) == []


def test_client_vanishing_mid_nar_registers_nothing(daemons, tmp_path):
    d = daemons("ours")
    nar = dump_string(b"x" * 100_000)
    info = ValidPathInfo(SD.parse("/nix/store/33333333333333333333333333333333-half"),
                         Hash.of("sha256", nar), len(nar))
    c = Client.connect(d.socket).handshake()
    c.send(WireWriter().u64(39).raw(write_path_info(WireWriter(), SD, info, True).take())
           .boolean(False).boolean(True).raw(frame(nar)[:50_000]))
    time.sleep(0.2)
    c.close()
    store_dir = os.path.join(d.root, "nix/store")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
            os.listdir(os.path.join(d.root, "nix/var/nix/temproots"))
            or [n for n in os.listdir(store_dir) if n.startswith("tmp-")]):
        time.sleep(0.02)
    assert [n for n in os.listdir(store_dir) if n != ".links"] == []
    with d.store() as store:
        assert not store.is_valid(info.path)
    assert Client.connect(d.socket).handshake().op(WireWriter().u64(1).string(HELLO), 1)[1] == 0


def _temp_root_files(d, c: Client) -> list[str]:
    """Pin HELLO on connection ``c``; the temp-root files then (``temproots/<pid>``)."""
    c.op(WireWriter().u64(11).string(HELLO), 11)
    return sorted(os.listdir(os.path.join(d.root, "nix/var/nix/temproots")))


def _wait_no_temp_roots(d) -> None:
    temproots = os.path.join(d.root, "nix/var/nix/temproots")
    deadline = time.monotonic() + 10
    while os.listdir(temproots) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.listdir(temproots) == []


def test_a_connection_process_serves_its_users_next_connection_afresh(daemons, tmp_path):
    d = daemons("ours")
    with d.store() as store:
        add_hello(store)
    c = Client.connect(d.socket).handshake()
    first = _temp_root_files(d, c)
    c.close()
    _wait_no_temp_roots(d)  # the connection's store was closed: its roots are gone
    assert len(first) == 1
    seen = set(first)
    # The process tells the daemon it is free just after dropping its roots; on a
    # loaded machine that can come after our next connect, which then gets a fresh
    # fork.  So: a few tries, each waiting longer, until a process is met again.
    for attempt in range(8):
        time.sleep(0.2 * (attempt + 1))
        c = Client.connect(d.socket).handshake()
        again = _temp_root_files(d, c)
        if again[0] in seen:
            break
        seen.update(again)
        c.close()
        _wait_no_temp_roots(d)
    else:
        pytest.fail(f"no connection process served a second connection ({len(seen)} forks)")
    # a process served an earlier connection, with a new temp-roots file of its own
    with open(os.path.join(d.root, "nix/var/nix/temproots", again[0]), "rb") as f:
        assert f.read() == HELLO.encode() + b"\0"
    c.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_a_connection_process_never_serves_another_user(shared_dir, tmp_path):
    root, sock = os.path.join(shared_dir, "root"), os.path.join(shared_dir, "d.sock")
    with LocalStore(LocalLayout.chroot(root)) as store:
        add_hello(store)
    proc = start_daemon("ours", root, sock, nix_env(str(tmp_path)))
    d = Daemon(proc, sock, root, "")
    try:
        c = Client.connect(sock).handshake()
        root_process = _temp_root_files(d, c)
        c.close()
        _wait_no_temp_roots(d)
        time.sleep(0.2)
        tests = os.path.dirname(os.path.abspath(__file__))
        script = (f"import sys; sys.path.insert(0, {tests!r}); from daemon_util import Client; "
                  "from storekeeper.formats.wire import WireWriter; "
                  f"c = Client.connect({sock!r}).handshake(); "
                  f"c.op(WireWriter().u64(11).string({HELLO!r}), 11); "
                  "print('pinned', flush=True); sys.stdin.read()")
        nobody = subprocess.Popen([sys.executable, "-c", script], user=65534, group=65534,
                                  extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        try:
            assert nobody.stdout.readline() == b"pinned\n"
            files = sorted(os.listdir(os.path.join(root, "nix/var/nix/temproots")))
            assert len(files) == 1 and files != root_process  # a fresh process for uid 65534
        finally:
            nobody.communicate(b"", timeout=30)
    finally:
        stop_process(proc)


def test_sigterm_stops_accepting_and_ends_idle_children(daemons, tmp_path):
    d = daemons("ours")
    idle = Client.connect(d.socket).handshake()
    busy_until_closed = Client.connect(d.socket).handshake()
    d.proc.terminate()
    assert d.proc.wait(10) == 0
    assert not os.path.exists(d.socket)
    assert idle.sock.recv(1) == b""  # the child left at once
    busy_until_closed.close()
    idle.close()
    assert os.listdir(os.path.join(d.root, "nix/var/nix/temproots")) == []


def test_the_database_stays_open_while_the_daemon_runs(daemons, tmp_path):
    d = daemons("ours")
    children = f"/proc/{d.proc.pid}/task/{d.proc.pid}/children"
    deadline = time.monotonic() + 10
    while True:  # (the connection that probed the socket may not have left yet)
        with open(children) as f:
            keeper = [int(p) for p in f.read().split()]
        if len(keeper) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(keeper) == 1  # the keeper; no connection
    db = os.path.join(d.root, "nix/var/nix/db")

    def keeper_has_db_open() -> bool:
        return any(os.path.realpath(f"/proc/{keeper[0]}/fd/{fd}") == os.path.join(db, "db.sqlite")
                   for fd in os.listdir(f"/proc/{keeper[0]}/fd"))
    while not keeper_has_db_open() and time.monotonic() < deadline:
        time.sleep(0.02)  # the keeper opens it just after it was forked
    assert keeper_has_db_open()
    for i in range(3):  # connections come and go; the WAL index stays
        c = Client.connect(d.socket).handshake()
        c.op(WireWriter().u64(8).string(f"k{i}").string("x").strings([]), 8)
        c.close()
    assert os.path.exists(os.path.join(db, "db.sqlite-wal"))
    d.proc.terminate()
    assert d.proc.wait(10) == 0
    assert not os.path.exists(f"/proc/{keeper[0]}")
    # The keeper closed the database last: SQLite checkpointed and removed the WAL.
    assert not os.path.exists(os.path.join(db, "db.sqlite-wal"))
    with d.store() as store:
        assert len(store.query_all_valid_paths()) == 3


def test_sigterm_lets_a_busy_connection_finish_its_operation(daemons):
    d = daemons("ours")
    nar = dump_string(b"y" * 50_000)
    info = ValidPathInfo(SD.parse("/nix/store/44444444444444444444444444444444-late"),
                         Hash.of("sha256", nar), len(nar))
    request = (WireWriter().u64(39).raw(write_path_info(WireWriter(), SD, info, True).take())
               .boolean(False).boolean(True).take() + frame(nar, 4096))
    c = Client.connect(d.socket).handshake()
    c.send(request[:20_000])
    time.sleep(0.3)  # the child is now inside AddToStoreNar
    d.proc.terminate()
    deadline = time.monotonic() + 5
    while os.path.exists(d.socket) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(d.socket)  # no longer accepting
    c.send(request[20_000:])
    assert read_log(c.r) == (True, [])  # the operation completed
    assert c.sock.recv(1) == b""  # and then the child left
    c.close()
    assert d.proc.wait(10) == 0
    with d.store() as store:
        assert store.is_valid(info.path) and store.verify(check_contents=True).ok


def test_socket_places(daemons, tmp_path):
    d = daemons("ours")
    # A live daemon's socket is not taken over, and a non-socket is never removed.
    again = subprocess.run(our_daemon_cmd("--store", str(tmp_path / "x"), "--socket", d.socket),
                           capture_output=True, timeout=30)
    assert again.returncode == 1 and b"already listening" in again.stderr
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    again = subprocess.run(our_daemon_cmd("--store", str(tmp_path / "x"), "--socket", str(victim)),
                           capture_output=True, timeout=30)
    assert again.returncode == 1 and victim.read_text() == "keep me"
    # A path longer than sockaddr_un allows is bound from inside its directory.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    long_sock = str(deep / "socket")
    proc = subprocess.Popen(our_daemon_cmd("--store", str(tmp_path / "y"), "--socket", long_sock),
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(long_sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stat.S_IMODE(os.stat(long_sock).st_mode) == 0o666
        cwd = os.getcwd()
        os.chdir(deep)
        try:
            c = Client.connect("socket").handshake()
        finally:
            os.chdir(cwd)
        assert c.op(WireWriter().u64(1).string(HELLO), 1)[1] == 0
        c.close()
    finally:
        stop_process(proc)
    assert not os.path.exists(long_sock)


def test_socket_activation(tmp_path):
    """systemd style: the listening socket is fd 3 (LISTEN_FDS=1, LISTEN_PID=our pid)."""
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)
    fd = listener.fileno()
    code = (f"import os, sys; os.dup2({fd}, 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
            "from storekeeper.daemon.cli import main_daemon; "
            f"sys.exit(main_daemon(['--store', {str(tmp_path / 'r')!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(fd,),
                            env={**os.environ, "LISTEN_FDS": "1"}, stderr=subprocess.DEVNULL)
    try:
        listener.close()
        c = Client.connect(path).handshake()
        assert c.version == "2.8.0"
        c.close()
    finally:
        stop_process(proc)
    assert os.path.exists(path)  # not ours to remove


def test_stdio_mode(tmp_path):
    root = str(tmp_path / "root")
    with LocalStore(LocalLayout.chroot(root)) as store:
        add_hello(store)
    proc = subprocess.Popen(our_daemon_cmd("--stdio", "--store", root), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(handshake_bytes() + set_options_bytes()
                                    + WireWriter().u64(1).string(HELLO).take()
                                    + WireWriter().u64(37).string(HELLO).strings(["k:dGVzdA=="]).take(),
                                    timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    conv = decode(handshake_bytes() + set_options_bytes() + WireWriter().u64(1).string(HELLO).take()
                  + WireWriter().u64(37).string(HELLO).strings(["k:dGVzdA=="]).take(), out)
    assert [e.response for e in conv.exchanges] == [None, 1, 1]  # trusted: may add signatures


@needs_nix
@pytest.mark.nix
def test_storekeeper_nix_daemon_with_a_custom_store_dir(tmp_path):
    env = nix_env(str(tmp_path))
    env.update({"NIX_STORE_DIR": str(tmp_path / "s" / "store"), "NIX_STATE_DIR": str(tmp_path / "s" / "var"),
                "NIX_LOG_DIR": str(tmp_path / "s" / "log"),
                "NIX_DAEMON_SOCKET_PATH": str(tmp_path / "nd.sock")})
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
        f.write("trusted-users = nobody\n")
    src = make_sources(tmp_path / "src")
    code = "import sys; from storekeeper.daemon.cli import main_nix_daemon; sys.exit(main_nix_daemon())"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(env["NIX_DAEMON_SOCKET_PATH"], proc)
        env["NIX_REMOTE"] = "daemon"
        p = nix(["nix-store", "--add", src["hello.txt"]], env).stdout.decode().strip()
        assert p.startswith(env["NIX_STORE_DIR"] + "/") and p.endswith("-hello.txt")
        assert os.path.isfile(p)
        # nix.conf made root untrusted: an unsigned import is refused.
        exported = nix(["nix-store", "--export", p], env).stdout
        nix(["nix-store", "--add", src["flat.bin"]], env)
        bad = nix(["nix-store", "--import"], env, input=exported, check=False)
        assert bad.returncode != 0 and b"lacks a valid signature" in bad.stderr
    finally:
        stop_process(proc)


# --- fuzzing ----------------------------------------------------------------------------------------

# handshake (32 bytes) + SetOptions with no overrides (112 bytes): mutating past
# this reaches the operations instead of dying at the magic number
_PREFIX = 144


def _mutations(rng: random.Random, seeds: list[bytes], n: int):
    interesting = [0, 1, 2, 7, 0xFFFFFFFF, 1 << 32, 1 << 63, 2**64 - 1]

    def pos(data: bytearray) -> int:
        low = _PREFIX if len(data) > _PREFIX and rng.random() < 0.8 else 0
        return rng.randrange(low, len(data))

    for i in range(n):
        data = bytearray(rng.choice(seeds))
        kind = i % 5
        if kind == 0:  # flip bytes
            for _ in range(rng.randint(1, 4)):
                data[pos(data)] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            del data[pos(data):]
        elif kind == 2:  # an interesting u64 at an aligned offset
            at = pos(data) // 8 * 8
            data[at:at + 8] = rng.choice(interesting).to_bytes(8, "little")
        elif kind == 3:  # duplicate or drop a slice
            a = pos(data)
            b = min(len(data), a + rng.randint(1, 64))
            data[a:a] = data[a:b] if rng.random() < 0.5 else b""
            if rng.random() < 0.5:
                del data[a:b]
        else:  # a valid handshake, then noise
            data = bytearray(handshake_bytes() + rng.randbytes(rng.randint(0, 300)))
        yield bytes(data)
    for _ in range(n // 5):
        yield rng.randbytes(rng.randint(0, 200))


def _tree(base: str, skip: tuple[str, ...]) -> set[str]:
    found = set()
    for d, dirs, files in os.walk(base):
        rel = os.path.relpath(d, base)
        if any(rel == s or rel.startswith(s + os.sep) for s in skip):
            dirs[:] = []
            continue
        found.update(os.path.join(rel, x) for x in dirs + files)
    return found


@needs_nix
@pytest.mark.nix
def test_fuzzed_streams_do_not_hurt_the_daemon(daemons, tmp_path):
    d = daemons("ours")
    with d.store() as store:
        add_hello(store)
        add_y(store)
    names = sorted(f[:-len(".c2s.hex")] for f in os.listdir(CAPTURES)
                   if f.endswith(".c2s.hex"))
    seeds = [load_capture(n)[0] for n in names]
    allowed = (os.path.join("ours-root0", "nix", "store"), os.path.join("ours-root0", "nix", "var", "nix"),
               os.path.join("ours-root0", "nix", "var", "log", "nix"))
    before = _tree(str(tmp_path), allowed)
    rng = random.Random(20260522)
    for i, data in enumerate(_mutations(rng, seeds, 150)):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(d.socket)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        except socket.timeout:
            pytest.fail(f"the daemon hung on fuzz input {i}")
        finally:
            s.close()
        assert d.proc.poll() is None, f"the daemon died on fuzz input {i}"
    assert _tree(str(tmp_path), allowed) == before
    with open(d.log, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "connection handler failed" not in log  # no child crashed
    # Every unexpected exception is a bug, except while the .drv parser
    # (formats/derivation.py) is not there yet.
    unexpected = log.count("failed unexpectedly")
    assert unexpected == log.count("No module named 'storekeeper.formats.derivation'")
    env = client_env(tmp_path, d)
    src = make_sources(tmp_path / "src")
    p = nix(["nix-store", "--add", src["tree"]], env).stdout.decode().strip()
    assert nix(["nix-store", "-q", "--references", Y], env).stdout.decode().split() == [HELLO]
    nix(["nix-store", "--verify-path", p, Y, HELLO], env)
    with d.store() as store:
        report = store.verify(check_contents=True)
        assert report.ok, report.errors


def gc_session(env, work) -> list[str]:
    """GC and roots commands of the real client, against whatever daemon ``env`` points at."""
    work.mkdir(exist_ok=True)
    run = lambda args, **kw: nix(args, env, **kw)  # noqa: E731
    out = []
    (work / "a.txt").write_text("a\n")
    (work / "junk.txt").write_text("junk\n")
    a = run(["nix-store", "--add", str(work / "a.txt")]).stdout.decode().strip()
    junk = run(["nix-store", "--add", str(work / "junk.txt")]).stdout.decode().strip()
    b = json.loads(run(["nix-instantiate", "--read-write-mode", "--eval", "-E",
                        f'builtins.toFile "b.txt" "uses ${{builtins.storePath {a}}}"']).stdout)
    c = json.loads(run(["nix-instantiate", "--read-write-mode", "--eval", "-E",
                        f'builtins.toFile "c.txt" "uses ${{builtins.storePath {b}}}"']).stdout)
    out.append(run(["nix-store", "-r", b, "--add-root", str(work / "result"), "--indirect"]).stdout.decode())
    assert os.readlink(work / "result") == b
    roots = run(["nix-store", "--gc", "--print-roots"]).stdout.decode().splitlines()
    out.append(sorted(r.replace(str(work), "WORK") for r in roots if "{" not in r))
    out.append(sorted(run(["nix-store", "--gc", "--print-dead"]).stdout.decode().split()))
    out.append(sorted(run(["nix-store", "--gc", "--print-live"]).stdout.decode().split()))
    out.append(run(["nix-store", "-q", "--references", c]).stdout.decode())
    r = run(["nix-store", "--delete", a], check=False)  # alive through b
    out.append((r.returncode, strip_ansi(r.stderr.decode()).strip().splitlines()[-1]))
    r = run(["nix-store", "--delete", junk])
    out.append(r.stdout.decode())
    out.append(run(["nix-store", "--gc"]).stdout.decode())
    out.append(sorted(run(["nix-store", "--check-validity", "--print-invalid", a, b, c, junk],
                          check=False).stdout.decode().split()))
    os.unlink(work / "result")
    out.append(run(["nix-store", "--gc"]).stdout.decode())
    return out


@needs_nix
@pytest.mark.nix
def test_gc_and_roots_through_the_real_client_like_the_real_daemon(daemons, tmp_path):
    ours, real = daemons("ours"), daemons("nix")
    got = gc_session(client_env(tmp_path, ours), tmp_path / "w")
    want = gc_session(client_env(tmp_path, real), tmp_path / "w")
    assert got == want
    with ours.store() as store:
        assert store.query_all_valid_paths() == set()
        assert not os.listdir(os.path.join(store.state_dir, "gcroots", "auto"))


def test_sd_notify_sends_one_datagram(tmp_path):
    import socket as _socket

    from storekeeper.daemon.sdnotify import sd_notify
    path = str(tmp_path / "notify")
    srv = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(5)
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": path})
    assert srv.recv(100) == b"READY=1"
    assert not sd_notify("READY=1", {})
    srv.close()


def test_daemon_tells_systemd_it_is_ready(tmp_path):
    import socket as _socket
    path = str(tmp_path / "notify")
    srv = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(30)
    env = dict(nix_env(str(tmp_path)), NOTIFY_SOCKET=path)
    proc = subprocess.Popen(our_daemon_cmd("--store", str(tmp_path / "root"), "--socket",
                                           str(tmp_path / "d.sock")), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        msg = srv.recv(200).decode()
        assert msg.startswith("READY=1\n") and f"MAINPID={proc.pid}" in msg
        assert os.path.exists(tmp_path / "d.sock")  # ready means listening
    finally:
        stop_process(proc)
        srv.close()
