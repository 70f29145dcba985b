"""``storekeeper du``: per-root exclusive/shared bytes against real Nix (closure sizes, what a GC
frees once a root goes) and GNU du (inodes counted once), and the HTML treemap in Chromium."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from conftest import needs_nix, nix_env, run_nix

from storekeeper.store.du.space import holder_masks
from storekeeper.store.gc.graph import Graph

MKSTORE = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench",
                                        "mkstore.py"))
SK = [sys.executable, "-m", "storekeeper.cli.main"]
needs_mkstore = pytest.mark.skipif(not os.path.exists(MKSTORE),
                                   reason="../shared/bench/mkstore.py not present")


def sk_json(root: str, *args: str) -> dict:
    r = subprocess.run(SK + ["--store", root, "du", "--json", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _fake_graph(n: int, refs: dict[int, list[int]], deriver: dict[int, int],
                outputs: dict[int, list[int]]) -> Graph:
    return Graph.from_edges(n, refs, deriver, outputs)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("keep", [(False, False), (True, True)])
def test_holder_masks_equal_per_root_closures(seed, keep):
    """The one-pass masks say exactly which roots' closures hold each path, also when
    keep-outputs/keep-derivations edges close cycles (drv → out → drv)."""
    rng = random.Random(seed)
    n = 300
    refs = {i: [rng.randrange(i + 1) for _ in range(rng.randrange(4))] for i in range(n)}
    drvs = rng.sample(range(1, n), 40)  # (id 0 is never a path: 0 is "no deriver")
    deriver = {o: d for d in drvs for o in rng.sample(range(n), 2)}
    outputs: dict[int, list[int]] = {}
    for o, d in deriver.items():
        outputs.setdefault(d, []).append(o)
    g = _fake_graph(n, refs, deriver, outputs)
    targets = rng.sample(range(n), 12)
    masks = holder_masks(g, targets, *keep)
    expected: dict[int, int] = {}
    for bit, t in enumerate(targets):
        for i in g.closure_ids([t], *keep):
            expected[i] = expected.get(i, 0) | 1 << bit
    assert masks == expected


def _store(tmp_path, paths: int = 200, roots: int = 6, seed: int = 5) -> tuple[str, dict]:
    root = str(tmp_path / "s")
    env = nix_env(str(tmp_path))
    subprocess.run([sys.executable, MKSTORE, root, "--paths", str(paths), "--roots", str(roots),
                    "--seed", str(seed), "--quiet"], check=True, env=env, capture_output=True,
                   timeout=300)
    return root, env


def _nix(tmp_path, root: str, *args: str) -> str:
    return run_nix(["nix-store", "--store", root, *args], str(tmp_path)).stdout.decode()


def _nar_sizes(tmp_path, root: str, paths: list[str]) -> dict[str, int]:
    if not paths:
        return {}
    out = run_nix(["nix", "--extra-experimental-features", "nix-command", "path-info", "--store",
                   root, "--json", *paths], str(tmp_path)).stdout
    return {o["path"]: o["narSize"] for o in json.loads(out)}


def _without(root: str, rs: list[dict], tmp_path) -> set[str]:
    """`nix-store --gc --print-dead` with the links of ``rs`` gone; everything put back after
    (also the gcroots/auto links Nix drops once their target is gone)."""
    auto = os.path.join(root, "nix/var/nix/gcroots/auto")
    autos = {n: os.readlink(os.path.join(auto, n)) for n in os.listdir(auto)}
    saved = [(r["link"], os.readlink(r["link"])) for r in rs]
    for link, _ in saved:
        os.unlink(link)
    try:
        return set(_nix(tmp_path, root, "--gc", "--print-dead").split())
    finally:
        for link, to in saved:
            os.symlink(to, link)
        for n, to in autos.items():
            if not os.path.lexists(os.path.join(auto, n)):
                os.symlink(to, os.path.join(auto, n))


def _roots_by_target(report: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in report["roots"]:
        out.setdefault(r["target"], []).append(r)
    return out


@needs_nix
@needs_mkstore
@pytest.mark.nix
def test_nar_closures_and_exclusive_bytes_match_nix(tmp_path):
    """closureBytes = `nix path-info -S`; exclusiveBytes = the NAR bytes of what
    `nix-store --gc --print-dead` adds once every link to that root's target is gone."""
    root, _ = _store(tmp_path)
    report = sk_json(root, "--nar")
    by_target = _roots_by_target(report)
    assert len(by_target) >= 3
    for target, rs in by_target.items():
        out = run_nix(["nix", "--extra-experimental-features", "nix-command", "path-info", "-S",
                       "--json", "--store", root, target], str(tmp_path)).stdout
        assert rs[0]["closureBytes"] == json.loads(out)[0]["closureSize"]
    dead = set(_nix(tmp_path, root, "--gc", "--print-dead").split())
    live = set(_nix(tmp_path, root, "--gc", "--print-live").split())
    assert report["livePaths"] == len(live)
    assert report["liveBytes"] == sum(_nar_sizes(tmp_path, root, sorted(live)).values())
    checked = 0
    for target, rs in by_target.items():
        if any(not r["link"].startswith(root) for r in rs):
            continue
        freed = sorted(_without(root, rs, tmp_path) - dead)
        assert rs[0]["exclusiveBytes"] == sum(_nar_sizes(tmp_path, root, freed).values()), target
        assert rs[0]["exclusivePaths"] == len(freed)
        checked += 1
    assert checked >= 3
    shared = report["sharedBytes"]
    assert report["exclusiveBytes"] + shared == report["liveBytes"]
    # one owner (root) holds everything, alone
    owners = sk_json(root, "--nar", "--by", "user")["owners"]
    assert [(o["closureBytes"], o["exclusiveBytes"], o["closurePaths"]) for o in owners] == \
        [(report["liveBytes"], report["liveBytes"], len(live))]


