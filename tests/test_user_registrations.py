"""Per-user roots through storekeeper's daemon: the client's three steps before a GC,
links that are refused, unreadable indirect roots, and users who may touch only their own.

The daemons here serve a store whose store dir is real on this machine
(``local?store=…``), so the test's processes can run from store paths, with
``runtime-roots = client``: only what clients report protects a running program.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import HAVE_NIX, nix_env
from daemon_util import start_daemon, stop_process
from realusers import as_user, needs_root_users, real_users, sk_as, start_daemon_as, stop

from storekeeper.client import RemoteStore
from storekeeper.client.rootsync import (
    ClientPaths,
    RootRefused,
    add_root,
    open_roots_dir,
    read_entries,
    sync_roots,
)
from storekeeper.client.userroots import RemoteUserRoots
from storekeeper.fs.atomic import symlink_atomic
from storekeeper.store.roots.registrations import UserRoots

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
    if skip is None:  # a user without roots: the client creates nothing in their home
        assert s.sk("gc", "--print-dead")[0] == 0 and s.sk("sync-roots")[0] == 0
        assert not os.path.exists(os.path.dirname(s.paths.base))
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
    if os.geteuid() == 0:  # one that is not the user's own (only root can plant it)
        os.symlink(kept, os.path.join(rd, "planted"))
        os.lchown(os.path.join(rd, "planted"), 4321, 4321)
    code, _, err = s.sk("sync-roots")
    assert code == 0, err
    if os.geteuid() == 0:
        assert f"ignoring root '{os.path.join(rd, 'planted')}': it is not yours" in err
        os.unlink(os.path.join(rd, "planted"))
    assert "ignoring root '" + os.path.join(rd, "passwd") + "': '/etc/passwd' is not a symlink into the store" in err
    assert f"ignoring root '{os.path.join(rd, 'via-link')}': it points outside the store" in err
    assert f"ignoring '{os.path.join(rd, 'plain')}': not a symlink" in err
    assert "registered 1 root(s)" in err
    assert sorted(os.listdir(rd)) == ["good", "passwd", "plain", "via-link"]  # refused, not removed
    with s.client() as c:
        regs = [r for r in RemoteUserRoots(c).overview()["roots"] if r["kind"] == "registered"]
    assert [(r["link"].split(":", 1)[1], r["target"]) for r in regs] == [(os.path.join(rd, "good"), kept)]
    code, _, err = s.sk("add-root", str(tmp_path / "r"), "/etc/passwd")
    assert code == 2 and "not in the Nix store" in err and err.count("\n") == 1
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
        assert json.load(f)["daemons"].get(c.url) is None
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
    # The home was on another file system (an NFS mount): the records say so ...
    ind = os.path.join(s.base, "state", "storekeeper", "indirect")
    for name in os.listdir(ind):
        if not name.startswith("."):
            with open(os.path.join(ind, name)) as f:
                rec = json.load(f)
            rec["dev"] = os.stat(tmp_path).st_dev + 1
            with open(os.path.join(ind, name), "w") as f:
                json.dump(rec, f)
    shutil.rmtree(home)  # ... and is gone (unmounted); the daemon cannot tell whether the links are
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


# --- real users: each touches only their own roots ------------------------------------------------

_RAW = """
import json, sys
from storekeeper.client import RemoteStore
from storekeeper.client.userroots import RemoteUserRoots
from storekeeper.formats.wire import Op, WireWriter
sock, store_dir, action, *args = sys.argv[1:]
with RemoteStore(sock, store_dir, log=lambda m: None, timeout=30) as c:
    api = RemoteUserRoots(c)
    if action == "unregister":
        print(json.dumps(api.unregister(args)))
    elif action == "register":
        print(json.dumps(api.register([(args[0], c.parse_path(args[1]))])))
    elif action == "add-indirect":
        with c._exchange(WireWriter().u64(Op.AddIndirectRoot).string(args[0])) as r:
            r.u64()
