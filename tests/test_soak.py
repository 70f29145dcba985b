"""A 20-second run of bench/soak.py (8 real Nix clients through our daemon, GC every few
seconds, optimise in a loop, auto-GC on a small file system): no command fails, every
rooted path is valid and intact, both verifies pass.  The 10-minute run is bench-only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import needs_nix

pytestmark = [pytest.mark.slow, needs_nix]

SOAK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "soak.py")


def test_soak_smoke():
    r = subprocess.run([sys.executable, SOAK, "--minutes", str(20 / 60), "--gc-every", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 failed commands; 0 problems" in r.stdout, r.stdout
    runs = {line.split(":")[0]: int(line.split(":")[1]) for line in r.stdout.splitlines()
            if line.endswith(tuple("0123456789")) and line.split(":")[0] in ("GC runs", "optimise runs")}
    assert runs["GC runs"] >= 3 and runs["optimise runs"] >= 1, r.stdout
    checked = next(line for line in r.stdout.splitlines() if line.startswith("checked "))
    assert int(checked.split()[1]) > 0, checked