def _gnu_du(paths: list[str]) -> int:
    """GNU du's total over ``paths``: an inode met twice is counted at its first path only."""
    if not paths:
        return 0
    out = subprocess.run(["du", "-s", "-c", "-B1", *paths], capture_output=True, text=True,
                         check=True).stdout
    return int(out.splitlines()[-1].split()[0])


@needs_nix
@needs_mkstore
@pytest.mark.nix
def test_disk_bytes_count_hard_links_once_like_gnu_du(tmp_path):
    root, _ = _store(tmp_path, paths=150, seed=7)
    _nix(tmp_path, root, "--optimise")  # real Nix hard-links duplicates through .links
    report = sk_json(root)
    real = lambda p: os.path.join(root, p.lstrip("/"))  # noqa: E731
    live = sorted(real(p) for p in _nix(tmp_path, root, "--gc", "--print-live").split())
    assert report["liveBytes"] == _gnu_du(live)
    dead = set(_nix(tmp_path, root, "--gc", "--print-dead").split())
    linked_inodes = 0
    for target, rs in _roots_by_target(report).items():
        freed = _without(root, rs, tmp_path) - dead
        kept = [p for p in live if "/" + os.path.relpath(p, root) not in freed]
        # bytes du adds for the freed paths after everything that stays
        expected = _gnu_du(kept + [real(p) for p in sorted(freed)]) - _gnu_du(kept)
        assert rs[0]["exclusiveBytes"] == expected, target
        linked_inodes += 1
    assert linked_inodes >= 3
    # the store really has shared inodes, or this test proves nothing about them
    assert _gnu_du(live) < sum(_gnu_du([p]) for p in live)