"""


@needs_root_users
def test_users_register_and_unregister_only_their_own_roots(shared_dir):
    with real_users(shared_dir, "d", "a", "b") as users:
        daemon, alice, bob = users["d"], users["a"], users["b"]
        proc, sock, url = start_daemon_as(daemon, os.path.join(shared_dir, "srv"),
                                          "runtime-roots = client\n")
        store_dir = url.split("?store=")[1]
        try:
            def raw(user, *args):
                r = as_user(user, [sys.executable, "-c", _RAW, sock, store_dir, *args])
                assert r.returncode == 0, r.stderr
                return json.loads(r.stdout) if r.stdout.strip() else None

            paths = {}
            for tag, user in (("pa", alice), ("pb", bob), ("pi", bob)):
                d = os.path.join(user.home, tag)
                assert as_user(user, ["mkdir", d]).returncode == 0
                assert as_user(user, ["sh", "-c", f"echo {tag} > {d}/data"]).returncode == 0
                r = sk_as(user, url, "add", d)
                assert r.returncode == 0, r.stderr
                paths[tag] = r.stdout.strip()
            bob_link = os.path.join(bob.home, "result")
            r = sk_as(bob, url, "add-root", bob_link, paths["pb"])
            assert r.returncode == 0, r.stderr
            r = sk_as(alice, url, "add-root", os.path.join(alice.home, "mine"), paths["pa"])
            assert r.returncode == 0, r.stderr
            bob_name = f"{socket.gethostname()}:{bob_link}"
            # bob's client made its roots dir (0700) and record in his home; the daemon's
            # registrations are per uid, in its state dir, written by the daemon's user
            assert os.stat(os.path.join(bob.home, ".local/state/storekeeper/roots")).st_mode & 0o777 == 0o700
            state = os.path.join(shared_dir, "srv", "state")
            regs = UserRoots(state).registrations()
            assert {(r.uid, r.path) for r in regs} == {(bob.pw_uid, paths["pb"]), (alice.pw_uid, paths["pa"])}
            st = os.stat(os.path.join(state, "storekeeper", "registrations", str(bob.pw_uid)))
            assert st.st_uid == daemon.pw_uid and st.st_mode & 0o777 == 0o600

            # alice tries to drop bob's registration, and to take his name
            assert raw(alice, "unregister", bob_name, bob_link) == []
            assert raw(alice, "register", bob_name, paths["pa"]) == []
            assert raw(alice, "unregister", bob_name) == [bob_name]  # her own entry of that name
            regs = UserRoots(state).registrations()
            assert [(r.uid, r.name, r.path) for r in regs if r.uid == bob.pw_uid] == \
                [(bob.pw_uid, bob_name, paths["pb"])]
            # ... or the indirect root bob added (as a Nix client does)
            ind_link = os.path.join(bob.home, "result-i")
            assert as_user(bob, ["ln", "-s", paths["pi"], ind_link]).returncode == 0
            raw(bob, "add-indirect", ind_link)
            r = sk_as(alice, url, "remove-root", ind_link)
            assert r.returncode == 0 and "no root of yours" in r.stderr
            auto = os.path.join(state, "gcroots", "auto")
            assert [os.readlink(os.path.join(auto, n)) for n in os.listdir(auto)] == [ind_link]
            # alice sees bob's registration, but not its name
            r = sk_as(alice, url, "roots", "--json")
            regs = {x["target"]: x for x in json.loads(r.stdout) if x["kind"] == "registered"}
            assert regs[paths["pb"]]["link"] == "{censored}" and regs[paths["pb"]]["owner"] == bob.pw_name
            assert regs[paths["pa"]]["link"].endswith(":" + os.path.join(alice.home, "mine"))
            # a collection keeps both users' registered roots; the daemon could not read
            # bob's home, so his indirect root never resolved and holds nothing
            r = sk_as(alice, url, "gc", "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["paths"] == [paths["pi"]]
            # ... which is not dropped silently: listed, with when it was first missed
            r = sk_as(bob, url, "roots", "--json")
            unres = [x for x in json.loads(r.stdout) if x["kind"] == "indirect-unresolved"]
            assert [(x["link"], x["target"]) for x in unres] == [(ind_link, "")]
            assert unres[0]["firstMissed"] > 0 and unres[0]["expires"] > unres[0]["firstMissed"]
            r = sk_as(bob, url, "roots")
            assert f"{ind_link} -> ?  [unreadable since " in r.stdout
            # bob may drop his own claim, which removes the root
            r = sk_as(bob, url, "remove-root", ind_link)
            assert r.returncode == 0 and f"unregistered '{ind_link}'" in r.stderr
            assert os.listdir(auto) == []
        finally:
            stop(proc)


@needs_root_users
def test_inspection_through_the_daemon_hides_other_users_roots(shared_dir):
    """why-alive, gc --dry-run, stats and roots through the daemon as untrusted users: each
    sees store paths and sizes, never the names of another user's roots ({censored})."""
    with real_users(shared_dir, "d", "a", "b") as users:
        daemon, alice, bob = users["d"], users["a"], users["b"]
        proc, sock, url = start_daemon_as(daemon, os.path.join(shared_dir, "srv"),
                                          "runtime-roots = client\n")
        try:
            paths = {}
            for tag, user in (("pa", alice), ("pb", bob)):
                f = os.path.join(user.home, tag)
                assert as_user(user, ["sh", "-c", f"echo {tag} > {f}"]).returncode == 0
                r = sk_as(user, url, "add", f)
                assert r.returncode == 0, r.stderr
                paths[tag] = r.stdout.strip()
            mine = os.path.join(alice.home, "mine")
            r = sk_as(alice, url, "add-root", mine, paths["pa"])
            assert r.returncode == 0, r.stderr
            r = sk_as(alice, url, "why-alive", paths["pa"])
            assert r.returncode == 0 and r.stdout.splitlines()[0].endswith(f":{mine} (registered root)")
            r = sk_as(bob, url, "why-alive", paths["pa"])
            assert r.returncode == 0, r.stderr
            assert r.stdout.splitlines() == ["{censored} (registered root)", f"  -> {paths['pa']}"]
            r = sk_as(bob, url, "gc", "--dry-run", "--json")
            assert r.returncode == 0, r.stderr
            dry = json.loads(r.stdout)
            assert dry["paths"] == [paths["pb"]] and dry["bytesFreed"] > 0
            assert alice.home not in r.stdout + r.stderr
            r = sk_as(bob, url, "stats", "--json")
            assert r.returncode == 0 and set(json.loads(r.stdout)) >= {"distinctContents", "bytesSaved"}
            r = sk_as(bob, url, "roots", "--json")
            assert [(x["link"], x["target"]) for x in json.loads(r.stdout)] == [("{censored}", paths["pa"])]
            assert sk_as(bob, url, "query", "--hash", paths["pb"]).returncode == 0  # still there
        finally:
            stop(proc)


