"""Messages and exit codes of the real Nix 2.8 clients: the same against our daemon as
against ``nix-daemon`` (issue 13), once paths, sizes and timings are normalised.

Deliberate differences (README.md, "Deliberate differences from nix-daemon") are left
out of these sessions: ``--print-dead``/``--print-live`` with a stale link in
``gcroots/auto`` (Nix removes it and says so), and ``--delete`` of a path that is not
valid (Nix says "deleting '…'" and counts it).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import threading
import time

import pytest
from conftest import needs_nix, nix_env
from daemon_util import Client, DaemonError, start_daemon, stop_process, strip_ansi
from test_build import Area, area_factory, drv_expr  # noqa: F401 -- (a fixture)

from storekeeper.formats.contentaddress import RECURSIVE, ContentAddress
from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import dump_string
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.storepath import StoreDir
from storekeeper.formats.wire import Op, WireWriter, frame, write_path_info

NOPE = "/nix/store/00000000000000000000000000000000-nope"


def normalise(text: str, root: str, tmp: str) -> str:
    text = strip_ansi(text).replace(root, "ROOT").replace(tmp, "TMP")
    text = re.sub(r"-?\d+\.\d\d MiB", "X MiB", text)
    text = re.sub(r"gcroots/auto/[0-9a-z]{32}", "gcroots/auto/HASH", text)  # of the link's path
    return re.sub(r"after [\d.]+ ?m?s", "after T", text)


def session(kind: str, tmp, conf: str = "", daemon_env: dict[str, str] | None = None,
            steps=None) -> list:
    """Run ``steps(run, work)`` with the real clients against a fresh daemon of ``kind``;
    every call's (command, exit code, stderr, stdout), normalised."""
    root, sock = str(tmp / f"{kind}-root"), str(tmp / f"{kind}.sock")
    env = nix_env(str(tmp))
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
        f.write(conf)
    cwd = tmp / "cwd"
    cwd.mkdir(exist_ok=True)
    with open(tmp / f"{kind}.log", "wb") as log:
        proc = start_daemon(kind, root, sock, dict(env, **(daemon_env or {})), log=log, cwd=str(cwd))
    try:
        env["NIX_REMOTE"] = f"unix://{sock}?root={root}"
        out: list = []

        def run(*args: str) -> str:
            r = subprocess.run(list(args), env=env, capture_output=True, timeout=60)
            out.append((" ".join(args).replace(str(tmp), "TMP"), r.returncode,
                        normalise(r.stderr.decode(), root, str(tmp)),
                        normalise(r.stdout.decode(), root, str(tmp))))
            return r.stdout.decode().strip()

        work = tmp / "w"
        work.mkdir(exist_ok=True)
        assert steps is not None
        steps(run, work)
        return out
    finally:
        stop_process(proc)


def gc_steps(run, work) -> None:
    (work / "a.txt").write_text("a\n")
    (work / "junk.txt").write_text("junk\n")
    (work / "big.bin").write_bytes(bytes(range(256)) * 40)
    a = run("nix-store", "--add", str(work / "a.txt"))
    junk = run("nix-store", "--add", str(work / "junk.txt"))
    b = json.loads(run("nix-instantiate", "--read-write-mode", "--eval", "-E",
                       f'builtins.toFile "b.txt" "uses ${{builtins.storePath {a}}}"'))
    run("nix-store", "-r", b, "--add-root", str(work / "result"), "--indirect")
    run("nix-store", "--delete", a)                     # alive: "Cannot delete path …"
    run("nix-store", "--delete", b)
    run("nix-store", "--delete", junk)                  # no "deleting garbage..."
    run("nix-store", "-q", "--hash", NOPE)              # "path '…' is not valid"
    run("nix-store", "-q", "--references", NOPE)
    run("nix-store", "-q", "--hash", "/nix/store/00000000000000000000000000000000")
    run("nix-store", "-q", "--hash", str(work / "a.txt"))
    run("nix-store", "--verify-path", NOPE)
    run("nix-store", "--add-fixed", "sha256", str(work / "big.bin"))
    run("nix-store", "--add-fixed", "sha256", str(work / "missing"))
    run("nix-store", "--gc", "--print-dead")             # "determining live/dead paths..."
    run("nix-store", "--gc", "--print-live")
    run("nix-store", "--gc", "--max-freed", "1")         # "deleted more than 1 bytes; stopping"
    run("nix-store", "--gc", "--max-freed", "0")
    os.unlink(work / "result")
    run("nix-store", "--gc")                             # the stale link, then the deletions
    run("nix-store", "--gc")


