"""keep-recently-used through the daemon: paths a real Nix client reads through our daemon
are recorded (our own table, not atime) and a later GC keeps them."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from conftest import needs_nix, nix_env
from daemon_util import start_daemon, stop_process

SK = [sys.executable, "-m", "storekeeper.cli.main"]


@needs_nix
@pytest.mark.nix
def test_paths_used_through_the_daemon_are_kept(tmp_path):
    root, sock = str(tmp_path / "root"), str(tmp_path / "d.sock")
    env = nix_env(str(tmp_path))
    ours = dict(env, NIX_CONF_DIR=str(tmp_path / "sk-etc"))  # (real Nix would warn about it)
    os.makedirs(ours["NIX_CONF_DIR"])
    with open(os.path.join(ours["NIX_CONF_DIR"], "nix.conf"), "w") as f:
        f.write("keep-recently-used = 1d\n")
    made = []
    for name in ("used", "unused"):
        src = tmp_path / name
        src.write_text(name * 100)
        r = subprocess.run(SK + ["--store", root, "add", str(src)], capture_output=True, text=True,
                           env=ours, check=True)
        made.append(r.stdout.strip())
    used, unused = made
    proc = start_daemon("ours", root, sock, ours)
    try:
        r = subprocess.run(["nix-store", "--store", f"unix://{sock}", "--realise", used],
                           capture_output=True, env=env, timeout=60)  # BuildPaths
        assert r.returncode == 0, r.stderr
    finally:
        stop_process(proc)
    db = sqlite3.connect(os.path.join(root, "nix/var/nix/storekeeper/usage.sqlite"))
    assert [p for (p,) in db.execute("select path from Used")] == [used]
    r = subprocess.run(SK + ["--store", root, "gc"], capture_output=True, text=True, env=ours,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(root, used.lstrip("/")))
    assert not os.path.exists(os.path.join(root, unused.lstrip("/")))
    assert os.path.islink(os.path.join(root, "nix/var/nix/gcroots/recently-used",
                                       os.path.basename(used)))