# --- runtime-roots: who finds what a running program uses -----------------------------------------

@pytest.mark.parametrize("mode", ["proc", "client", "both"])
def test_runtime_roots_setting_chooses_proc_scanning_or_leases(tmp_path, mode):
    """``proc``: the GC scans /proc and ignores client leases; ``client``: it holds what
    clients leased and does not scan; ``both``."""
    from storekeeper.api import DELETE_DEAD, GCOptions
    from storekeeper.formats.url import LocalLayout
    from storekeeper.store.local import LocalStore
    from storekeeper.store.settings import StoreSettings
    layout = LocalLayout.custom(str(tmp_path / "store"), str(tmp_path / "state"), str(tmp_path / "log"))
    settings = StoreSettings().with_settings([("runtime-roots", mode), ("runtime-root-lease", "60")])
    with LocalStore(layout, settings=settings) as s:
        used = s.print_path(s.add_path(_dir_with_file(str(tmp_path / "src"), "used")).path)
        leased = s.print_path(s.add_text("leased", b"l").path)
        UserRoots(s.state_dir).set_lease(os.getuid(), "elsewhere", [leased], 60)
    holder = _holder(["sleep", "120"], cwd=used)
    try:
        with LocalStore(layout, settings=settings) as s:
            deleted = set(s.collect_garbage(GCOptions(action=DELETE_DEAD)).paths)
    finally:
        holder.kill()
        holder.wait()
    assert deleted == {"proc": {leased}, "client": {used}, "both": set()}[mode]