@needs_nix
@pytest.mark.nix
def test_gc_and_error_messages_like_the_real_daemon(tmp_path):
    (tmp_path / "ours").mkdir()
    (tmp_path / "nix").mkdir()
    got = session("ours", tmp_path / "ours", steps=gc_steps)
    want = session("nix", tmp_path / "nix", steps=gc_steps)
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert g == w, g[0]
    text = "".join(g[2] for g in got)
    for line in ("finding garbage collector roots...", "deleting garbage...", "deleting unused links...",
                 "determining live/dead paths...", "deleted more than 1 bytes; stopping",
                 "since it is still alive", f"path '{NOPE}' is not valid", "removing stale link from"):
        assert line in text
    assert "2 store paths deleted, X MiB freed\n" in [g[3] for g in got]


def auto_gc_steps(run, work) -> None:
    (work / "x.txt").write_text("x\n")
    (work / "y.txt").write_text("y\n")
    run("nix-store", "--add", str(work / "x.txt"))
    run("nix-store", "--add", str(work / "y.txt"))     # auto-GC deletes x.txt
    run("nix-instantiate", "-E", 'derivation { name = "d"; builder = "/bin/sh"; system = "x"; }')


@needs_nix
@pytest.mark.nix
def test_auto_gc_messages_like_the_real_daemon(tmp_path):
    results = []
    for kind in ("ours", "nix"):
        tmp = tmp_path / kind
        tmp.mkdir()
        (tmp / "free").write_text("500000\n")
        results.append(session(kind, tmp, conf="min-free = 1000000\nmax-free = 2000000\n"
                               "min-free-check-interval = 0\n",
                               daemon_env={"_NIX_TEST_FREE_SPACE_FILE": str(tmp / "free")},
                               steps=auto_gc_steps))
    got, want = results
    for g, w in zip(got, want):
        assert g == w, g[0]
    assert len(got) == len(want)
    assert got[0][2].startswith("running auto-GC to free 1500000 bytes\nfinding garbage collector roots...\n")
    assert "deleting '" in got[1][2]


# --- lock contention: what a client waiting for a lock is told ---------------------------------

