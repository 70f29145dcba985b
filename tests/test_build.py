"""Builds: real nix-build / nix build against our daemon, with the real nix-daemon as the oracle.

Stores use the custom-dir layout (``local?store=…&state=…&log=…``), so store
paths are real on this machine and builders can run without a sandbox.  The
oracle comparison runs the same client session twice *at the same store
path*: first with the real ``nix-daemon``, then (after the first store is
moved aside) with ours, so that store paths, result symlinks and the names
of indirect roots must come out identical.
"""

from __future__ import annotations

import grp
import io
import json
import os
import pwd
import re
import secrets
import shutil
import sqlite3
import subprocess
import threading
import time

import pytest
from conftest import needs_nix
from daemon_util import (
    Client,
    decode,
    load_capture,
    our_daemon_cmd,
    run_session,
    stop_process,
    strip_ansi,
    wait_for_socket,
)

from storekeeper.api import DELETE_DEAD, GCOptions
from storekeeper.build import Builder, BuildMode, BuildSettings, BuildStatus, query_missing
from storekeeper.build.logs import LineSplitter, log_path, read_build_log
from storekeeper.build.rewrite import rewritten
from storekeeper.config.settings import this_system
from storekeeper.errors import InvalidPath
from storekeeper.formats.derivation import (
    Derivation,
    DerivationOutput,
    derivation_store_path,
    fill_output_paths,
    print_derivation,
)
from storekeeper.formats.storepath import StoreDir
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import DerivedPath, WireWriter
from storekeeper.fs import remove_tree
from storekeeper.store.local import LocalStore
from storekeeper.store.optimise import optimise_store

SYSTEM = this_system()
NIX_CMD = ["--extra-experimental-features", "nix-command"]
IS_ROOT = os.geteuid() == 0


# --- a store area with real paths ------------------------------------------------------------

