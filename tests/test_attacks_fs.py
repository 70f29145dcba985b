"""Issue 11 items 1, 2, 4 and 8, run as attacks: a daemon running as root with build users
(``sandbox = false``), an untrusted real user driving it with the real Nix 2.8 clients, and
builders (as build users) or the user itself racing the daemon's file operations.

Each victim is a root-owned file or directory the attacker may not change; each test
asserts the victim is untouched.  On the code before the file-system layer (path-based
walks, check-then-act) every one of them lost: emptied, chmod-ed, or wedged.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time

import pytest
from conftest import needs_nix
from realusers import PATH, needs_root_users, real_users, spawn_as
from test_build import area_factory, build_users, drv_expr  # noqa: F401 -- fixtures

from storekeeper import fs

pytestmark = [needs_nix, needs_root_users, pytest.mark.nix, pytest.mark.root]

SH = "PATH=/bin:/usr/bin; "


def _nix_env(a, user) -> dict[str, str]:
    return {"PATH": PATH, "HOME": user.home, "XDG_CACHE_HOME": os.path.join(user.home, ".cache"),
            "NIX_CONF_DIR": a.etc, "NIX_STORE_DIR": a.store,
            "NIX_STATE_DIR": os.path.join(user.home, "state"),
            "NIX_LOG_DIR": os.path.join(user.home, "log"), "NIX_REMOTE": f"unix://{a.socket}"}


def nix_as(a, user, *argv: str, timeout: float = 120, wait: bool = True):
    """A real Nix client as ``user`` against the daemon serving ``a``."""
    p = spawn_as(user, list(argv), env=_nix_env(a, user), stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"{argv} did not finish in {timeout} s: {err}") from None
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _script(a, name: str, text: str) -> str:
    path = os.path.join(a.base, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def _rendezvous(a) -> str:
    d = os.path.join(a.base, "rendezvous")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o1777)
    return d


def _victim_dir(a) -> str:
    v = os.path.join(a.base, "victim-dir")
    os.mkdir(v, 0o700)
    for i in range(8):
        with open(os.path.join(v, f"v{i}"), "w") as f:
            f.write("precious\n")
    return v


def _wait_for(path: str, proc, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"the build ended before {path} appeared: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


GC_RACER = r'''
import os, sys, time
store, victim, ready = sys.argv[1:4]
junk = os.path.join(store, "junk-attack")
os.mkdir(junk)
N = 300
for i in range(N):
    os.mkdir(os.path.join(junk, f"d{i}"))
    for j in range(3):
        open(os.path.join(junk, f"d{i}", f"f{j}"), "w").close()
for i in range(40):
    open(os.path.join(junk, f"s{i}"), "w").close()
open(ready, "w").close()
deadline = time.time() + 90
# the collector has listed the junk entry once its first files go
while time.time() < deadline:
    try:
        if len(os.listdir(junk)) < N + 40:
            break
    except FileNotFoundError:
        sys.exit(1)
for i in range(N):
    d = os.path.join(junk, f"d{i}")
    try:
        os.rename(d, d + "x")
        os.symlink(victim, d)
    except OSError:
        pass
sys.exit(1)
'''


def test_gc_of_junk_never_follows_a_directory_swapped_for_a_symlink(area_factory, build_users):
    """Item 1: a builder leaves a tree in the store dir and, once a GC starts deleting it,
    swaps its subdirectories for symlinks to a root-only directory.  The collector must
    delete the links, never what they point at.  (Nix 2.8 deletes fd-relative with
    ``O_NOFOLLOW``: it has no such hole.)"""
    group, _ = build_users
    a = area_factory(conf=f"build-users-group = {group}\n")
    a.start("ours")
    victim = _victim_dir(a)
    ready = os.path.join(_rendezvous(a), "junk-ready")
    racer = _script(a, "gc-racer.py", GC_RACER)
    with real_users(a.base, "atk") as users:
        atk = users["atk"]
        build = nix_as(a, atk, "nix-build", "--no-out-link", "-E", drv_expr(
            "gcrace", SH + f"/usr/bin/python3 {racer} $NIX_STORE {victim} {ready}"), wait=False)
        try:
            _wait_for(ready, build)
            gc = nix_as(a, atk, "nix-store", "--gc")
            build.communicate(timeout=120)
        finally:
            if build.poll() is None:
                build.kill()
                build.communicate()
    assert sorted(os.listdir(victim)) == [f"v{i}" for i in range(8)], gc.stderr
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o700
    assert not os.path.lexists(os.path.join(a.store, "junk-attack")), gc.stderr


def test_keep_failed_never_chmods_what_the_builder_put_in_place_of_its_build_dir(area_factory, build_users):
    """Item 2: keep-failed is on (an untrusted client may no longer set it, see the
    settings table: here the daemon's nix.conf sets it); the builder replaces its build
    dir with a symlink to a root-only file and fails.  Keeping the build dir must not
    chmod the target.  (Nix 2.8 chmods the build dir by path here too, and lets any
    client set keep-failed: same hole.)"""
    group, _ = build_users
    a = area_factory(conf=f"build-users-group = {group}\nkeep-failed = true\n")
    a.start("ours")
    victim = os.path.join(a.base, "shadow")
    with open(victim, "w") as f:
        f.write("secret\n")
    os.chmod(victim, 0o600)
    with real_users(a.base, "atk") as users:
        p = nix_as(a, users["atk"], "nix-build", "-K", "--no-out-link", "-E", drv_expr(
            "keepme", SH + f"cd /; mv $NIX_BUILD_TOP $NIX_BUILD_TOP.moved; "
                           f"ln -s {victim} $NIX_BUILD_TOP; exit 1"))
    assert p.returncode != 0
    st = os.stat(victim)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0, p.stderr
    assert "not kept" in p.stderr, p.stderr
    for m in re.finditer(r"build directory '([^']+)'", p.stderr):
        fs.remove_tree(m.group(1))  # the builder's link, left in /tmp


CANON_BUILDER = r'''
import os, sys
out, note = os.environ["out"], sys.argv[1]
os.mkdir(out)
for i in range(60):
    d = os.path.join(out, f"p{i}")
    os.mkdir(d)
    os.chmod(d, 0o777)
    for j in range(60):
        with open(os.path.join(d, f"f{j}"), "w") as f:
            f.write(str(j))
with open(note, "w") as f:
    f.write(out)
'''

CANON_ATTACKER = r'''
import os, sys, time
note, victim, done = sys.argv[1:4]
deadline = time.time() + 100
out = None
while time.time() < deadline and out is None:
    try:
        out = open(note).read() or None
    except FileNotFoundError:
        time.sleep(0.001)
# the daemon starts changing the output: its top becomes root's
while out and time.time() < deadline:
    try:
        if os.stat(out).st_uid == 0:
            break
    except FileNotFoundError:
        pass
planted = 0
for i in range(60):
    try:
        os.link(victim, os.path.join(out, f"p{i}", "planted"))
        planted += 1
    except OSError:
        pass
open(done, "w").write(str(planted))
'''


def test_canonicalisation_never_changes_a_file_linked_in_after_the_check(area_factory, build_users):
    """Item 4: a build makes world-writable output subdirectories; another user hard-links a
    root-owned file into them the moment the daemon starts changing the output (after the
    check pass).  The file must keep its mode.  With ``fs.protected_hardlinks = 1`` a user
    may link a root file it can read and write, so the victim is 0666 (with the sysctl at 0,
    any root file).  (Nix 2.8 checks and changes in one pass per file by path: a link
    landing after its directory was listed is missed, one landing before is refused.)"""
    group, _ = build_users
    a = area_factory(conf=f"build-users-group = {group}\n")
    a.start("ours")
    victim = os.path.join(a.base, "victim")
    with open(victim, "w") as f:
        f.write("root's\n")
    os.chmod(victim, 0o666)
    rv = _rendezvous(a)
    note, done = os.path.join(rv, "out"), os.path.join(rv, "done")
    builder = _script(a, "canon-builder.py", CANON_BUILDER)
    attacker = _script(a, "canon-attacker.py", CANON_ATTACKER)
    with real_users(a.base, "atk") as users:
        atk = users["atk"]
        racer = spawn_as(atk, ["/usr/bin/python3", attacker, note, victim, done],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            p = nix_as(a, atk, "nix-build", "--no-out-link", "-E", drv_expr(
                "canonrace", SH + f"/usr/bin/python3 {builder} {note}"))
            racer.wait(120)
        finally:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    planted = int(open(done).read())
    st = os.stat(victim)
    assert stat.S_IMODE(st.st_mode) == 0o666 and st.st_mtime != 1, (planted, p.stderr)
    if planted:
        assert p.returncode != 0 and "hard link to a file outside the build output" in p.stderr, p.stderr


def test_lock_names_squatted_by_a_builder_do_not_block_later_builds(area_factory, build_users):
    """Item 8: a builder makes ``<path>.lock`` a directory (and another one a non-empty
    leftover file) for paths other users will build.  Those builds must still succeed,
    and nothing may spin.  (Nix 2.8 has the same hole: "Is a directory", and a spin on a
    non-empty lock file.)"""
    group, _ = build_users
    a = area_factory(conf=f"build-users-group = {group}\n")
    a.start("ours")
    victims = [drv_expr(f"locked{i}", SH + f"echo {i} > $out") for i in range(2)]
    with real_users(a.base, "atk") as users:
        atk = users["atk"]
        outs = []
        for expr in victims:
            drv = nix_as(a, atk, "nix-instantiate", "-E", expr)
            assert drv.returncode == 0, drv.stderr
            q = nix_as(a, atk, "nix-store", "-q", "--outputs", drv.stdout.strip())
            outs.append(q.stdout.strip())
        p = nix_as(a, atk, "nix-build", "--no-out-link", "-E", drv_expr(
            "squatter", SH + f"mkdir {outs[0]}.lock; mkdir {outs[0]}.lock/sub; "
                             f"printf d > {outs[1]}.lock; echo done > $out"))
        assert p.returncode == 0, p.stderr
        for expr, out in zip(victims, outs):
            r = nix_as(a, atk, "nix-build", "--no-out-link", "-E", expr, timeout=60)
            assert r.returncode == 0 and r.stdout.strip() == out, r.stderr
