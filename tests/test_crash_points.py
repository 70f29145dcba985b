"""SIGKILL at every crash point of add, register, GC and optimise (``STOREKEEPER_CRASH_AT``):
afterwards no valid path is lost or changed, our verify and real Nix's
``nix-store --verify --check-contents`` both pass, and the operation works when run again.

Build registration's points need a daemon and a real client: see test_crash_build below.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import needs_nix, nix_env, run_nix

from storekeeper.formats.url import LocalLayout
from storekeeper.fs.crash import ENV, POINTS
from storekeeper.fs.narfs import nar_hash_path
from storekeeper.store.local import LocalStore

pytestmark = [pytest.mark.slow, needs_nix]

SK = [sys.executable, "-m", "storekeeper.cli.main"]

#: point -> the command that reaches it (on the store made by `prepared`)
DRIVE = {
    "add.staged": ["add", "{new}"],
    "add.moved": ["add", "{new}"],
    "add.canonical": ["add", "{new}"],
    "register.synced": ["add", "{new}"],
    "register.written": ["add", "{new}"],
    "register.committed": ["add", "{new}"],
    "gc.invalidated": ["gc"],
    "gc.unlinked": ["gc"],
    "optimise.linked": ["optimise"],
    "optimise.renamed": ["optimise"],
}


def test_every_point_is_driven():
    assert set(DRIVE) | {"build.moved", "build.registered"} == set(POINTS)


def prepared(tmp_path) -> tuple[str, dict[str, str], str]:
    """A store with rooted paths (some with equal files, for optimise) and dead ones."""
    root = str(tmp_path / "root")
    rooted: dict[str, str] = {}
    with LocalStore(LocalLayout.chroot(root)) as store:
        for i in range(4):
            src = tmp_path / f"tree{i}"
            (src / "sub").mkdir(parents=True)
            (src / "same").write_bytes(b"shared content\n" * 100)
            (src / "sub" / "own").write_bytes(f"tree {i}\n".encode() * 30)
            info = store.add_path(str(src))
            p = store.print_path(info.path)
            rooted[p] = info.nar_hash.typed("base32")
            link = os.path.join(store.state_dir, "gcroots", f"r{i}")
            os.symlink(p, link)
        for i in range(6):
            store.add_text(f"dead{i}", f"dead {i}\n".encode() * 40)
            d = tmp_path / f"deadtree{i}"
            d.mkdir()
            (d / "same").write_bytes(b"shared content\n" * 100)
            store.add_path(str(d))
    new = tmp_path / "new"
    (new / "d").mkdir(parents=True)
    (new / "d" / "f").write_bytes(b"new file\n" * 1000)
    (new / "same").write_bytes(b"shared content\n" * 100)
    return root, rooted, str(new)


def check_store(root: str, rooted: dict[str, str], tmp_path) -> None:
    with LocalStore(LocalLayout.chroot(root)) as store:
        for p, h in rooted.items():
            sp = store.parse_path(p)
            assert store.is_valid(sp), f"{p} lost"
            assert nar_hash_path(store.real_path(sp))[0].typed("base32") == h, f"{p} changed"
    r = subprocess.run([*SK, "--store", root, "verify", "--check-contents"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    n = run_nix(["nix-store", "--store", root, "--verify", "--check-contents"], str(tmp_path), check=False)
    assert n.returncode == 0 and b"modified" not in n.stderr, n.stderr.decode()


@pytest.mark.parametrize("point", sorted(DRIVE))
def test_sigkill_at(point, tmp_path):
    root, rooted, new = prepared(tmp_path)
    args = [a.format(new=new) for a in DRIVE[point]]
    env = nix_env(str(tmp_path))
    r = subprocess.run([*SK, "--store", root, *args], capture_output=True, text=True, timeout=120,
                       env={**env, ENV: point})
    assert r.returncode == -9, f"{point} was not reached: {r.returncode} {r.stderr}"
    check_store(root, rooted, tmp_path)
    # the store works: the same operation, then a GC, then a full check again
    r = subprocess.run([*SK, "--store", root, *args], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    if args[0] == "add":
        added = r.stdout.strip()
        rooted[added] = run_nix(["nix-store", "--store", root, "-q", "--hash", added],
                                str(tmp_path)).stdout.decode().strip()
        os.symlink(added, os.path.join(root, "nix", "var", "nix", "gcroots", "new"))
    subprocess.run([*SK, "--store", root, "gc"], capture_output=True, timeout=120, env=env, check=True)
    check_store(root, rooted, tmp_path)


@pytest.mark.parametrize("point", ["build.moved", "build.registered"])
def test_sigkill_in_build_registration(point, tmp_path):
    """The daemon's connection process dies at the point; the store stays sound and
    the same build then succeeds."""
    from test_build import CHAIN, Area, _remove  # noqa: PLC0415 -- the build tests' store area

    base = os.path.join("/tmp", f"skc-{os.urandom(4).hex()}")
    os.makedirs(base, mode=0o755)
    a = Area(base)
    try:
        os.environ[ENV] = point
        try:
            a.start("ours")
        finally:
            del os.environ[ENV]
        p = a.run(["nix-build", "--no-out-link", "-E", CHAIN])
        assert p.returncode != 0, "the build survived its crash point"
        assert b"unexpected end-of-file" in p.stderr, p.stderr.decode()  # the daemon died there
        a.stop()

        def verify_both() -> None:
            r = subprocess.run([*SK, "--store", a.url, "verify", "--check-contents"],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            n = subprocess.run(["nix-store", "--verify", "--check-contents"], env=a.env(remote=False),
                               capture_output=True, timeout=120)
            assert n.returncode == 0 and b"modified" not in n.stderr, n.stderr.decode()
        verify_both()
        a.start("ours")
        out = a.run(["nix-build", "--no-out-link", "-E", CHAIN], check=True).stdout.decode().strip()
        a.stop()
        verify_both()
        with a.local_store() as store:
            assert store.is_valid(store.parse_path(out))
    finally:
        a.stop()
        _remove(base)