class Area:
    """``<base>/{store,state,log,work,etc,home}``; base is world-traversable (build users)."""

    def __init__(self, base: str, conf: str = "") -> None:
        self.base = base
        for d in ("work", "etc", "home"):
            os.makedirs(os.path.join(base, d), exist_ok=True)
        with open(os.path.join(base, "etc", "nix.conf"), "w") as f:
            f.write("substituters =\nsandbox = false\nbuild-users-group =\n" + conf)
        self.proc: subprocess.Popen | None = None

    def __getattr__(self, name: str) -> str:
        if name in ("store", "state", "log", "work", "etc", "home"):
            return os.path.join(self.base, name)
        raise AttributeError(name)

    @property
    def socket(self) -> str:
        return os.path.join(self.base, "sock")

    @property
    def url(self) -> str:
        return f"local?store={self.store}&state={self.state}&log={self.log}"

    def env(self, remote: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
        env.update({"HOME": self.home, "XDG_CACHE_HOME": os.path.join(self.home, ".cache"),
                    "XDG_CONFIG_HOME": os.path.join(self.home, ".config"),
                    "NIX_CONF_DIR": self.etc, "NIX_STORE_DIR": self.store,
                    "NIX_STATE_DIR": self.state, "NIX_LOG_DIR": self.log,
                    "NIX_REMOTE": f"unix://{self.socket}" if remote else "local"})
        return env

    def start(self, kind: str) -> "Area":
        env = self.env(remote=False)
        if kind == "ours":
            cmd = our_daemon_cmd("--store", self.url, "--socket", self.socket)
        else:
            cmd = ["nix-daemon"]
            env["NIX_DAEMON_SOCKET_PATH"] = self.socket
        self.log_file = open(os.path.join(self.base, f"{kind}-daemon.log"), "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     cwd=self.work)
        wait_for_socket(self.socket, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
            self.log_file.close()

    def run(self, args: list[str], check: bool | None = None, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(args, env=self.env(), cwd=self.work, capture_output=True,
                           timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"{args} failed: {p.stderr.decode()}")
        return p

    def local_store(self) -> LocalStore:
        return LocalStore(LocalLayout.custom(self.store, self.state, self.log))


def _remove(path: str) -> None:
    if os.path.lexists(path):
        remove_tree(path)


@pytest.fixture
def area_factory():
    made: list[Area] = []

    def make(conf: str = "", base: str | None = None) -> Area:
        base = base or os.path.join("/tmp", f"skb-{secrets.token_hex(4)}")
        os.makedirs(base, mode=0o755)
        os.chmod(base, 0o755)
        a = Area(base, conf)
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop()
        for suffix in ("", "-nix"):
            _remove(a.base + suffix)


def drv_expr(name: str, script: str, extra: str = "") -> str:
    """A ``derivation`` whose builder is ``/bin/sh -c SCRIPT`` (Nix string syntax in SCRIPT)."""
    return (f'derivation {{ name = "{name}"; system = "{SYSTEM}"; builder = "/bin/sh"; '
            f'args = ["-c" "{script}"]; {extra} }}')


# --- the oracle session ----------------------------------------------------------------------

HELLO_SHA256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"  # "hello"

CHAIN = ('let a = ' + drv_expr("chain-a", r"PATH=/bin; mkdir $out; echo from-a > $out/x") + '; in '
         + drv_expr("chain-b", r"read v < ${a}/x; echo b-read $v; echo $v ${a} > $out"))
MULTI = drv_expr("multi", r"echo $dev > $out; echo dev-content > $dev", 'outputs = ["out" "dev"];')
FOD_GOOD = drv_expr("fod", r"printf hello > $out", f'outputHash = "{HELLO_SHA256}"; outputHashAlgo = "sha256";')
FOD_BAD = drv_expr("fodbad", r"printf hellx > $out", f'outputHash = "{HELLO_SHA256}"; outputHashAlgo = "sha256";')
FAILING = drv_expr("failing", r"echo line-one; echo line-two >&2; exit 3")
DEP_FAIL = ('let a = ' + drv_expr("depfail-a", r"echo broken; exit 2") + '; in '
            + drv_expr("depfail-b", r"echo ${a} > $out"))
DETERMINISTIC = drv_expr("det", r"echo $out > $out")
NONDET = drv_expr("nondet", r"echo $$ > $out")
SLOW = drv_expr("slow", r"echo started; while :; do :; done")
_RA = drv_expr("ruledep", r"echo dep > $out")
REFERENCE_RULES = {
    "requisites-none": drv_expr("rq", r"echo x > $out", "allowedRequisites = [];"),
    "requisites-dep": f"let a = {_RA}; in " + drv_expr("rq2", r"echo ${a} > $out", "allowedRequisites = [];"),
    "references-self": drv_expr("rq3", r"echo $out > $out", "allowedReferences = [];"),
    "references-out": drv_expr("rq4", r"echo $out > $out", 'allowedReferences = ["out"];'),
    "references-bogus": drv_expr("rq5", r"echo x > $out", 'allowedReferences = ["bogus"];'),
    "disallowed": f"let a = {_RA}; in " + drv_expr("rq6", r"echo ${a} > $out", "disallowedReferences = [a];"),
}


def oracle_session(a: Area) -> dict:
    """The same commands against whatever daemon serves ``a``; everything comparable."""
    out: dict = {}
    nb = lambda *args: a.run(["nix-build", *args])  # noqa: E731

    def record(key: str, p: subprocess.CompletedProcess) -> str:
        out[key] = (p.returncode, p.stdout.decode().strip(), strip_ansi(p.stderr.decode()))
        return p.stdout.decode().strip()

    triv = record("trivial", nb("-E", drv_expr("triv", r"echo hi; echo hi > $out")))
    out["trivial-result"] = os.readlink(os.path.join(a.work, "result"))
    out["trivial-log"] = a.run(["nix-store", "-l", triv], check=True).stdout.decode()
    b = record("chain", nb("-o", "chain", "-E", CHAIN))
    out["chain-content"] = open(b).read()
    out["chain-refs"] = a.run(["nix-store", "-q", "--references", b], check=True).stdout.decode()
    out["chain-log"] = a.run(["nix-store", "-l", b], check=True).stdout.decode()
    m = record("multi", nb("-o", "multi", "-E", MULTI))
    out["multi-refs"] = a.run(["nix-store", "-q", "--references", m], check=True).stdout.decode()
    drv = a.run(["nix-instantiate", "-E", MULTI], check=True).stdout.decode().strip()
    out["multi-outputs"] = a.run(["nix-store", "-r", drv], check=True).stdout.decode()
    record("fod", nb("-o", "fod", "-E", FOD_GOOD))
    record("fodbad", nb("--no-out-link", "-E", FOD_BAD))
    record("failing", nb("--no-out-link", "-E", FAILING))
    drv = a.run(["nix-instantiate", "-E", FAILING], check=True).stdout.decode().strip()
    out["failing-log"] = a.run(["nix-store", "-l", drv]).stdout.decode()
    record("depfail", nb("--no-out-link", "-E", DEP_FAIL))
    record("det", nb("-o", "det", "-E", DETERMINISTIC))
    record("det-check", nb("-o", "det", "--check", "-E", DETERMINISTIC))
    record("nondet", nb("-o", "nondet", "-E", NONDET))
    p = nb("-o", "nondet", "--check", "-K", "-E", NONDET)
    record("nondet-check", p)
    kept = re.search(r"keeping build directory '([^']+)'", p.stderr.decode())
    out["nondet-kept"] = bool(kept)
    if kept:
        _remove(kept.group(1))
    out["nondet-check-file"] = os.path.exists(os.readlink(os.path.join(a.work, "nondet")) + ".check")
    record("timeout", nb("--no-out-link", "--option", "timeout", "1", "-E", SLOW))
    for key, expr in REFERENCE_RULES.items():
        record(key, nb("--no-out-link", "-E", expr))
    record("newcli", a.run(["nix", *NIX_CMD, "build", "-o", "newcli", "--expr",
                            drv_expr("newcli", r"echo new-cli-log; echo zz > $out")]))
    out["newcli-result"] = os.readlink(os.path.join(a.work, "newcli"))
    record("newcli-fail", a.run(["nix", *NIX_CMD, "build", "--no-link", "--expr",
                                 drv_expr("newclifail", r"echo failing; exit 3")]))
    roots = {n: os.readlink(os.path.join(a.state, "gcroots", "auto", n))
             for n in sorted(os.listdir(os.path.join(a.state, "gcroots", "auto")))}
    # --no-out-link roots live in the client's temp dir, named after its pid
    out["roots"] = {n: t for n, t in roots.items() if not t.startswith("/tmp/nix-build-")}
    out["temp-roots"] = len(roots) - len(out["roots"])
    out["db"] = db_dump(a.state)
    return out


def db_dump(state: str) -> dict:
    db = sqlite3.connect(os.path.join(state, "db", "db.sqlite"))
    try:
        rows = db.execute("select path, hash, deriver, narSize, ultimate, sigs, ca from ValidPaths")
        paths = {r[0]: r[1:] for r in rows}
        refs = set(db.execute("select a.path, b.path from Refs r join ValidPaths a on r.referrer = a.id "
                              "join ValidPaths b on r.reference = b.id"))
        outs = set(db.execute("select v.path, d.id, d.path from DerivationOutputs d "
                              "join ValidPaths v on d.drv = v.id"))
    finally:
        db.close()
    return {"paths": paths, "refs": refs, "drv_outputs": outs}


@needs_nix
@pytest.mark.nix
def test_nix_build_like_the_real_daemon(area_factory):
    a = area_factory()
    real = oracle_session(a.start("nix"))
    a.stop()
    os.rename(a.base, a.base + "-nix")
    a = area_factory(base=a.base)
    ours = oracle_session(a.start("ours"))

    # Two builds print a PID: their outputs (and --check) necessarily differ.
    nondet = real["nondet"][1]
    for side in (real, ours):
        side["db"]["paths"][nondet] = side["db"]["paths"][nondet][1:]
    for key in real:
        assert ours[key] == real[key], f"{key} differs"

    assert ours["trivial"][0] == 0 and "hi" in ours["trivial"][2]
    assert ours["trivial-log"] == "hi\n"
    assert ours["chain-content"].startswith("from-a ") and "b-read from-a" in ours["chain"][2]
    assert ours["failing"][0] == 1
    assert "failed with exit code 3;\nlast 2 log lines:\n> line-one\n> line-two\n" in \
        ours["failing"][2].replace("\n       ", "\n")
    assert ours["failing-log"] == "line-one\nline-two\n"
    assert "hash mismatch in fixed-output derivation" in ours["fodbad"][2]
    assert "specified: sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=" in ours["fodbad"][2]
    assert "1 dependencies of derivation" in ours["depfail"][2]
    assert ours["det-check"][0] == 0 and ours["nondet-check"][0] == 1
    assert "may not be deterministic" in ours["nondet-check"][2] and ours["nondet-check-file"]
    assert "timed out after 1 seconds" in ours["timeout"][2]
    assert [ours[k][0] for k in REFERENCE_RULES] == [0, 1, 1, 0, 1, 1]
    assert "builder for" in ours["newcli-fail"][2] and ours["newcli-fail"][0] == 1
    assert os.path.join(a.work, "result") in ours["roots"].values()
    with a.local_store() as store:
        assert store.verify(check_contents=True).ok


# --- the protocol, driven by hand ------------------------------------------------------------

def _basic_drv(sd: StoreDir, name: str, script: str) -> tuple[str, Derivation]:
    drv = fill_output_paths(Derivation(outputs={"out": DerivationOutput()}, platform=SYSTEM,
                                       builder="/bin/sh", args=["-c", script],
                                       env={"builder": "/bin/sh", "name": name, "system": SYSTEM}),
                            sd, read_drv=None)
    return sd.print(derivation_store_path(drv, sd)), drv


def _shape(msgs, drv_path: str) -> list:
    """Log messages with activity ids numbered in order of appearance and the drv path masked."""
    ids: dict[int, int] = {}

    def act(i: int) -> int:
        return ids.setdefault(i, len(ids) + 1) if i else 0

    def mask(v):
        return v.replace(drv_path, "<drv>") if isinstance(v, str) else v

    out = []
    for m in msgs:
        if m.kind.name == "START_ACTIVITY":
            i, lvl, typ, text, fields, parent = m.payload
            out.append(("START", act(i), lvl, typ, mask(text), [mask(f) for f in fields], act(parent)))
        elif m.kind.name == "STOP_ACTIVITY":
            out.append(("STOP", act(m.payload)))
        elif m.kind.name == "RESULT":
            i, typ, fields = m.payload
            out.append(("RESULT", act(i), typ, fields))
        else:
            out.append((m.kind.name, m.payload))
    return out


def test_build_derivation_and_results_through_the_protocol(area_factory):
    a = area_factory()
    a.start("ours")
    sd = StoreDir(a.store)
    drv_path, drv = _basic_drv(sd, "rb", "echo remote-build-log; echo rb > $out")
    out = drv.outputs["out"].path
    w = WireWriter().u64(36).string(drv_path).u64(1).string("out").string(out).string("").string("")
    w.strings([]).string(SYSTEM).string("/bin/sh").strings(drv.args).string_map(sorted(drv.env.items()))
    c = Client.connect(a.socket).handshake()
    try:
        msgs, (status, err, times, nondet, start, stop, built) = c.op(w.u64(0), 36)
        assert (status, err, times, nondet) == (0, "", 1, False) and start <= stop
        ((key, realisation),) = built.items()
        assert key.endswith("!out") and json.loads(realisation) == {
            "dependentRealisations": {}, "id": key, "outPath": os.path.basename(out), "signatures": []}
        assert realisation.startswith('{"dependentRealisations":{},"id":')
        lines = [m.payload[2] for m in msgs if m.kind.name == "RESULT" and m.payload[1] == 101]
        assert lines == [["remote-build-log"]]
        # The same activities, results and order as the real daemon's (captured) answer.
        real = decode(*load_capture("build_derivation_remote"))
        (real36,) = [e for e in real.exchanges if e.op == 36]
        assert _shape(msgs, drv_path) == _shape(real36.messages, real36.request["drv"])
        with a.local_store() as store:
            info = store.path_info(store.parse_path(out))
            assert store.print_path(info.deriver) == drv_path and info.ultimate and not info.ca
        # An opaque valid path is AlreadyValid with no outputs; the drv itself is not in the store.
        res = c.op(WireWriter().u64(46).strings([out, drv_path + "!out"]).u64(0), 46)[1]
        assert res[0] == (out, 2, "", 0, False, 0, 0, {})
        assert res[1][1] == 9 and "cannot build missing derivation" in res[1][2]
        # Nothing roots the output but this connection's pin: a GC keeps it ...
        with a.local_store() as store:
            store.collect_garbage(GCOptions(action=DELETE_DEAD))
            assert store.is_valid(store.parse_path(out))
    finally:
        c.close()
    # ... until the connection is gone.
    deadline = time.monotonic() + 10
    with a.local_store() as store:
        while store.is_valid(store.parse_path(out)) and time.monotonic() < deadline:
            store.collect_garbage(GCOptions(action=DELETE_DEAD))
            time.sleep(0.05)
        assert not store.is_valid(store.parse_path(out)) and not os.path.exists(out)
    with open(os.path.join(a.base, "ours-daemon.log"), "rb") as f:
        assert b"Traceback" not in f.read()


def test_untrusted_clients_cannot_build_input_addressed_basic_derivations(tmp_path):
    root = str(tmp_path / "root")
    store = LocalStore(LocalLayout.chroot(root))
    try:

        sd = store.store_dir
        drv_path, drv = _basic_drv(sd, "rb", "echo rb > $out")
        w = WireWriter().u64(0x6E697863).u64(0x122).u64(0).u64(0)
        w.u64(36).string(drv_path).u64(1).string("out").string(drv.outputs["out"].path).string("").string("")
        w.strings([]).string(SYSTEM).string("/bin/sh").strings(drv.args).string_map(sorted(drv.env.items()))
        w.u64(0)
        w.u64(36).string(drv_path).u64(1).string("out").string(drv.outputs["out"].path).string("").string("")
        w.strings([]).string(SYSTEM).string("/bin/sh").strings(drv.args).string_map(sorted(drv.env.items()))
        w.u64(0)
        c2s = w.take()
        data = run_session(store, c2s, trusted=False, timeout=30)
        conv = decode(c2s, data)
        answers = [e.messages[-1].payload.message for e in conv.exchanges]
        assert answers == ["you are not privileged to build input-addressed derivations"] * 2
        # (a trusted client's build on this chroot store runs in the sandbox: test_sandbox.py)
    finally:
        store.close()


# --- concurrency --------------------------------------------------------------------------------

@needs_nix
@pytest.mark.nix
def test_two_clients_one_output_one_builder(area_factory):
    a = area_factory()
    a.start("ours")
    fifo = os.path.join(a.base, "go")
    os.mkfifo(fifo)
    count = os.path.join(a.base, "count")
    expr = drv_expr("once", rf"echo built >> {count}; read v < {fifo}; echo $v > $out")
    procs = [subprocess.Popen(["nix-build", "--no-out-link", "-E", expr], env=a.env(), cwd=a.work,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    with open(fifo, "w") as f:  # blocks until one builder reads
        time.sleep(1.0)         # the other client meanwhile waits for the output lock
        f.write("go\n")
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0][0] == outs[1][0] and open(outs[0][0].decode().strip()).read() == "go\n"
    assert open(count).read() == "built\n"
    waited = [b"waiting for lock on" in err for _, err in outs]
    assert sorted(waited) == [False, True]


@needs_nix
@pytest.mark.nix
def test_max_jobs_runs_builders_side_by_side(area_factory):
    a = area_factory()
    a.start("ours")
    m = a.base
    expr = ("let x = " + drv_expr("x", rf"echo > {m}/x-up; while [ ! -e {m}/y-up ]; do :; done; echo x > $out")
            + "; y = " + drv_expr("y", rf"echo > {m}/y-up; while [ ! -e {m}/x-up ]; do :; done; echo y > $out")
            + "; in " + drv_expr("xy", r"echo ${x} ${y} > $out"))
    p = a.run(["nix-build", "--no-out-link", "-j", "2", "--option", "timeout", "20", "-E", expr])
    assert p.returncode == 0, p.stderr.decode()


# --- builds as build users ----------------------------------------------------------------------

@pytest.fixture
def build_users():
    """A group with two members, made for the test and removed after it."""
    if not IS_ROOT or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to create build users")
    tag = secrets.token_hex(3)
    group, users = f"skb{tag}", [f"skb{tag}a", f"skb{tag}b"]
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    try:
        for u in users:
            subprocess.run(["useradd", "-M", "-N", "-G", group, "-s", "/usr/sbin/nologin", u],
                           check=True, capture_output=True)
        yield group, [pwd.getpwnam(u) for u in users]
    finally:
        for u in users:
            subprocess.run(["userdel", u], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


def _processes_of(uid: int) -> list[int]:
    """Live processes of ``uid`` (killed ones may take a moment to be reaped)."""
    deadline = time.monotonic() + 5
    while True:
        found = []
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] not in "ZX":
                            found.append(int(pid))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@needs_nix
@pytest.mark.nix
@pytest.mark.root
def test_builds_run_as_build_users_and_hostile_outputs_are_refused(area_factory, build_users):
    group, (u1, u2) = build_users
    a = area_factory(conf=f"build-users-group = {group}\n")
    a.start("ours")
    gid = grp.getgrnam(group).gr_gid

    # 1. A normal build, as the first free member; a stray background process is killed.
    p = a.run(["nix-build", "-o", "who", "-E", drv_expr(
        "who", r"PATH=/bin:/usr/bin; id -u > $out; setsid sh -c 'while :; do :; done' >/dev/null 2>&1 &")], check=True)
    out = p.stdout.decode().strip()
    assert open(out).read().strip() == str(u1.pw_uid)
    assert os.stat(out).st_uid == 0 and os.stat(out).st_mode & 0o7777 == 0o444
    assert os.path.exists(os.path.join(a.state, "userpool", str(u1.pw_uid)))
    st = os.stat(a.store)
    assert st.st_gid == gid and st.st_mode & 0o7777 == 0o1775
    assert _processes_of(u1.pw_uid) == []

    def refused(name: str, script: str, why: str) -> None:
        p = a.run(["nix-build", "--no-out-link", "-E", drv_expr(name, "PATH=/bin:/usr/bin; " + script)])
        err = strip_ansi(p.stderr.decode())
        assert p.returncode == 1 and why in err, err
        with a.local_store() as store:
            drv = a.run(["nix-instantiate", "-E", drv_expr(name, "PATH=/bin:/usr/bin; " + script)],
                        check=True).stdout.decode().strip()
            outs = store.query_derivation_outputs(store.parse_path(drv))
            assert outs and not any(store.is_valid(o) for o in outs.values())

    # Build users cannot talk to the daemon: it closes their connections unanswered.
    probe = os.path.join(a.base, "probe.py")
    with open(probe, "w") as f:
        f.write("import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(10)\n"
                f"s.connect({a.socket!r})\n"
                "try:\n    s.sendall(bytes.fromhex('6378696e00000000'))\n    print(len(s.recv(8)))\n"
                "except OSError as e:\n    print(0, e)\n")
    os.chmod(probe, 0o644)
    p = a.run(["nix-build", "--no-out-link", "-E", drv_expr(
        "probe", rf"/usr/bin/python3 {probe} > $out")], check=True)
    assert open(p.stdout.decode().strip()).read().startswith("0")

    # 2. ln /etc/shadow $out/foo, with a root-owned victim of our own.  With
    #    fs.protected_hardlinks = 1 (this machine; left alone) the kernel only lets
    #    a user hard-link files it can read and write: a 0666 victim gets through.
    victim = os.path.join(a.base, "victim")
    with open(victim, "w") as f:
        f.write("secret\n")
    os.chmod(victim, 0o666)
    refused("shadow", f"mkdir $out; ln {victim} $out/foo", "invalid ownership on file")
    assert os.stat(victim).st_mode & 0o7777 == 0o666 and os.stat(victim).st_uid == 0

    # 3. A file of the other build user inside the output.
    other = os.path.join(a.base, "other")
    with open(other, "w") as f:
        f.write("theirs\n")
    os.chown(other, u2.pw_uid, u2.pw_gid)
    os.chmod(other, 0o666)
    refused("foreign", f"mkdir $out; ln {other} $out/theirs", "invalid ownership on file")
    assert os.stat(other).st_uid == u2.pw_uid and os.stat(other).st_mode & 0o7777 == 0o666

    # 4. Group-writable top-level output.
    refused("loose", "mkdir $out; chmod 0775 $out", "suspicious ownership or permission")
    assert _processes_of(u1.pw_uid) == [] and _processes_of(u2.pw_uid) == []


@needs_nix
@pytest.mark.nix
def test_outside_hard_links_refused_when_building_as_the_daemon_user(area_factory):
    a = area_factory()
    a.start("ours")
    victim = os.path.join(a.base, "victim")
    with open(victim, "w") as f:
        f.write("secret\n")
    os.chmod(victim, 0o600)
    expr = drv_expr("link", rf"PATH=/bin; mkdir $out; ln {victim} $out/foo")
    p = a.run(["nix-build", "--no-out-link", "-E", expr])
    assert p.returncode == 1 and b"is a hard link to a file outside the build output" in p.stderr
    assert os.stat(victim).st_mode & 0o7777 == 0o600
    # hard links inside the output are fine
    expr = drv_expr("inside", r"PATH=/bin; mkdir $out; echo x > $out/a; ln $out/a $out/b")
    out = a.run(["nix-build", "--no-out-link", "-E", expr], check=True).stdout.decode().strip()
    assert os.stat(os.path.join(out, "a")).st_ino == os.stat(os.path.join(out, "b")).st_ino


@needs_nix
@pytest.mark.nix
def test_auto_optimise_store_links_new_outputs(area_factory):
    a = area_factory(conf="auto-optimise-store = true\n")
    a.start("ours")
    expr = drv_expr("twins", r"PATH=/bin; mkdir $out; echo same-bytes > $out/a; echo same-bytes > $out/b")
    out = a.run(["nix-build", "--no-out-link", "-E", expr], check=True).stdout.decode().strip()
    ino = {os.stat(os.path.join(out, n)).st_ino for n in ("a", "b")}
    links = {e.inode() for e in os.scandir(os.path.join(a.store, ".links"))}
    assert len(ino) == 1 and ino <= links
    with a.local_store() as store:
        assert store.verify(check_contents=True).ok


# --- builds while GC and optimise run -------------------------------------------------------------

@needs_nix
@pytest.mark.nix
def test_builds_survive_concurrent_gc_and_optimise(area_factory):
    """Bounded by counts, not rates: the collector runs until the builds are done and then
    two more full rounds (GC + optimise), however slow the machine is."""
    a = area_factory()
    a.start("ours")
    stop = threading.Event()
    counts = {"gc": 0, "optimise": 0, "deleted": 0, "builds": 0}
    errors: list[str] = []

    def collector() -> None:
        # A fresh store object each time: the optimiser pins every path it
        # visits, and those pins must not outlive its run.
        try:
            while not stop.is_set():
                with a.local_store() as store:
                    counts["deleted"] += len(store.collect_garbage(GCOptions(action=DELETE_DEAD)).paths)
                counts["gc"] += 1
                with a.local_store() as store:
                    optimise_store(store)
                counts["optimise"] += 1
        except BaseException:  # noqa: BLE001 -- reported by the test
            import traceback
            errors.append(traceback.format_exc())

    salt = secrets.token_hex(4)

    def chain(i: int) -> str:
        # b reads a and c while it builds; it keeps c as a reference, and a
        # becomes garbage once the client is gone
        return ("let a = " + drv_expr(f"sa{i}", rf"PATH=/bin; mkdir $out; echo {salt}-{i} > $out/x; "
                                      r"echo same > $out/common")
                + "; c = " + drv_expr(f"sc{i}", rf"PATH=/bin; mkdir $out; echo c-{salt}-{i} > $out/y; "
                                      r"echo same > $out/common")
                + "; in " + drv_expr(f"sb{i}", r"read v < ${a}/x; read w < ${c}/y; echo $v $w ${c} > $out"))

    results: dict[int, subprocess.CompletedProcess] = {}

    def client(ids: list[int]) -> None:
        for i in ids:
            results[i] = a.run(["nix-build", "-o", f"r{i}", "-E", chain(i)])
            # garbage for the collector to find while the others build
            a.run(["nix-build", "--no-out-link", "-E", drv_expr(f"junk{i % 2}", rf"echo {salt} > $out")])

    gc = threading.Thread(target=collector)
    gc.start()
    n = 12
    clients = [threading.Thread(target=client, args=(list(range(k, n, 3)),)) for k in range(3)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    # two more rounds after the last build, so the garbage left by the clients is met
    rounds = counts["optimise"] + 2
    deadline = time.monotonic() + 120
    while counts["optimise"] < rounds and gc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    gc.join(60)
    assert not errors, "\n".join(errors)
    counts["builds"] = sum(1 for p in results.values() if p.returncode == 0)
    print(f"\nbuilds ok: {counts['builds']}/{n}, GC runs: {counts['gc']}, paths deleted: "
          f"{counts['deleted']}, optimise runs: {counts['optimise']}")
    for i in range(n):
        assert results[i].returncode == 0, results[i].stderr.decode()
    with a.local_store() as store:
        for i in range(n):
            out = os.readlink(os.path.join(a.work, f"r{i}"))
            v, w, dep = open(out).read().split()
            assert (v, w) == (f"{salt}-{i}", f"c-{salt}-{i}")  # both inputs were there
            assert store.is_valid(store.parse_path(out)) and store.is_valid(store.parse_path(dep))
            assert open(os.path.join(dep, "y")).read() == f"c-{salt}-{i}\n"
        assert counts["optimise"] >= 2 and counts["deleted"] > 0
        assert store.verify(check_contents=True).ok


# --- small pieces ---------------------------------------------------------------------------------

def test_an_existing_drv_is_pinned_before_it_is_found_valid(tmp_path):
    """Seed 003: writing a .drv that is already valid still takes its temp root first."""
    base = str(tmp_path)
    layout = LocalLayout.custom(base + "/store", base + "/state", base + "/log")
    drv = fill_output_paths(Derivation(outputs={"out": DerivationOutput()}, platform=SYSTEM,
                                       builder="/bin/sh", args=[],
                                       env={"builder": "/bin/sh", "name": "again", "system": SYSTEM}),
                            StoreDir(base + "/store"), None)
    with LocalStore(layout) as first:
        path = first.add_text("again.drv", print_derivation(drv)).path
    with LocalStore(layout) as store:  # a new process's view: no root on the .drv yet
        printed = store.print_path(path)
        events: list[str] = []
        add, is_valid = store.temp_roots.add, store.db.is_valid
        store.temp_roots.add = lambda p: (events.append(f"pin {p}"), add(p))[1]
        store.db.is_valid = lambda p: (events.append(f"valid? {p}"), is_valid(p))[1]
        assert store.add_dump(io.BytesIO(print_derivation(drv)), "again.drv", "text").path == path
        assert events[:2] == [f"pin {printed}", f"valid? {printed}"]


def test_log_lines_and_layout(tmp_path):
    lines: list[bytes] = []
    s = LineSplitter(lines.append, tail=2)
    for chunk in (b"one\ntw", b"o\n50%\r100%\nlast"):
        s.feed(chunk)
    s.finish()
    assert lines == [b"one", b"two", b"100%", b"last"] and list(s.tail) == [b"100%", b"last"]
    assert log_path("/l", "abcdef-x.drv", True) == "/l/drvs/ab/cdef-x.drv.bz2"
    assert read_build_log(str(tmp_path), "abcdef-x.drv") is None


def test_rewriting_across_chunk_boundaries():
    old, new = b"a" * 32, b"b" * 32
    data = b"x" * 10 + old + b"y" * 40 + old + b"z"
    for cut in range(1, len(data)):
        chunks = [data[:cut], data[cut:]]
        assert b"".join(rewritten(chunks, {old: new})) == data.replace(old, new)


def test_settings_from_nix_conf_and_aliases():
    s = BuildSettings().with_settings([("max-jobs", "4"), ("build-timeout", "7"), ("keep-failed", "true"),
                                       ("build-users-group", ""), ("extra-system-features", "gpu"),
                                       ("sandbox", "false"), ("unrelated", "x")])
    assert (s.max_jobs, s.timeout, s.keep_failed, s.group, s.sandbox) == (4, 7, True, "", "false")
    assert "gpu" in s.system_features and "big-parallel" in s.system_features
    assert BuildSettings(build_users_group=None).group == ("nixbld" if IS_ROOT else "")


def test_query_missing_follows_input_derivations(tmp_path):
    base = str(tmp_path)
    store = LocalStore(LocalLayout.custom(base + "/store", base + "/state", base + "/log"))
    try:
        sd = store.store_dir
        dep = fill_output_paths(Derivation(outputs={"out": DerivationOutput()}, platform=SYSTEM,
                                           builder="/bin/sh", args=["-c", "echo > $out"],
                                           env={"builder": "/bin/sh", "name": "dep", "system": SYSTEM}),
                                sd, None)
        dep_path = store.add_text("dep.drv", print_derivation(dep)).path
        top = fill_output_paths(Derivation(outputs={"out": DerivationOutput()},
                                           input_drvs={sd.print(dep_path): frozenset({"out"})},
                                           input_srcs=frozenset({base + "/store/" + "0" * 32 + "-gone"}),
                                           platform=SYSTEM, builder="/bin/sh", args=[],
                                           env={"builder": "/bin/sh", "name": "top", "system": SYSTEM}),
                                sd, lambda p: dep)
        # an input source that is not valid cannot be registered; query_missing still reports
        # it as unknown when asked about a drv that names it
        with pytest.raises(InvalidPath):
            store.add_text("top.drv", print_derivation(top),
                           [dep_path, sd.parse(next(iter(top.input_srcs)))])
        top2 = fill_output_paths(Derivation(outputs={"out": DerivationOutput()},
                                            input_drvs={sd.print(dep_path): frozenset({"out"})},
                                            platform=SYSTEM, builder="/bin/sh", args=["-c", "exit 1"],
                                            env={"builder": "/bin/sh", "name": "top", "system": SYSTEM}),
                                 sd, lambda p: dep)
        top_path = store.add_text("top.drv", print_derivation(top2), [dep_path]).path
        will, unknown = query_missing(store, [DerivedPath(top_path, frozenset({"out"}))])
        assert will == {top_path, dep_path} and unknown == set()
        # A .drv whose output paths are wrong is refused at registration.
        bad = print_derivation(top2).replace(b"-top\"", b"-tox\"")
        with pytest.raises(Exception, match="incorrect output"):
            store.add_text("top.drv", bad, [dep_path])
        # Building on this store works: its store dir is real.
        r = Builder(store, BuildSettings(build_users_group="", sandbox="false")).build(
            [DerivedPath(top_path, frozenset({"out"}))], BuildMode.NORMAL)
        assert r[0].status == BuildStatus.PERMANENT_FAILURE and "exit code 1" in r[0].error_msg
        assert store.is_valid(sd.parse(dep.outputs["out"].path))
    finally:
        store.close()



@needs_nix
@pytest.mark.nix
def test_a_build_stops_when_its_client_goes_away(area_factory):
    a = area_factory()
    a.start("ours")
    marker = f"spin-{secrets.token_hex(4)}"
    proc = subprocess.Popen(["nix-build", "--no-out-link", "-E", drv_expr(marker, "while :; do :; done")],
                            env=a.env(), cwd=a.work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def builders() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"name={marker}".encode() in f.read().split(b"\0"):
                        found.append(int(pid))
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 20
    while not builders() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert builders(), "the builder never started"
    proc.kill()
    proc.wait()
    for d in os.listdir("/tmp"):  # the killed client's own temp dir
        if d.startswith(f"nix-build-{proc.pid}-"):
            shutil.rmtree(os.path.join("/tmp", d), ignore_errors=True)
    deadline = time.monotonic() + 10
    while builders() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert builders() == []
    # nothing is left locked or half-built: the same build can run (and fail) again at once
    p = a.run(["nix-build", "--no-out-link", "--option", "timeout", "1", "-E",
               drv_expr(marker, "while :; do :; done")])
    assert p.returncode == 1 and b"timed out after 1 seconds" in p.stderr
    assert not any(n.startswith("nix-build-" + marker) for n in os.listdir("/tmp"))
