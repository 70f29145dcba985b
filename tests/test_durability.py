"""A successful add survives the file system stopping at once (issue 16, item 4).

On an ext4 image loop-mounted by the test (root only; skipped otherwise): ``add``
returns 0, then the file system is shut down without flushing anything more
(``EXT4_IOC_SHUTDOWN`` with ``EXT4_GOING_FLAGS_NOLOGFLUSH``: what a power cut leaves
of it), unmounted, checked with ``e2fsck`` and mounted again.  The path must be valid
with its contents intact, by our verify and real Nix's; by our CLI and through our
daemon (whose connection keeps the database open).

Without ``fsync-store-paths`` the same sequence leaves the path registered with
wrong contents (ext4 allocates file data late; the row was written first): the
last test shows that, which is why the setting exists (5 of 5 runs here).

Each scenario runs in a private mount namespace of its own (this file run as a
script under ``unshare``): a mount namespace someone else makes meanwhile (a build
sandbox) would otherwise keep a copy of the shut-down mount alive, and mounting the
image again would get that same dead file system back.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest
from conftest import needs_nix, nix_env
from daemon_util import start_daemon, stop_process

from storekeeper.fs.narfs import nar_hash_path

pytestmark = [pytest.mark.slow, pytest.mark.root, needs_nix]

SK = [sys.executable, "-m", "storekeeper.cli.main"]
EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2
SKIP = 77  # the script's exit status for "cannot do this here"


class Ext4Image:
    """A fresh 128 MiB ext4 file system on a loop device, mounted at ``mnt``."""

    def __init__(self, d: str) -> None:
        self.img, self.mnt = os.path.join(d, "img"), os.path.join(d, "mnt")
        os.makedirs(self.mnt)
        with open(self.img, "wb") as f:
            f.truncate(128 * 2**20)
        subprocess.run(["mkfs.ext4", "-q", "-F", self.img], check=True, capture_output=True, timeout=60)
        self.mount()

    def mount(self) -> None:
        subprocess.run(["mount", "-o", "loop", self.img, self.mnt], check=True, capture_output=True,
                       timeout=60)

    def umount(self) -> None:
        subprocess.run(["umount", self.mnt], check=True, capture_output=True, timeout=60)

    def power_cut(self, daemon: subprocess.Popen | None = None) -> int:
        """Stop the file system now: nothing not yet on disk (data or journal) gets there
        (a daemon using it is stopped after that, so that it can be unmounted).  Then
        e2fsck and mount again; returns e2fsck's exit status."""
        fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)
        if daemon is not None:
            stop_process(daemon)
        self.umount()
        fsck = subprocess.run(["e2fsck", "-fy", self.img], capture_output=True, text=True, timeout=120)
        self.mount()
        return fsck.returncode


def scenario(d: str, fsync: bool, daemon: bool) -> dict:
    """add (by our CLI, or real ``nix-store --add`` through our daemon), power cut, and
    what is found afterwards.  Runs inside the private mount namespace."""
    try:
        ext4 = Ext4Image(os.path.join(d, "fs"))
    except subprocess.CalledProcessError as e:
        print(f"cannot loop-mount ext4 here: {(e.stderr or b'').decode().strip()}", file=sys.stderr)
        sys.exit(SKIP)
    env = nix_env(d)
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
        f.write(f"fsync-store-paths = {'true' if fsync else 'false'}\n")
    root = os.path.join(ext4.mnt, "root")
    subprocess.run([*SK, "--store", root, "init"], env=env, check=True, capture_output=True, timeout=60)
    src = os.path.join(d, "src")
    for i in range(20):  # small files: no early writeback of their own
        name = os.path.join(src, "sub" if i % 2 else "", f"f{i}")
        os.makedirs(os.path.dirname(name), exist_ok=True)
        with open(name, "wb") as f:
            f.write(os.urandom(50_000 + i * 1000))
    want = nar_hash_path(src)[0].typed("base32")
    proc = None
    if daemon:
        sock = os.path.join(d, "sock")
        proc = start_daemon("ours", root, sock, env)
        cmd = ["nix-store", "--store", f"unix://{sock}", "--add", src]
    else:
        cmd = [*SK, "--store", root, "add", src]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            return {"add": r.returncode, "add_err": r.stderr}
        fsck = ext4.power_cut(proc)
    finally:
        if proc is not None:
            stop_process(proc)
    path = r.stdout.strip()
    q = subprocess.run([*SK, "--store", root, "query", "--hash", path], env=env, capture_output=True,
                       text=True, timeout=60)
    try:
        on_disk = nar_hash_path(root + path)[0].typed("base32")
    except OSError as e:
        on_disk = str(e)
    ours = subprocess.run([*SK, "--store", root, "verify", "--check-contents"], env=env,
                          capture_output=True, text=True, timeout=120)
    nix = subprocess.run(["nix-store", "--store", root, "--verify", "--check-contents"], env=env,
                         capture_output=True, text=True, timeout=120)
    ext4.umount()
    return {"add": 0, "path": path, "want": want, "fsck": fsck, "query": q.returncode,
            "recorded": q.stdout.strip(), "query_err": q.stderr, "on_disk": on_disk,
            "ours": ours.returncode, "ours_err": ours.stdout + ours.stderr,
            "nix": nix.returncode, "nix_err": nix.stderr}


def power_cut_after_add(tmp_path, fsync: bool, daemon: bool = False) -> dict:
    if os.geteuid() != 0:
        pytest.skip("loop-mounting a file system needs root")
    for tool in ("mkfs.ext4", "e2fsck", "unshare"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool}")
    d = tempfile.mkdtemp(prefix="sk-durable-", dir=str(tmp_path))
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, __file__,
                        d, str(fsync), str(daemon)], capture_output=True, text=True, timeout=600)
    if r.returncode == SKIP:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["add"] == 0, res["add_err"]
    assert res["fsck"] in (0, 1), res  # 1: errors corrected (a power cut may leave some)
    return res


@pytest.mark.parametrize("daemon", [False, True], ids=["cli", "daemon"])
def test_an_add_that_returned_0_survives_a_power_cut(tmp_path, daemon):
    res = power_cut_after_add(tmp_path, fsync=True, daemon=daemon)
    assert res["query"] == 0, f"{res['path']} is not valid after the power cut: {res['query_err']}"
    assert res["recorded"] == res["want"]
    assert res["on_disk"] == res["want"], "the contents changed"
    assert res["ours"] == 0, res["ours_err"]
    assert res["nix"] == 0 and "modified" not in res["nix_err"], res["nix_err"]


def test_without_fsync_store_paths_the_same_add_is_damaged(tmp_path):
    """Why the setting matters: the row is there, the file data is not."""
    res = power_cut_after_add(tmp_path, fsync=False)
    assert res["query"] == 0 and res["recorded"] == res["want"]  # registered...
    assert res["on_disk"] != res["want"]  # ...with other contents
    assert res["ours"] != 0 and f"path '{res['path']}' was modified" in res["ours_err"]
    assert f"path '{res['path']}' was modified" in res["nix_err"]


if __name__ == "__main__":  # inside `unshare --mount --propagation private` (module docstring)
    print(json.dumps(scenario(sys.argv[1], sys.argv[2] == "True", sys.argv[3] == "True")))