def test_runtime_roots_setting_is_checked():
    from storekeeper.errors import StoreError
    from storekeeper.store.settings import StoreSettings
    with pytest.raises(StoreError, match="'sometimes' is not one of proc, client, both"):
        StoreSettings().with_settings([("runtime-roots", "sometimes")])


def test_leases_expire_and_a_new_report_replaces_the_old(tmp_path):
    ur = UserRoots(str(tmp_path))
    ur.set_lease(1000, "hostA", ["/s/a"], 10, now=100)
    ur.set_lease(1000, "hostB", ["/s/b"], 10, now=100)
    ur.set_lease(1001, "hostA", ["/s/c"], 10, now=100)
    assert {(x.uid, x.name, x.paths) for x in ur.leases(now=105)} == \
        {(1000, "hostA", ("/s/a",)), (1000, "hostB", ("/s/b",)), (1001, "hostA", ("/s/c",))}
    ur.set_lease(1000, "hostA", ["/s/d"], 10, now=108)     # hostA reports again
    assert {x.paths for x in ur.leases(now=109, uid=1000)} == {("/s/d",), ("/s/b",)}
    assert {x.paths for x in ur.leases(now=111)} == {("/s/d",)}  # the others expired
    ur.set_lease(1000, "hostA", [], 10, now=112)            # nothing runs any more
    assert ur.leases(now=112) == []
    ur.set_lease(1000, "hostA", ["/s/e"], 10, now=113)
    os.chmod(os.path.join(str(tmp_path), "storekeeper", "leases", "1000"), 0o666)
    msgs: list[str] = []  # a file others could have written is not trusted
    assert ur.leases(now=114, messages=msgs) == [] and "not a file written by the daemon" in msgs[0]
    ur.set_lease(1000, "hostA", ["/s/e"], 10, now=115)       # rewritten by the daemon: trusted
    assert [x.paths for x in ur.leases(now=116)] == [("/s/e",)]


def test_a_root_whose_directory_was_removed_is_dropped_at_once(setups, tmp_path):
    """``nix-build --no-out-link`` makes its root in a temp dir and removes the dir: the
    link is definitely gone (its directory vanished from a file system that is still
    there), so the path is not kept for indirect-root-grace (it was kept 14 days)."""
    s = setups(conf="runtime-roots = client\n")
    tmp = tmp_path / "nix-build-123"
    tmp.mkdir()
    with s.client() as c:
        path = c.print_path(c.add_text("no-out-link", b"x").path)
    env = dict(s.env, NIX_REMOTE=f"unix://{s.sock}", NIX_STORE_DIR=s.store_dir)
    r = subprocess.run(["nix-store", "-r", path, "--add-root", str(tmp / "result"), "--indirect"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    code, out, err = s.sk("gc", "--json")
    assert json.loads(out)["paths"] == [], err  # alive while the link is there
    shutil.rmtree(tmp)
    code, out, err = s.sk("gc", "--json")
    assert code == 0 and json.loads(out)["paths"] == [path], err
    assert os.listdir(os.path.join(s.base, "state", "gcroots", "auto")) == []
