"""``storekeeper path-info``'s text output is ``nix path-info``'s, byte for byte: the path
column padded only when a column follows, ``-s``/``-S`` eleven wide, ``-h`` sizes with one
decimal and a 1024-power suffix (checked at the 1024-byte edge)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import needs_nix, nix_env, run_nix

pytestmark = [needs_nix, pytest.mark.nix, pytest.mark.slow]

NIX = ["nix", "--extra-experimental-features", "nix-command"]


def test_text_columns_are_nix_path_infos(tmp_path):
    env = nix_env(str(tmp_path))
    store = str(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    # NAR sizes 120, 1024 (112 bytes of NAR around 912 of contents), 1032, ~4.8 MiB
    sizes = {"tiny": 6, "edge": 912, "over": 913, "big": 5_000_000}
    paths = []
    for name, n in sizes.items():
        (src / name).write_bytes(os.urandom(n))
        paths.append(run_nix(["nix-store", "--store", store, "--add", str(src / name)],
                             str(tmp_path), env=env).stdout.decode().strip())
    (src / "top").write_text(" ".join(paths))
    top = run_nix(["nix-store", "--store", store, "--add", str(src / "top")], str(tmp_path),
                  env=env).stdout.decode().strip()
    seen = {}
    for flags in ([], ["-s"], ["-S"], ["-s", "-h"], ["-sSh"], ["-r", "-s", "-S"]):
        theirs = run_nix([*NIX, "path-info", "--store", store, *flags, *paths, top],
                         str(tmp_path), env=env).stdout.decode()
        ours = subprocess.run([sys.executable, "-m", "storekeeper.cli.main", "--store", store,
                               "path-info", *flags, *paths, top], capture_output=True,
                              text=True, env=env, timeout=60)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == theirs, flags
        seen[" ".join(flags)] = theirs
    # the edge: exactly 1024 bytes stays in bytes, one more goes to K; 4.8 MiB is "   4.8M"
    assert "\t1024.0 \n" in seen["-s -h"] and "\t   1.0K\n" in seen["-s -h"]
    assert "\t   4.8M\n" in seen["-s -h"] and "\t       1024\n" in seen["-s"]