class _Nodes(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "node" in (a.get("class") or "").split():
            self.nodes.append({k: v or "" for k, v in a.items()})


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@needs_nix
@needs_mkstore
@pytest.mark.nix
@pytest.mark.skipif(_chromium() is None, reason="chromium not installed")
def test_html_treemap_in_headless_chromium(tmp_path):
    root, _ = _store(tmp_path, paths=200, roots=8, seed=9)
    page = str(tmp_path / "du.html")
    report = sk_json(root, "--html", page)
    with open(page) as f:
        text = f.read()
    assert "http://" not in text and "https://" not in text and "<link" not in text
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000"]
    try:
        r = subprocess.run(browser + ["--dump-dom", "file://" + page], capture_output=True,
                           text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish")
    if r.returncode != 0 or "<html" not in r.stdout:
        pytest.skip(f"chromium cannot run here: {r.stderr.strip()[-300:]}")
    p = _Nodes()
    p.feed(r.stdout)
    top = [n for n in p.nodes if n["data-depth"] == "1"]
    inner = [n for n in p.nodes if n["data-depth"] == "2"]
    assert sum(int(n["data-bytes"]) for n in top) == report["liveBytes"]
    roots = {n["data-label"]: int(n["data-bytes"]) for n in top if n["data-kind"] == "root"}
    expected = {}
    for rs in _roots_by_target(report).values():
        if rs[0]["exclusiveBytes"]:
            expected[rs[0]["link"]] = rs[0]["exclusiveBytes"]
    assert roots == expected
    shared = sorted(int(n["data-bytes"]) for n in top if n["data-kind"] == "shared")
    assert sum(shared) == report["sharedBytes"]
    if len(report["shared"]) <= 150:  # (beyond that the small groups share one box)
        assert shared == sorted(g["bytes"] for g in report["shared"])
    # the second level: the largest paths of each box, named by store path
    listed = {p["path"] for r in report["roots"] for p in r["largestExclusive"] if p["groupBytes"]}
    assert listed and listed <= {n["data-label"] for n in inner if n["data-kind"] == "path"}
    for n in top:  # a box's children add up to it
        kids = [c for c in inner if c.get("data-parent") == n["data-id"]]
        assert sum(int(c["data-bytes"]) for c in kids) == int(n["data-bytes"]), n["data-label"]
    shot = tmp_path / "du.png"
    subprocess.run(browser + [f"--screenshot={shot}", "file://" + page], capture_output=True,
                   timeout=120)
    assert shot.exists() and shot.stat().st_size > 5000


def test_cached_measurements_match_a_fresh_walk_across_optimise(tmp_path, monkeypatch):
    """The second run reads the cache; after hard-linking (``.links`` changes) it walks again:
    each run equals a walk without the cache."""
    from storekeeper.formats.url import LocalLayout
    from storekeeper.store.du.space import compute
    from storekeeper.store.local import LocalStore
    root = str(tmp_path / "root")
    with LocalStore(LocalLayout.chroot(root)) as s:
        for k in range(6):
            src = tmp_path / f"t{k}"
            src.mkdir()
            (src / "same").write_bytes(b"duplicate content " * 4000)
            (src / "own").write_bytes(bytes([k]) * (5000 * (k + 1)))
            sp = s.add_path(str(src)).path
            os.symlink(s.print_path(sp), os.path.join(s.state_dir, "gcroots", f"r{k}"))

    from storekeeper.store.du import space
    walk = space.measure

    def both(walks: bool = True):
        def no_walk(store_dir, bases):
            raise AssertionError(f"walked {bases} although they were cached")
        with LocalStore(LocalLayout.chroot(root)) as s:
            monkeypatch.setattr(space, "measure", walk if walks else no_walk)
            cached = compute(s).to_json()
            monkeypatch.setattr(space, "measure", walk)
            return cached, compute(s, use_cache=False).to_json()

    first = both()
    assert first[0] == first[1]
    assert os.path.exists(os.path.join(root, "nix/var/nix/storekeeper/du-cache"))
    again = both(walks=False)
    assert again[0] == again[1] == first[0]
    r = subprocess.run(SK + ["--store", root, "optimise"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    after = both()
    assert after[0] == after[1]
    assert after[0]["liveBytes"] < first[0]["liveBytes"]
    assert after[0]["sharedBytes"] > 0  # the linked file is held by all six roots


def test_by_owner_regroups_the_masks():
    from storekeeper.store.du.space import RootSpace, SpaceReport, by_owner
    roots = [RootSpace("direct", "/a", "/nix/store/a", "u1"), RootSpace("direct", "/b", "/nix/store/b", "u2"),
             RootSpace("indirect", "/c", "/nix/store/c", "u1")]
    masks = {0b001: (10, 1), 0b010: (20, 1), 0b011: (5, 1), 0b101: (7, 1), 0b111: (3, 1)}
    report = SpaceReport("nar", roots, [], 45, 5, [], masks, [0, 1, 2])
    got = {o["owner"]: (o["roots"], o["closureBytes"], o["exclusiveBytes"]) for o in by_owner(report)}
    assert got == {"u1": (2, 25, 17), "u2": (1, 28, 20)}


def test_tui_browses_the_tree_on_a_terminal(tmp_path):
    """Under a pseudo-terminal: the top level lists the roots' boxes, Enter opens the largest
    (its paths), q quits."""
    import pty
    import select
    import time

    from storekeeper.formats.url import LocalLayout
    from storekeeper.store.local import LocalStore
    root = str(tmp_path / "root")
    with LocalStore(LocalLayout.chroot(root)) as s:
        big = s.add_text("big-thing", b"x" * 200_000).path
        top = s.add_text("top-level", s.print_path(big).encode(), [big]).path
        os.symlink(s.print_path(top), os.path.join(s.state_dir, "gcroots", "my-root"))
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(TERM="xterm", LINES="30", COLUMNS="120")
        os.execv(sys.executable, SK + ["--store", root, "du", "--tui"])
    out = b""

    def read_until(want: bytes | None, seconds: float = 20) -> None:
        nonlocal out
        end = time.monotonic() + seconds
        while time.monotonic() < end and (want is None or want not in out):
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:  # the child is gone
                    return
    read_until(b"my-root")
    assert b"my-root" in out and b"big-thing" not in out
    os.write(fd, b"\r")
    read_until(b"big-thing")
    assert b"big-thing" in out
    os.write(fd, b"q")
    read_until(None, 5)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
