"""Per-user roots through storekeeper's daemon: the client's three steps before a GC,
links that are refused, unreadable indirect roots, and users who may touch only their own.

The daemons here serve a store whose store dir is real on this machine
(``local?store=…``), so the test's processes can run from store paths, with
``runtime-roots = client``: only what clients report protects a running program.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import HAVE_NIX, nix_env
from daemon_util import start_daemon, stop_process
from storekeeper.cli.main import main
from storekeeper.client import RemoteStore
from storekeeper.client.rootsync import (ClientPaths, RootRefused, add_root, read_entries,
                                         open_roots_dir, sync_roots)
from storekeeper.client.userroots import NotStorekeeperDaemon, RemoteUserRoots
from storekeeper.store.fsutil import symlink_atomic


#: the CLI as its console script would run it
SK = [sys.executable, "-c", "import sys; from storekeeper.cli.main import main; sys.exit(main())"]


class Setup:
    """A daemon on a custom-layout store, and a client environment (XDG_STATE_HOME) for it."""

    def __init__(self, base: str, conf: str = "", kind: str = "ours") -> None:
        self.base = base
        self.store_dir = os.path.join(base, "store")
        store_url = (f"local?store={self.store_dir}&state={base}/state&log={base}/log"
                     if kind == "ours" else os.path.join(base, "nixroot"))
        self.env = nix_env(os.path.join(base, "env"))
        with open(os.path.join(self.env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
            f.write(conf)
        self.sock = os.path.join(base, "d.sock")
        self.proc = start_daemon(kind, store_url, self.sock, self.env)
        self.url = f"unix://{self.sock}?store={self.store_dir}" if kind == "ours" else f"unix://{self.sock}"
        self.paths = ClientPaths(os.path.join(base, "xdg", "storekeeper"))

    def client(self) -> RemoteStore:
        return RemoteStore(self.sock, self.store_dir if os.path.isdir(self.store_dir) else None,
                           timeout=30, log=lambda m: None)

    def sk(self, *args: str) -> tuple[int, str, str]:
        """The CLI in a subprocess, as the test's user, with this setup's client environment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NIX_", "XDG_"))}
        env["XDG_STATE_HOME"] = os.path.join(self.base, "xdg")
        r = subprocess.run([*SK, "--store", self.url, *args],
                           env=env, capture_output=True, text=True, timeout=120)
        return r.returncode, r.stdout, r.stderr

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def setups(tmp_path):
    made: list[Setup] = []

    def make(name: str = "s", conf: str = "runtime-roots = client\nruntime-root-lease = 600\n",
             kind: str = "ours") -> Setup:
        s = Setup(str(tmp_path / name), conf, kind)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def _holder(argv: list[str], **kw) -> subprocess.Popen:
    """A process that uses a store path until the test ends (bounded: 120 s)."""
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def _dir_with_file(tmp, name: str) -> str:
    d = os.path.join(tmp, name)
    os.makedirs(d)
    with open(os.path.join(d, "data"), "w") as f:
        f.write(name + "\n")
    return d


# --- the three steps ---------------------------------------------------------------------

# What a collection deletes after `storekeeper gc` with one step of the flow left out:
#   a  add-root into the roots dir, left there                     -> always kept
#   b  add-root ./result-b (indirect), then `rm result-b`          -> unregistered by step 3
#   c  add-root roots/c, then `rm roots/c`, but a process reads c  -> kept: a runtime root (2),
#                                                                    so step 3 keeps it registered
#   d  never a root, a process has its cwd in d                     -> kept by the lease (2+3)
#   e  nothing                                                      -> always deleted
EXPECTED = {None: {"b", "e"}, "clean": {"b", "e"}, "runtime": {"b", "c", "d", "e"},
            "sync": {"d", "e"}}


