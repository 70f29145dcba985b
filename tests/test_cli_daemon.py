"""The CLI through a daemon: the same commands, the same output as on a local store.

Each test runs the ``storekeeper`` commands in-process three ways on fresh
stores: ``--store ROOT`` (local), ``--store unix://SOCKET`` to storekeeper's
daemon, and (as the oracle of what a daemon answers) to the real nix-daemon.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from conftest import HAVE_NIX, nix_env
from daemon_util import start_daemon, stop_process

from storekeeper.cli.main import main

HELLO = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
BAD = "/nix/store/00000000000000000000000000000000-nothing"


@pytest.fixture
def stores(tmp_path, capsys, monkeypatch):
    """start(kind) -> run(*args, stdin=None) -> (exit code, stdout, stderr)."""
    monkeypatch.delenv("NIX_REMOTE", raising=False)
    monkeypatch.delenv("NIX_STORE_DIR", raising=False)
    procs: list[subprocess.Popen] = []

    def start(kind: str):
        root = str(tmp_path / f"{kind}-root")
        url = root
        if kind != "local":
            sock = str(tmp_path / f"{kind}.sock")
            procs.append(start_daemon(kind, root, sock, nix_env(str(tmp_path))))
            url = f"unix://{sock}"

        def run(*args: str, stdin: bytes | None = None, store: str | None = url):
            if stdin is not None:
                monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
            code = main((["--store", store] if store else []) + list(args))
            out = capsys.readouterr()
            return code, out.out, out.err
        run.url = url
        return run

    yield start
    for proc in procs:
        stop_process(proc)


def kinds() -> list[str]:
    return ["local", "ours"] + (["nix"] if HAVE_NIX else [])


def session(sk, tmp_path) -> list:
    """One command sequence; everything it returns must match across stores."""
    (tmp_path / "hello.txt").write_text("hello\n")
    (tmp_path / "junk.txt").write_text("junk\n")
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "x").write_text("x\n")
    out = []
    code, hello, _ = sk("add", str(tmp_path / "hello.txt"))
    out.append((code, hello))
    out.append(sk("add", "--flat", "--algo", "md5", str(tmp_path / "hello.txt"))[:2])
    out.append(sk("add", "--name", "dir", str(tmp_path / "d"))[:2])
    _, junk, _ = sk("add", str(tmp_path / "junk.txt"))
    junk = junk.strip()
    _, foo, _ = sk("add-text", "foo.txt", "-", stdin=b"bar")
    foo = foo.strip()
    (tmp_path / "t").write_bytes(f"see {foo}".encode())
    code, ref, _ = sk("add-text", "ref.txt", str(tmp_path / "t"), "--ref", foo)
    ref = ref.strip()
    out += [foo, ref]
    for what in ("references", "referrers", "requisites", "hash", "size", "deriver", "outputs"):
        out.append((what, sk("query", f"--{what}", ref, foo)[:2]))
    code, info, _ = sk("path-info", "--json", "-r", "-S", ref)
    objs = json.loads(info)
    for o in objs:
        o.pop("registrationTime", None)
    out.append((code, objs))
    out.append(sk("path-info", HELLO, ref)[:2])
    code, nar, _ = sk("dump", HELLO)
    out.append((code, nar))
    out.append(sk("query", "--hash", BAD))
    out.append(sk("add-text", "dangling.txt", "-", "--ref", BAD, stdin=b"x"))
    code, verify, err = sk("verify", "--check-contents")
    out.append((code, verify, err))
    code, dead, _ = sk("gc", "--print-dead")
    out.append((code, sorted(dead.split())))
    out.append(sk("delete", junk)[:2])
    code, _, err = sk("delete", foo)  # alive: ref refers to it... but nothing roots ref
    out.append((code, "still alive" in err))
    out.append(sk("gc")[:2])
    out.append(sk("query", "--hash", HELLO))
    return out


@pytest.mark.nix
def test_the_same_session_on_a_local_store_and_through_daemons(stores, tmp_path):
    results = {kind: session(stores(kind), tmp_path) for kind in kinds()}
    want = results.pop("local")
    assert want[0] == (0, HELLO + "\n")
    for kind, got in results.items():
        for i, (w, g) in enumerate(zip(want, got)):
            assert g == w, f"{kind}: step {i} differs"
        assert len(got) == len(want)


def test_daemon_url_from_nix_remote_and_local_only_commands(stores, tmp_path, monkeypatch):
    sk = stores("ours")
    (tmp_path / "hello.txt").write_text("hello\n")
    monkeypatch.setenv("NIX_REMOTE", sk.url)
    assert sk("add", str(tmp_path / "hello.txt"), store=None)[:2] == (0, HELLO + "\n")
    code, out, _ = sk("init", store=None)
    assert code == 0 and "served by the daemon" in out and "2.8.0" in out
    code, out, err = sk("why-alive", HELLO, store=None)  # (served: see test_inspection_…)
    assert code == 1 and "is not reachable from any root" in out
    code, out, err = sk("optimise", "--dry-run", store=None)  # (plain optimise: OptimiseStore)
    assert code == 2 and "needs a local store" in err and err.count("\n") == 1  # usage
    code, _, err = sk("gc", "--keep-outputs", store=None)
    assert code == 2 and "daemon's settings" in err
    code, out, _ = sk("roots", "--json", store=None)
    assert code == 0 and json.loads(out) == []
    code, _, err = sk("delete", "--ignore-liveness", HELLO, store=None)
    assert code == 4 and "not allowed to ignore liveness" in err  # refused, told by the message
    monkeypatch.setenv("NIX_REMOTE", f"unix://{tmp_path}/no-such.sock")
    code, _, err = sk("query", "--hash", HELLO, store=None)
    assert code == 1 and "cannot connect to the daemon" in err


def test_inspection_through_our_daemon_answers_as_the_local_store(stores, tmp_path, monkeypatch):
    """stats, gc --dry-run, why-alive, roots (with closure sizes) and du through storekeeper's
    daemon (its own operations) print what the same commands print on the store itself;
    profile list reads the profile where nix-env does (this machine's state dir)."""
    sk = stores("ours")
    root = str(tmp_path / "ours-root")
    for name in ("hello.txt", "junk.txt"):
        (tmp_path / name).write_text(name * 1000)
    (tmp_path / "d").mkdir()
    for i in range(3):  # identical files: the optimiser links them (stats counts them)
        (tmp_path / "d" / f"same{i}").write_text("same\n" * 2000)
    hello = sk("add", str(tmp_path / "hello.txt"))[1].strip()
    junk = sk("add", str(tmp_path / "junk.txt"))[1].strip()
    d = sk("add", str(tmp_path / "d"))[1].strip()
    (tmp_path / "t").write_text(f"see {hello} and {d}")
    ref = sk("add-text", "ref.txt", str(tmp_path / "t"), "--ref", hello, "--ref", d)[1].strip()
    gcroot = f"{root}/nix/var/nix/gcroots/result"
    os.symlink(ref, gcroot)  # (the store dir is logical here: add-root would find it gone)
    code, _, err = sk("optimise")  # OptimiseStore: the daemon links the identical files
    assert code == 0 and "freed by hard-linking 2 files" in err, err

    def both(*args: str):
        local, daemon = sk(*args, store=root), sk(*args)
        assert daemon == local, args
        return local
    stats = json.loads(both("stats", "--json")[1])
    assert stats["distinctContents"] >= 1 and stats["totalReferences"] >= 3
    code, out, err = both("stats")
    assert code == 0 and "bytes saved:" in out
    dry = json.loads(both("gc", "--dry-run", "--json")[1])
    assert dry["paths"] == [junk] and dry["bytesFreed"] >= len("junk.txt") * 1000
    code, out, err = both("gc", "--dry-run")
    assert out == junk + "\n" and f"freeing {dry['bytesFreed']} bytes" in err
    code, out, _ = both("why-alive", d)
    kind = json.loads(both("roots", "--json")[1])[0]["kind"]
    assert code == 0 and out.splitlines()[:2] == [f"{gcroot} ({kind} root)", f"  -> {ref}"]
    assert out.splitlines()[2] == f"  -> {d}   [reference]"
    assert both("why-alive", junk)[0] == 1
    assert both("why-alive", BAD)[0] == 3  # not valid
    roots = [dict(r, ageSeconds=None) for r in json.loads(both("roots", "--json")[1])]
    assert [(r["link"], r["target"]) for r in roots] == [(gcroot, ref)]
    assert roots[0]["closureSize"] > 3 * 2000 * len("same\n")
    for args in (["du", "--json"], ["du", "--json", "--nar", "--by", "user"], ["du"]):
        code, out, _ = both(*args)
        assert code == 0 and out
    du = json.loads(both("du", "--json")[1])
    assert [(r["link"], r["target"]) for r in du["roots"]] == [(gcroot, ref)]
    assert du["livePaths"] == 3 and du["unit"] == "disk"
    profiles = f"{root}/nix/var/nix/profiles"
    os.makedirs(profiles, exist_ok=True)
    for n, target in ((1, hello), (2, ref)):
        os.symlink(target, f"{profiles}/default-{n}-link")
    os.symlink("default-2-link", f"{profiles}/default")
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.nix-profile: the default profile)
    monkeypatch.setenv("NIX_STATE_DIR", f"{root}/nix/var/nix")
    gens = json.loads(both("profile", "list", "--json")[1])
    assert [g["number"] for g in gens] == [1, 2]
    assert sk("query", "--hash", junk)[0] == 0  # the dry runs deleted nothing


