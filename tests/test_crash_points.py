"""SIGKILL at every crash point (``STOREKEEPER_CRASH_AT``) of add, register, GC, optimise,
build registration, substitution and profile changes, each ``(scenario, point)`` at its
first arrival and at its last: afterwards no valid path is lost or changed, our verify and
real Nix's ``nix-store --verify --check-contents`` both pass, and the operation works when
run again (tests/crashkit.py).  bench/crashes.py kills at every arrival.

Build registration through the daemon and a real client: see the last test.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from conftest import needs_nix
from crashkit import SCENARIOS, Harness

from storekeeper.fs.crash import ENV, POINTS

pytestmark = [pytest.mark.slow, needs_nix]

SK = [sys.executable, "-m", "storekeeper.cli.main"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(str(tmp_path_factory.mktemp("crash")))
    for sc in SCENARIOS:
        h.survey(sc)
    return h


def test_every_point_is_reached(harness):
    reached = {p for sc in SCENARIOS for p in sc.counts}
    assert reached == set(POINTS)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda sc: sc.name)
def test_sigkill_at_each_point(harness, scenario):
    problems = []
    for point, count in sorted(scenario.counts.items()):
        for n in sorted({1, count}):
            problem = harness.kill(scenario, point, n)
            if problem:
                problems.append(f"{point}:{n}: {problem}")
    assert not problems, "\n".join(problems)


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


def test_the_checks_find_a_changed_and_a_lost_path(harness):
    """The harness is not blind: a file changed, or a path gone, in a store it checks."""
    sc = next(s for s in SCENARIOS if s.name == "add")
    for damage in ("change", "lose"):
        root = harness._fresh(sc)
        try:
            victim = sorted(p for p in sc.before if p.endswith("-tree3"))[0]
            real = root + victim
            os.chmod(real, 0o755)
            if damage == "change":
                os.chmod(os.path.join(real, "same"), 0o644)
                with open(os.path.join(real, "same"), "ab") as f:
                    f.write(b"!")
                assert "changed on disk" in (harness.check(sc, root) or "")
            else:
                with sqlite3.connect(os.path.join(root, "nix/var/nix/db/db.sqlite")) as db:
                    db.execute("delete from ValidPaths where path = ?", (victim,))
                assert f"{victim} lost" in (harness.check(sc, root) or "")
        finally:
            subprocess.run(["rm", "-rf", root], check=False)