@pytest.mark.parametrize("skip", [None, "clean", "runtime", "sync"])
def test_three_steps_before_a_gc_each_one_matters(setups, tmp_path, skip):
    s = setups()
    src = tmp_path / "src"
    with s.client() as c:
        p = {n: c.print_path(c.add_path(_dir_with_file(str(src), n)).path) for n in "abcde"}
    assert s.sk("add-root", os.path.join(s.paths.roots_dir, "a"), p["a"])[0] == 0
    result_b = str(tmp_path / "result-b")
    code, out, err = s.sk("add-root", result_b, p["b"])
    assert code == 0 and out.strip() == result_b, err
    assert os.readlink(result_b) == p["b"]
    assert s.sk("add-root", os.path.join(s.paths.roots_dir, "c"), p["c"])[0] == 0
    with open(os.path.join(s.paths.state_file)) as f:
        assert len(json.load(f)["daemons"][s.url.split("?")[0]]) == 3
    os.unlink(result_b)
    os.unlink(os.path.join(s.paths.roots_dir, "c"))
    holders = [_holder(["sleep", "120"], stdin=open(os.path.join(p["c"], "data"))),
               _holder(["sleep", "120"], cwd=p["d"])]
    try:
        args = ["gc", "--json"] + (["--skip-step", skip] if skip else [])
        code, out, err = s.sk(*args)
        assert code == 0, err
        deleted = {os.path.basename(q).split("-", 1)[1] for q in json.loads(out)["paths"]}
        assert deleted == EXPECTED[skip], err
        broken_left = any(e.state == "broken" for e in _entries(s))
        assert broken_left == (skip == "clean")
        if skip is None:
            assert "kept 1 gone root(s) registered: in use by a running process" in err
            assert "2 runtime root(s) held for 600 s" in err
            assert "removed broken root link" in err and "unregistered 1 root(s)" in err
    finally:
        for h in holders:
            h.kill()
            h.wait()
    if skip is None:
        # Once the programs are gone, the next run drops c's registration and ends the lease.
        code, out, err = s.sk("gc", "--json")
        deleted = {os.path.basename(q).split("-", 1)[1] for q in json.loads(out)["paths"]}
        assert code == 0 and deleted == {"c", "d"}, err


def _entries(s: Setup):
    fd = open_roots_dir(s.paths)
    try:
        with s.client() as c:
            return read_entries(s.paths, c.store_dir, fd)
    finally:
        os.close(fd)


# --- links that are refused ------------------------------------------------------------------

def test_links_outside_the_store_are_refused_and_kept(setups, tmp_path):
    s = setups()
    with s.client() as c:
        kept = c.print_path(c.add_text("kept", b"k").path)
    os.makedirs(s.paths.roots_dir, mode=0o700)
    rd = s.paths.roots_dir
    os.symlink("/etc/passwd", os.path.join(rd, "passwd"))           # a file outside
    elsewhere = tmp_path / "elsewhere"
    os.symlink("/etc", elsewhere)
    os.symlink(str(elsewhere), os.path.join(rd, "via-link"))          # a link leading outside
    os.symlink(kept, os.path.join(rd, "good"))
    with open(os.path.join(rd, "plain"), "w") as f:
        f.write(kept)                                                # not a link at all
    code, _, err = s.sk("sync-roots")
    assert code == 0, err
    assert "ignoring root '" + os.path.join(rd, "passwd") + "': '/etc/passwd' is not a symlink into the store" in err
    assert f"ignoring root '{os.path.join(rd, 'via-link')}': it points outside the store" in err
    assert f"ignoring '{os.path.join(rd, 'plain')}': not a symlink" in err
    assert "registered 1 root(s)" in err
    assert sorted(os.listdir(rd)) == ["good", "passwd", "plain", "via-link"]  # refused, not removed
    with s.client() as c:
        regs = [r for r in RemoteUserRoots(c).overview()["roots"] if r["kind"] == "registered"]
    assert [(r["link"].split(":", 1)[1], r["target"]) for r in regs] == [(os.path.join(rd, "good"), kept)]
    code, _, err = s.sk("add-root", str(tmp_path / "r"), "/etc/passwd")
    assert code == 1 and "not in the Nix store" in err and err.count("\n") == 1
    assert not os.path.lexists(tmp_path / "r")