@pytest.mark.nix
@pytest.mark.skipif(not HAVE_NIX, reason="real Nix (nix-bin) not installed")
def test_inspection_through_nix_daemon_says_why_not_in_one_line(stores, tmp_path):
    sk = stores("nix")
    (tmp_path / "a.txt").write_text("a\n")
    a = sk("add", str(tmp_path / "a.txt"))[1].strip()
    for args, op in ((["stats"], 1200), (["gc", "--dry-run"], 1201), (["why-alive", a], 1202),
                     (["du"], 1203)):
        code, out, err = sk(*args)
        assert (code, out) == (1, ""), args
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert f"operation {op}" in err and "not storekeeper's daemon" in err
    code, out, err = sk("roots")
    assert code == 0 and "without kinds, owners and closure sizes" in err
    code, out, err = sk("optimise")  # Nix's own OptimiseStore
    assert code == 0 and "freed by hard-linking" in err, err


@pytest.mark.nix
@pytest.mark.skipif(not HAVE_NIX, reason="real Nix (nix-bin) not installed")
def test_roots_through_a_daemon(stores, tmp_path):
    for kind in ("ours", "nix"):
        sk = stores(kind)
        (tmp_path / "a.txt").write_text("a\n")
        _, a, _ = sk("add", str(tmp_path / "a.txt"))
        a = a.strip()
        env = nix_env(str(tmp_path))
        env["NIX_REMOTE"] = sk.url + f"?root={tmp_path}/{kind}-root"
        link = tmp_path / f"result-{kind}"
        subprocess.run(["nix-store", "-r", a, "--add-root", str(link), "--indirect"], env=env,
                       check=True, capture_output=True, timeout=60)
        code, out, _ = sk("roots")
        assert code == 0 and f"{link} -> {a}\n" in out
        code, out, _ = sk("gc", "--print-dead")
        assert a not in out.split()


