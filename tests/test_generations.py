"""Profile generations: ``storekeeper profile`` against real ``nix-env`` on twin profile dirs
(the same links, targets and link times), and the selection rules on a fake clock."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import needs_nix, nix_env

from storekeeper.store.generations import (
    Generation,
    Selection,
    delete_all_generations,
    delete_generations,
    select,
    switch,
)

SK = [sys.executable, "-m", "storekeeper.cli.main"]
DAY = 86400.0


def make_profile(d: str, n: int, current: int, now: float, step_days: float = 10) -> str:
    """Profile ``d/p`` with generations 1..n, generation i made (n-i)*step days ago."""
    os.makedirs(d, exist_ok=True)
    for i in range(1, n + 1):
        link = os.path.join(d, f"p-{i}-link")
        os.symlink(f"/nix/store/{'%032d' % i}-gen-{i}", link)
        t = now - (n - i) * step_days * DAY - 3600
        os.utime(link, (t, t), follow_symlinks=False)
    os.symlink(f"p-{current}-link", os.path.join(d, "p"))
    os.symlink("/nix/store/00000000000000000000000000000000-unrelated", os.path.join(d, "other"))
    return os.path.join(d, "p")


def state(d: str) -> dict[str, str]:
    return {n: os.readlink(os.path.join(d, n)) for n in sorted(os.listdir(d))
            if os.path.islink(os.path.join(d, n))}


def nix_env_run(tmp, args: list[str]) -> subprocess.CompletedProcess:
    env = nix_env(str(tmp))
    env["TZ"] = "UTC"
    return subprocess.run(["nix-env", *args], capture_output=True, text=True, env=env, timeout=60)


def ours(tmp, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, TZ="UTC")
    return subprocess.run(SK + ["--store", str(tmp / "skstore"), "profile", *args],
                          capture_output=True, text=True, env=env, timeout=60)


SPECS = [["old"], ["+3"], ["+1"], ["+6"], ["25d"], ["45d"], ["1000d"], ["0d"], ["2", "4", "8"],
         ["3", "99"]]


@needs_nix
@pytest.mark.nix
@pytest.mark.parametrize("current", [8, 5])
def test_delete_generations_like_nix_env(tmp_path, current):
    now = time.time()
    for k, spec in enumerate(SPECS):
        a = make_profile(str(tmp_path / f"nix{k}"), 8, current, now)
        b = make_profile(str(tmp_path / f"sk{k}"), 8, current, now)
        theirs = nix_env_run(tmp_path, ["-p", a, "--delete-generations", *spec])
        mine = ours(tmp_path, ["delete-generations", "-p", b, *spec])
        assert (mine.returncode == 0) == (theirs.returncode == 0), (spec, theirs.stderr, mine.stderr)
        assert state(os.path.dirname(a)) == state(os.path.dirname(b)), spec
    # the long spellings mean the same
    a = make_profile(str(tmp_path / "long-nix"), 8, current, now)
    b = make_profile(str(tmp_path / "long-sk"), 8, current, now)
    nix_env_run(tmp_path, ["-p", a, "--delete-generations", "35d"])
    assert ours(tmp_path, ["delete-generations", "-p", b, "--older-than", "35d"]).returncode == 0
    assert state(os.path.dirname(a)) == state(os.path.dirname(b))


@needs_nix
@pytest.mark.nix
def test_deleting_the_current_generation_fails_like_nix_env(tmp_path):
    now = time.time()
    a = make_profile(str(tmp_path / "a"), 4, 3, now)
    b = make_profile(str(tmp_path / "b"), 4, 3, now)
    assert nix_env_run(tmp_path, ["-p", a, "--delete-generations", "3"]).returncode != 0
    r = ours(tmp_path, ["delete-generations", "-p", b, "3"])
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "current" in r.stderr
    assert state(os.path.dirname(a)) == state(os.path.dirname(b))
    assert ours(tmp_path, ["delete-generations", "-p", b, "--keep", "0"]).returncode == 2


@needs_nix
@pytest.mark.nix
def test_list_and_rollback_like_nix_env(tmp_path):
    now = time.time()
    a = make_profile(str(tmp_path / "a"), 5, 5, now)
    b = make_profile(str(tmp_path / "b"), 5, 5, now)
    for step in range(6):
        theirs = nix_env_run(tmp_path, ["-p", a, "--list-generations"])
        mine = ours(tmp_path, ["list", "-p", b])
        assert mine.stdout == theirs.stdout
        t = nix_env_run(tmp_path, ["-p", a, "--rollback"])
        m = ours(tmp_path, ["rollback", "-p", b])
        assert (m.returncode == 0) == (t.returncode == 0), (step, t.stderr, m.stderr)
        assert state(str(tmp_path / "a")) == state(str(tmp_path / "b"))
    assert m.returncode != 0  # at generation 1: nothing older
    nix_env_run(tmp_path, ["-p", a, "--switch-generation", "4"])
    assert ours(tmp_path, ["switch", "-p", b, "4"]).returncode == 0
    assert state(str(tmp_path / "a")) == state(str(tmp_path / "b"))
    assert not os.path.exists(b + ".lock")


def _gens(n: int, current: int, now: float) -> tuple[list[Generation], int]:
    return [Generation(i, f"p-{i}-link", "", now - (n - i) * DAY) for i in range(1, n + 1)], current


@pytest.mark.parametrize("days,kept", [(0.5, [6, 9, 10]), (2.5, [6, 7, 8, 9, 10]),
                                       (100, list(range(1, 11)))])
def test_older_than_keeps_the_generation_live_at_the_cutoff(days, kept):
    """On a fake clock: generation i made 10-i days before ``now``; current is 6."""
    now = 1_000_000_000.0
    gens, cur = _gens(10, 6, now)
    doomed = {g.number for g in select(gens, cur, Selection.older_than(days * DAY), now)}
    assert sorted({g.number for g in gens} - doomed) == kept
    assert cur not in doomed


def _profiles_tree(state: str, now: float) -> str:
    top = os.path.join(state, "profiles")
    make_profile(top, 6, 4, now)
    make_profile(os.path.join(top, "per-user", "alice"), 5, 5, now, step_days=20)
    return top


@needs_nix
@pytest.mark.nix
@pytest.mark.parametrize("flags", [["-d"], ["--delete-older-than", "25d"]])
def test_gc_delete_generations_like_nix_collect_garbage(tmp_path, flags):
    """Every profile under the state dir's profiles/ (nested per-user dirs too), then a GC."""
    now = time.time()
    env = nix_env(str(tmp_path))
    theirs = _profiles_tree(env["NIX_STATE_DIR"], now)
    r = subprocess.run(["nix-collect-garbage", *flags], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "skstore"
    subprocess.run(SK + ["--store", str(root), "init"], check=True, capture_output=True)
    mine = _profiles_tree(str(root / "nix" / "var" / "nix"), now)
    ours_flags = ["--delete-generations"] if flags == ["-d"] else flags
    r2 = subprocess.run(SK + ["--store", str(root), "gc", *ours_flags], capture_output=True,
                        text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr
    for sub in ("", "per-user/alice"):
        assert state(os.path.join(theirs, sub)) == state(os.path.join(mine, sub)), sub
    left = [n for n in state(mine) if n.startswith("p-")]
    assert 1 <= len(left) < 6 and "p-4-link" in left  # some went; never the current one


def test_a_profile_dir_swapped_for_a_symlink_is_never_followed(tmp_path):
    """A user owns their profiles dir and may swap it for a link to somewhere else between the
    GC's walk and its deletions: nothing outside is touched (generations.open_profile_dir)."""
    now = time.time()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_profile(str(elsewhere), 3, 3, now)
    before = state(str(elsewhere))
    profiles = tmp_path / "profiles" / "per-user"
    profiles.mkdir(parents=True)
    os.symlink(str(elsewhere), str(profiles / "alice"))
    with pytest.raises(OSError):
        delete_generations(str(profiles / "alice" / "p"), Selection("old"))
    with pytest.raises(OSError):
        switch(str(profiles / "alice" / "p"), 1)
    assert delete_all_generations(str(tmp_path / "profiles"), Selection("old")) == []
    assert state(str(elsewhere)) == before