def test_a_link_swapped_between_check_and_use_is_refused(setups, tmp_path, monkeypatch):
    s = setups()
    with s.client() as c:
        mine = c.add_text("mine", b"m").path
        other = c.print_path(c.add_text("other", b"o").path)
    link = str(tmp_path / "result")

    def swap(entries):  # after the client checked the link, before the daemon records it
        symlink_atomic(other, link)

    with s.client() as c:
        api = RemoteUserRoots(c)
        with pytest.raises(RootRefused, match="changed while it was being registered"):
            add_root(c, api, link, mine, s.paths, after_check=swap)
        assert [r for r in api.overview()["roots"] if r["kind"] == "registered"] == []
    with open(s.paths.state_file) as f:
        assert json.load(f)["daemons"][c.url] == {}
    # The same in the sync before a GC: the swapped entry is refused, the other one taken.
    rd = s.paths.roots_dir
    with s.client() as c:
        keep = c.print_path(c.add_text("keep", b"k").path)
    os.symlink(keep, os.path.join(rd, "keep"))
    os.unlink(link)
    os.symlink(c.print_path(mine), os.path.join(rd, "swapped"))
    with s.client() as c:
        api = RemoteUserRoots(c)
        report = sync_roots(c, api, s.paths, skip={"runtime"},
                            after_check=lambda es: symlink_atomic(other, os.path.join(rd, "swapped")))
        regs = {r["target"] for r in api.overview()["roots"] if r["kind"] == "registered"}
    assert regs == {keep}
    assert any("refusing root '" + os.path.join(rd, "swapped") + "': it changed" in m for m in report.refused)


# --- the real nix-daemon -----------------------------------------------------------------------

@pytest.mark.nix
@pytest.mark.skipif(not HAVE_NIX, reason="real Nix (nix-bin) not installed")
def test_against_the_real_nix_daemon_the_client_says_why(setups, tmp_path):
    s = setups(kind="nix", conf="")
    (tmp_path / "f").write_text("f\n")
    code, out, _ = s.sk("add", str(tmp_path / "f"))
    assert code == 0
    code, _, err = s.sk("add-root", str(tmp_path / "result"), out.strip())
    assert code == 1 and err.count("\n") == 1
    assert "does not know storekeeper's per-user roots (operation 100" in err
    assert "nix-store --add-root" in err
    assert not os.path.lexists(tmp_path / "result")  # nothing made before the daemon said no
    code, out, err = s.sk("gc")  # the collection still runs, with a note
    assert code == 0 and "store paths deleted" in out
    assert "collecting with the daemon's own roots only" in err


# --- unresolvable indirect roots -----------------------------------------------------------------

@pytest.mark.nix
@pytest.mark.skipif(not HAVE_NIX, reason="real Nix (nix-bin) not installed")
def test_unreadable_indirect_root_is_kept_shown_and_dropped_after_its_age(setups, tmp_path):
    """A real Nix client adds indirect roots; their directory goes away (an unmounted NFS
    home).  Each keeps its path until indirect-root-grace passes or its owner unregisters it."""
    grace = 6
    s = setups(conf=f"runtime-roots = client\nindirect-root-grace = {grace}\n")
    home = tmp_path / "nfs-home"
    home.mkdir()
    with s.client() as c:
        p = {n: c.print_path(c.add_text(n, n.encode()).path) for n in ("aged", "unregistered")}
    env = dict(s.env, NIX_REMOTE=f"unix://{s.sock}", NIX_STORE_DIR=s.store_dir)
    for n, path in p.items():
        r = subprocess.run(["nix-store", "-r", path, "--add-root", str(home / n), "--indirect"],
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    shutil.rmtree(home)  # the home is gone; the daemon cannot tell whether the links are
    t0 = time.time()
    code, out, err = s.sk("gc", "--json")
    assert code == 0 and json.loads(out)["paths"] == [], err
    code, out, _ = s.sk("roots", "--json")
    unres = {r["target"]: r for r in json.loads(out) if r["kind"] == "indirect-unresolved"}
    assert set(unres) == set(p.values())
    for r in unres.values():
        assert t0 - 5 <= r["firstMissed"] <= time.time() and r["expires"] == r["firstMissed"] + grace
    code, out, _ = s.sk("roots")
    assert f"{home / 'aged'} -> {p['aged']}  [unreadable since " in out and ", kept until " in out
    # its owner (this user added it) unregisters one: gone at once
    code, _, err = s.sk("remove-root", str(home / "unregistered"))
    assert code == 0 and f"unregistered '{home / 'unregistered'}'" in err
    code, out, err = s.sk("gc", "--json")
    assert json.loads(out)["paths"] == [p["unregistered"]], err
    # the other one is kept until its age passes, then dropped with its gcroots/auto link
    time.sleep(max(0.0, t0 + grace + 0.5 - time.time()))
    code, out, err = s.sk("gc", "--json")
    assert json.loads(out)["paths"] == [p["aged"]], err
    assert os.listdir(os.path.join(s.base, "state", "gcroots", "auto")) == []