def gc_lock_steps(state: str):
    def steps(run, work) -> None:
        (work / "junk.txt").write_text("junk\n")
        run("nix-store", "--add", str(work / "junk.txt"))
        os.makedirs(state, exist_ok=True)
        fd = os.open(os.path.join(state, "gc.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another collector holds the big lock ...
        threading.Timer(2.0, os.close, [fd]).start()  # ... for two more seconds
        run("nix-store", "--gc")
    return steps


@needs_nix
@pytest.mark.nix
def test_gc_lock_contention_told_like_the_real_daemon(tmp_path):
    results = []
    for kind in ("ours", "nix"):
        tmp = tmp_path / kind
        tmp.mkdir()
        state = str(tmp / f"{kind}-root" / "nix" / "var" / "nix")
        results.append(session(kind, tmp, steps=gc_lock_steps(state)))
    got, want = results
    assert got == want
    assert got[-1][2].startswith("waiting for the big garbage collector lock...\n"), got[-1]


def build_lock_session(a: Area) -> list:
    """Two nix-build of one derivation at once: the second waits for the output's lock."""
    fifo = os.path.join(a.base, "go")
    os.mkfifo(fifo)
    expr = drv_expr("once", rf"read v < {fifo}; echo $v > $out")
    procs = [subprocess.Popen(["nix-build", "--no-out-link", "-E", expr], env=a.env(), cwd=a.work,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    with open(fifo, "w") as f:  # blocks until one builder reads
        time.sleep(2.0)         # the other client meanwhile waits for the output lock
        f.write("go\n")
    outs = [(p.communicate(timeout=60), p.returncode) for p in procs]
    os.unlink(fifo)
    return sorted(((code, out.decode(), strip_ansi(err.decode())) for (out, err), code in outs),
                  key=lambda o: "waiting for lock" in o[2])


@needs_nix
@pytest.mark.nix
def test_build_lock_contention_told_like_the_real_daemon(area_factory):  # noqa: F811
    a = area_factory()
    want = build_lock_session(a.start("nix"))
    a.stop()
    os.rename(a.base, a.base + "-nix")  # (the same store dir again: the same paths)
    a = area_factory(base=a.base)
    got = build_lock_session(a.start("ours"))
    assert got == want
    assert [g[0] for g in got] == [0, 0] and got[0][1] == got[1][1]
    assert f"waiting for lock on '{got[0][1].strip()}'...\n" in got[1][2]
    assert "waiting for lock" not in got[0][2]


# --- hash mismatch: a NAR that does not match its metadata --------------------------------------

def tampered_cache_steps(run, work) -> None:
    """``nix copy`` from a binary cache whose NAR was changed after its narinfo was written:
    the client sends the narinfo's hash, the daemon finds another."""
    (work / "f.txt").write_text("hi\n")
    src = f"local?root={work}/src"
    p = run("nix-store", "--store", src, "--add", str(work / "f.txt"))
    cache = f"file://{work}/cache?compression=none"
    run("nix", "--extra-experimental-features", "nix-command", "copy", "--from", src, "--to", cache, p)
    (nar,) = (work / "cache" / "nar").iterdir()
    nar.write_bytes(nar.read_bytes().replace(b"hi\n", b"ho\n"))
    run("nix", "--extra-experimental-features", "nix-command", "copy", "--no-check-sigs",
        "--from", f"file://{work}/cache", p)
    run("nix-store", "--check-validity", p)


@needs_nix
@pytest.mark.nix
def test_hash_mismatch_told_like_the_real_daemon(tmp_path):
    results = []
    for kind in ("ours", "nix"):
        (tmp_path / kind).mkdir()
        steps = session(kind, tmp_path / kind, steps=tampered_cache_steps)
        results.append([tuple(x.replace(f"{kind}.sock", "SOCK") if isinstance(x, str) else x
                              for x in step) for step in steps])
    got, want = results
    assert got == want
    assert "error: hash mismatch importing path '/nix/store/" in got[-2][2]
    assert "';\n         specified: sha256:" in got[-2][2] and "\n         got:       sha256:" in got[-2][2]
    assert got[-2][1] == 1 and got[-1][1] == 1  # and nothing was added


def _nar_request(sd, info, nar: bytes) -> bytes:
    return (WireWriter().u64(Op.AddToStoreNar).raw(write_path_info(WireWriter(), sd, info, True).take())
            .boolean(False).boolean(True).raw(frame(nar)).take())


@needs_nix
@pytest.mark.nix
def test_nar_metadata_mismatches_worded_like_the_real_daemon(tmp_path):
    """The same AddToStoreNar requests (wrong hash, wrong size, wrong content address) to
    both daemons: the same error messages, word for word."""
    sd = StoreDir("/nix/store")
    nar = dump_string(b"checked contents\n")
    ca = ContentAddress(RECURSIVE, Hash.of("sha256", nar))
    good = ValidPathInfo(ca.store_path(sd, "checked"), Hash.of("sha256", nar), len(nar), ca=ca.render())
    bad = [good.with_(nar_hash=Hash.of("sha256", b"something else")),
           good.with_(nar_size=len(nar) + 8),
           good.with_(ca=ContentAddress(RECURSIVE, Hash.of("sha256", b"x")).render())]
    messages = {}
    for kind in ("ours", "nix"):
        root, sock = str(tmp_path / f"{kind}-root"), str(tmp_path / f"{kind}.sock")
        proc = start_daemon(kind, root, sock, nix_env(str(tmp_path)))
        try:
            c = Client.connect(sock).handshake()
            try:
                for info in bad:
                    with pytest.raises(DaemonError) as e:
                        c.op(WireWriter().raw(_nar_request(sd, info, nar)), Op.AddToStoreNar)
                    messages.setdefault(kind, []).append(strip_ansi(str(e.value)))
            finally:
                c.close()
        finally:
            stop_process(proc)
    assert messages["ours"] == messages["nix"]
    assert [m.split(" importing path")[0] for m in messages["ours"]] == \
        ["hash mismatch", "size mismatch", "ca hash mismatch"]
    assert messages["ours"][1].endswith(f";\n  specified: {len(nar) + 8}\n  got:       {len(nar)}")


def modified_path_steps(root: str):
    """A store file changed behind the store's back: what verifying says."""
    def steps(run, work) -> None:
        (work / "m.txt").write_text("original\n")
        p = run("nix-store", "--add", str(work / "m.txt"))
        real = os.path.join(root, p.lstrip("/"))
        os.chmod(real, 0o644)
        with open(real, "w") as f:
            f.write("modified\n")
        os.chmod(real, 0o444)
        run("nix-store", "--verify-path", p)
        run("nix-store", "--verify", "--check-contents")
    return steps


@needs_nix
@pytest.mark.nix
def test_modified_path_told_like_the_real_daemon(tmp_path):
    results = []
    for kind in ("ours", "nix"):
        (tmp_path / kind).mkdir()
        root = str(tmp_path / kind / f"{kind}-root")
        results.append(session(kind, tmp_path / kind, steps=modified_path_steps(root)))
    got, want = results
    assert got == want
    assert [g[1] for g in got] == [0, 1, 1]
    assert "' was modified! expected hash 'sha256:" in got[1][2] and "', got 'sha256:" in got[1][2]