@pytest.mark.nix
@pytest.mark.skipif(not HAVE_NIX, reason="real Nix (nix-bin) not installed")
def test_a_custom_store_dir_through_daemons(tmp_path, capsys, monkeypatch):
    """The client parses paths against its own store dir (``?store=``), like Nix clients."""
    monkeypatch.delenv("NIX_REMOTE", raising=False)
    store_dir = str(tmp_path / "s" / "store")
    got = []
    for kind in kinds()[1:]:
        url = f"local?store={store_dir}&state={tmp_path}/{kind}-state&log={tmp_path}/{kind}-log"
        if kind == "nix":  # (its files elsewhere than ours)
            url += f"&real={tmp_path}/{kind}-real"
        sock = str(tmp_path / f"{kind}.sock")
        proc = start_daemon(kind, url, sock, nix_env(str(tmp_path)))
        try:
            client = f"unix://{sock}?store={store_dir}"
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"custom")))
            assert main(["--store", client, "add-text", "c.txt", "-"]) == 0
            path = capsys.readouterr().out.strip()
            assert path.startswith(store_dir + "/") and path.endswith("-c.txt")
            assert main(["--store", client, "query", "--size", path]) == 0
            got.append((path, capsys.readouterr().out))
            # Without ?store= the client expects /nix/store and refuses the daemon's paths.
            assert main(["--store", f"unix://{sock}", "query", "--hash", path]) == 2
            assert "not in the Nix store" in capsys.readouterr().err
        finally:
            stop_process(proc)
    assert len(set(got)) == 1
