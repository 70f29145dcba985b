"""Retention policies (storekeeper.store.policy) on generated stores and a fake clock: what
each one drops, what a GC then deletes, and what no policy may ever touch."""

from __future__ import annotations

import os

import pytest

from storekeeper.api import DELETE_DEAD, GCOptions
from storekeeper.formats.url import LocalLayout
from storekeeper.store import policy
from storekeeper.store.local import LocalStore
from storekeeper.store.roots import add_indirect_root
from storekeeper.store.settings import SettingsError

DAY = 86400.0
NOW = 2_000_000_000.0  # the fake clock


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch):
    monkeypatch.setattr(policy, "clock", lambda: NOW)


@pytest.fixture
def store(chroot_root):
    """A store whose paths this process does not pin: each test adds what it needs with
    ``store``, then :func:`reopen` drops those temp roots (as a CLI run would end)."""
    holder = [LocalStore(LocalLayout.chroot(chroot_root))]
    yield _Handle(holder, chroot_root)
    holder[0].close()


class _Handle:
    def __init__(self, holder, root):
        self._holder, self._root = holder, root

    def __getattr__(self, name):
        return getattr(self._holder[0], name)

    def __setattr__(self, name, value):
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._holder[0], name, value)

    def reopen(self):
        settings = self._holder[0].settings
        self._holder[0].close()
        self._holder[0] = LocalStore(LocalLayout.chroot(self._root))
        self._holder[0].settings = settings


def configure(store, **pairs):
    store.settings = store.settings.with_settings([(k.replace("_", "-"), v) for k, v in pairs.items()])


def gc(store) -> set[str]:
    return set(store.collect_garbage(GCOptions(action=DELETE_DEAD)).paths)


def make_profile(store, n: int, current: int, step: float = DAY) -> tuple[str, list[str]]:
    """Profile ``profiles/p`` with generations 1..n (i made (n-i)*step before NOW), each
    pointing at its own store path (with a shared dependency)."""
    dep = store.add_text("dep", b"shared dependency " * 100).path
    d = os.path.join(store.state_dir, "profiles")
    os.makedirs(d, exist_ok=True)
    paths = []
    for i in range(1, n + 1):
        sp = store.add_text(f"gen-{i}", store.print_path(dep).encode() + b"x" * 1000 * i, [dep]).path
        paths.append(store.print_path(sp))
        link = os.path.join(d, f"p-{i}-link")
        os.symlink(paths[-1], link)
        t = NOW - (n - i) * step
        os.utime(link, (t, t), follow_symlinks=False)
    os.symlink(f"p-{current}-link", os.path.join(d, "p"))
    store.reopen()
    return os.path.join(d, "p"), paths


def gens_left(profile: str) -> list[int]:
    d, base = os.path.split(profile)
    return sorted(int(n[len(base) + 1:-5]) for n in os.listdir(d) if n.startswith(base + "-")
                  and n.endswith("-link"))


def test_policies_are_off_by_default(store):
    profile, paths = make_profile(store, 5, 5)
    assert policy.plan(store).drops == []
    gc(store)
    assert gens_left(profile) == [1, 2, 3, 4, 5]


def test_keep_generations_never_the_current_nor_newer(store):
    profile, paths = make_profile(store, 8, 5)  # rolled back: 6..8 are newer than current
    configure(store, keep_generations="2")
    p = policy.plan(store, with_bytes=True)
    assert sorted(d.generation for d in p.drops) == [1, 2, 3]
    assert p.freed["keep-generations"] > 0 and p.freed["all"] == p.freed["keep-generations"]
    store.pin(store.parse_path(paths[0]))  # a temp root: generation 1's path must stay
    dead = gc(store)
    assert gens_left(profile) == [4, 5, 6, 7, 8]
    assert dead == {paths[1], paths[2]}
    # the bytes the dry run promised for the generations that went (1 was pinned)
    assert store.is_valid(store.parse_path(paths[0]))


def test_keep_one_generation_keeps_the_current(store):
    profile, paths = make_profile(store, 4, 2)
    configure(store, keep_generations="1")
    gc(store)
    assert gens_left(profile) == [2, 3, 4]


@pytest.mark.parametrize("age,left", [("12h", [4, 5]), ("36h", [3, 4, 5]), ("60h", [2, 3, 4, 5]),
                                      ("30d", [1, 2, 3, 4, 5])])
def test_delete_generations_older_than_on_the_fake_clock(store, age, left):
    """Generation i made 5-i days before NOW: the newest one older than the cut-off stays
    (it was live then), and so does the current one (4)."""
    profile, paths = make_profile(store, 5, 4)
    configure(store, delete_generations_older_than=age)
    gc(store)
    assert gens_left(profile) == left


def _result_link(store, tmp_path, name: str, sp, age_days: float) -> str:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    link = str(home / name)
    os.symlink(store.print_path(sp), link)
    t = NOW - age_days * DAY
    os.utime(link, (t, t), follow_symlinks=False)
    add_indirect_root(store.state_dir, link)
    return link


