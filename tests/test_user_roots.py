"""Per-user roots with real unprivileged users: each user touches only their own roots."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import pytest

from storekeeper.api import DELETE_DEAD, GCOptions
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore
from storekeeper.store.roots import RootFinder

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None
                                or shutil.which("runuser") is None,
                                reason="needs root, useradd and runuser to create real users")


@pytest.fixture
def users():
    names = [f"skr{os.getpid() % 100000}{c}" for c in "ab"]
    for n in names:
        subprocess.run(["useradd", "-M", "-N", "-s", "/bin/sh", n], check=True, capture_output=True)
    try:
        yield [pwd.getpwnam(n) for n in names]
    finally:
        for n in names:
            subprocess.run(["userdel", n], capture_output=True)


def as_user(user, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user.pw_name, "--", *cmd], capture_output=True, text=True,
                          timeout=30)


def test_users_touch_only_their_own_roots(users, shared_dir):
    alice, bob = users
    root = os.path.join(shared_dir, "root")
    with LocalStore(LocalLayout.chroot(root)) as s:
        for u in users:
            s.ensure_user_dirs(u.pw_name, u.pw_uid, u.pw_gid)
        a = s.print_path(s.add_text("a", b"a").path)
        b = s.print_path(s.add_text("b", b"b").path)
        c = s.print_path(s.add_text("c", b"c").path)
        per_user = os.path.join(s.state_dir, "gcroots", "per-user")
    mine, theirs = os.path.join(per_user, alice.pw_name), os.path.join(per_user, bob.pw_name)
    assert os.stat(mine).st_uid == alice.pw_uid and os.stat(mine).st_mode & 0o777 == 0o755

    assert as_user(alice, "ln", "-s", a, os.path.join(mine, "a")).returncode == 0
    assert as_user(bob, "ln", "-s", b, os.path.join(theirs, "b")).returncode == 0
    # alice can neither add to nor remove from bob's roots
    r = as_user(alice, "ln", "-s", c, os.path.join(theirs, "sneaky"))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_user(alice, "rm", "-f", os.path.join(theirs, "b"))
    assert r.returncode != 0 and os.path.islink(os.path.join(theirs, "b"))
    # a root pointing outside the store (here: at a link elsewhere that leads to c) is refused
    outside = os.path.join(shared_dir, "alice-link")
    os.symlink(c, outside)
    assert as_user(alice, "ln", "-s", outside, os.path.join(mine, "indirect")).returncode == 0
    assert as_user(alice, "ln", "-s", "/etc/shadow", os.path.join(mine, "shadow")).returncode == 0
    # an entry owned by someone else inside alice's directory does not count either
    os.symlink(c, os.path.join(mine, "planted"))
    os.lchown(os.path.join(mine, "planted"), bob.pw_uid, bob.pw_gid)

    with LocalStore(LocalLayout.chroot(root)) as s:
        finder = RootFinder(s.store_dir, s.real_store_dir, s.state_dir)
        roots = {(r.link, s.print_path(r.path)) for r in finder.permanent_roots()}
        assert roots == {(os.path.join(mine, "a"), a), (os.path.join(theirs, "b"), b)}
        msgs = "\n".join(finder.messages)
        assert f"ignoring root '{os.path.join(mine, 'indirect')}': it points outside the store" in msgs
        assert f"ignoring root '{os.path.join(mine, 'shadow')}': it points outside the store" in msgs
        assert f"ignoring root '{os.path.join(mine, 'planted')}': not owned" in msgs
        deleted = s.collect_garbage(GCOptions(action=DELETE_DEAD)).paths
        assert deleted == [c]


def test_profiles_of_a_user_follow_their_generations(users, shared_dir):
    alice, _ = users
    root = os.path.join(shared_dir, "root")
    with LocalStore(LocalLayout.chroot(root)) as s:
        s.ensure_user_dirs(alice.pw_name, alice.pw_uid, alice.pw_gid)
        gen1 = s.print_path(s.add_text("gen1", b"1").path)
        old = s.print_path(s.add_text("old", b"0").path)
        prof = os.path.join(s.state_dir, "profiles", "per-user", alice.pw_name)
    assert as_user(alice, "ln", "-s", gen1, os.path.join(prof, "profile-1-link")).returncode == 0
    assert as_user(alice, "ln", "-s", "profile-1-link", os.path.join(prof, "profile")).returncode == 0
    with LocalStore(LocalLayout.chroot(root)) as s:
        assert s.collect_garbage(GCOptions(action=DELETE_DEAD)).paths == [old]
        assert s.is_valid(s.parse_path(gen1))