def test_root_ttl_drops_old_result_links_only(store, tmp_path):
    old = store.add_text("old-result", b"o" * 5000).path
    new = store.add_text("new-result", b"n" * 5000).path
    old_link = _result_link(store, tmp_path, "result-old", old, 20)
    _result_link(store, tmp_path, "result-new", new, 2)
    store.reopen()
    configure(store, root_ttl="indirect=14d")
    p = policy.plan(store, with_bytes=True)
    assert [d.policy for d in p.drops] == ["root-ttl"] and old_link in p.drops[0].detail
    assert p.freed["root-ttl"] >= 5000
    dead = gc(store)
    assert dead == {store.print_path(old)}
    assert os.path.islink(old_link)  # the user's own link is left alone
    assert store.is_valid(new)


def test_root_ttl_does_not_free_what_a_temp_root_holds(store, tmp_path):
    old = store.add_text("old-but-in-use", b"u" * 100).path
    _result_link(store, tmp_path, "result", old, 100)
    store.reopen()
    store.pin(old)
    configure(store, root_ttl="indirect=1d")
    assert gc(store) == set()
    assert store.is_valid(old)


def test_keep_recently_used(store, monkeypatch):
    used = store.add_text("used", b"u").path
    unused = store.add_text("unused", b"v").path
    store.reopen()
    policy.record_use(store, [store.print_path(used)], now=NOW - 3600)
    configure(store, keep_recently_used="1d")
    assert gc(store) == {store.print_path(unused)}
    assert store.is_valid(used)
    # two days later it is no longer recent: its link goes and the next GC takes it
    monkeypatch.setattr(policy, "clock", lambda: NOW + 2 * DAY)
    assert gc(store) == {store.print_path(used)}
    assert os.listdir(os.path.join(store.state_dir, "gcroots", policy.RECENT_DIR)) == []


def test_user_quota_warns(store, tmp_path):
    sp = store.add_text("big", b"b" * 50_000).path
    os.symlink(store.print_path(sp), os.path.join(store.state_dir, "gcroots", "big"))
    store.reopen()
    configure(store, user_quota="10K")
    p = policy.plan(store)
    assert len(p.warnings) == 1 and "over the quota of 10240" in p.warnings[0]
    configure(store, user_quota="1M")
    assert policy.plan(store).warnings == []


@pytest.mark.parametrize("name,value", [("root-ttl", "profile=3d"), ("root-ttl", "indirect"),
                                        ("keep-recently-used", "3w"), ("keep-generations", "x")])
def test_bad_policy_settings_are_one_line_errors(store, name, value):
    with pytest.raises(SettingsError, match=f"setting '{name}'"):
        store.settings.with_settings([(name, value)])


def _cli(root: str, *args: str, conf: str | None = None):
    import subprocess
    import sys
    env = dict(os.environ)
    if conf is not None:
        env["NIX_CONF_DIR"] = os.path.join(root, "..", "etc")
        os.makedirs(env["NIX_CONF_DIR"], exist_ok=True)
        with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "w") as f:
            f.write(conf)
    return subprocess.run([sys.executable, "-m", "storekeeper.cli.main", "--store", root, *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_dry_run_shows_each_policy_with_bytes_then_gc_applies(store, chroot_root, monkeypatch):
    import subprocess
    monkeypatch.setattr(policy, "clock", __import__("time").time)
    profile, paths = make_profile(store, 6, 6)
    store.close()
    r = _cli(chroot_root, "roots")
    assert r.returncode == 0 and "policy" not in r.stderr  # off by default
    r = _cli(chroot_root, "gc", "--dry-run", "--keep-generations", "3")
    assert r.returncode == 0, r.stderr
    drops = [line for line in r.stderr.splitlines() if line.startswith("policy keep-generations would drop")]
    assert len(drops) == 3 and all("p-1-link" in d or "p-2-link" in d or "p-3-link" in d for d in drops)
    freed = int(r.stderr.split("policy all: would free ")[1].split()[0])
    real = [os.path.join(chroot_root, p.lstrip("/")) for p in paths[:3]]
    du = subprocess.run(["du", "-sc", "-B1", *real], capture_output=True, text=True, check=True)
    assert freed == int(du.stdout.splitlines()[-1].split()[0])
    assert gens_left(profile) == [1, 2, 3, 4, 5, 6]  # a dry run changes nothing
    r = _cli(chroot_root, "roots", conf="keep-generations = 3\n")  # nix.conf: shown by roots
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("policy keep-generations would drop") == 3
    r = _cli(chroot_root, "gc", "--keep-generations", "3")
    assert r.returncode == 0, r.stderr
    assert gens_left(profile) == [4, 5, 6]
    assert "3 store paths deleted" in r.stdout
