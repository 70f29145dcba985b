"""A full disk, for real: a 64 MiB tmpfs made by the test (root only; skipped otherwise).

GC must get a full disk back (the reserve ``<state>/db/reserved`` is freed first,
as Nix 2.8 does), locally and through our daemon; an add bigger than the free
space succeeds when auto-GC can make room; and what fails says so in one line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import nix_env
from daemon_util import start_daemon, stop_process

from storekeeper.store.reserve import STEP

pytestmark = [pytest.mark.slow, pytest.mark.root]

SK = [sys.executable, "-m", "storekeeper.cli.main"]
MiB = 2**20


@pytest.fixture
def small_fs():
    """A size-limited tmpfs, always unmounted again."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    d = tempfile.mkdtemp(prefix="sk-fullfs-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", d],
                       capture_output=True, timeout=30)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        if subprocess.run(["umount", d], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", d], capture_output=True, timeout=30)
        shutil.rmtree(d, ignore_errors=True)


def free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(fs_dir: str, leave: int = 0) -> None:
    """Fill the file system until only ``leave`` bytes (rounded to pages) are free."""
    with open(os.path.join(fs_dir, "filler"), "wb") as f:
        chunk = b"\0" * MiB
        try:
            while free(fs_dir) - leave >= MiB:
                f.write(chunk)
                f.flush()
            rest = free(fs_dir) - leave
            if rest > 0:
                f.write(b"\0" * rest)
                f.flush()
        except OSError:
            pass
    if leave == 0:
        # the last page or two: a small file (or an in-memory add written straight at
        # its name) would still fit there, and "full" must mean full
        for n in range(64):
            try:
                with open(os.path.join(fs_dir, f"filler-{n}"), "wb") as f:
                    f.write(b"\0" * 4096)
            except OSError:
                break
    assert free(fs_dir) <= leave + 4096


def sk(args: list[str], env: dict[str, str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(SK + args, capture_output=True, text=True, timeout=120, env=env, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"storekeeper {args} failed ({r.returncode}): {r.stderr}")
    return r


def add_dead_paths(root: str, env: dict[str, str], tmp: str, n: int = 3, size: int = 6 * MiB) -> list[str]:
    paths = []
    for i in range(n):
        blob = os.path.join(tmp, f"blob{i}")
        with open(blob, "wb") as f:
            f.write(os.urandom(size))
        paths.append(sk(["--store", root, "add", blob], env).stdout.strip())
    return paths


def real(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def test_store_open_makes_the_reserve_like_nix(small_fs, tmp_path):
    env = nix_env(str(tmp_path))
    root = os.path.join(small_fs, "root")
    sk(["--store", root, "init"], env)
    reserved = os.path.join(root, "nix", "var", "nix", "db", "reserved")
    st = os.stat(reserved)
    assert st.st_size == 8 * MiB and st.st_mode & 0o777 == 0o600
    # real Nix 2.8 on the same kind of store: the same file
    nroot = os.path.join(small_fs, "nixroot")
    subprocess.run(["nix-store", "--store", nroot, "--init"], env=env, check=True,
                   capture_output=True, timeout=60)
    nst = os.stat(os.path.join(nroot, "nix", "var", "nix", "db", "reserved"))
    assert (nst.st_size, nst.st_mode & 0o777) == (st.st_size, st.st_mode & 0o777)


def test_local_gc_frees_a_full_disk(small_fs, tmp_path):
    env = nix_env(str(tmp_path))
    root = os.path.join(small_fs, "root")
    dead = add_dead_paths(root, env, str(tmp_path))
    fill(small_fs)
    # a write fails, in one line naming where
    blob = tmp_path / "more"
    blob.write_bytes(os.urandom(2 * MiB))
    r = sk(["--store", root, "add", str(blob)], env, check=False)
    assert r.returncode != 0 and r.stderr.startswith("error:") and len(r.stderr.splitlines()) == 1, r.stderr
    assert small_fs in r.stderr
    r = sk(["--store", root, "gc"], env)
    assert "3 store paths deleted" in r.stdout
    assert not any(os.path.lexists(real(root, p)) for p in dead)
    assert free(small_fs) >= 3 * 6 * MiB - MiB
    # and the store works again, the reserve made anew
    sk(["--store", root, "add", str(blob)], env)
    assert os.path.getsize(os.path.join(root, "nix", "var", "nix", "db", "reserved")) == 8 * MiB


def test_gc_through_the_daemon_frees_a_full_disk(small_fs, tmp_path):
    env = nix_env(str(tmp_path))
    root = os.path.join(small_fs, "root")
    dead = add_dead_paths(root, env, str(tmp_path))
    sock = str(tmp_path / "sock")
    proc = start_daemon("ours", root, sock, env)
    try:
        fill(small_fs)
        r = sk(["--store", f"unix://{sock}", "gc"], env)
        assert "3 store paths deleted" in r.stdout, r.stderr
        assert not any(os.path.lexists(real(root, p)) for p in dead)
        assert free(small_fs) >= 3 * 6 * MiB - MiB
    finally:
        stop_process(proc)


def test_auto_gc_makes_room_for_an_add_bigger_than_the_free_space(small_fs, tmp_path):
    env = nix_env(str(tmp_path))
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
        f.write(f"min-free = {4 * MiB}\n")
    root = os.path.join(small_fs, "root")
    dead = add_dead_paths(root, env, str(tmp_path), n=4)
    fill(small_fs, leave=6 * MiB)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(12 * MiB))
    r = sk(["--store", root, "add", str(big)], env)
    added = r.stdout.strip()
    assert os.path.getsize(real(root, added)) == 12 * MiB
    assert sum(os.path.lexists(real(root, p)) for p in dead) < len(dead)


def test_read_only_file_system_is_named(small_fs, tmp_path):
    env = nix_env(str(tmp_path))
    root = os.path.join(small_fs, "root")
    add_dead_paths(root, env, str(tmp_path), n=1, size=MiB)
    subprocess.run(["mount", "-o", "remount,ro", small_fs], check=True, timeout=30)
    try:
        blob = tmp_path / "new"
        blob.write_bytes(b"new\n")
        for args in (["add", str(blob)], ["gc"]):
            r = sk(["--store", root, *args], env, check=False)
            assert r.returncode == 74 and "Traceback" not in r.stderr, r.stderr
            assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
            assert small_fs in r.stderr and "Read-only file system" in r.stderr
    finally:
        subprocess.run(["mount", "-o", "remount,rw", small_fs], timeout=30)


def test_out_of_space_and_read_only_through_the_daemon_name_the_path(small_fs, tmp_path):
    """Item 8: what a real client of our daemon is told on a full disk names where, and
    a daemon started on a read-only file system says which file it could not write."""
    env = nix_env(str(tmp_path))
    root = os.path.join(small_fs, "root")
    add_dead_paths(root, env, str(tmp_path), n=1, size=MiB)
    sock = str(tmp_path / "sock")
    proc = start_daemon("ours", root, sock, env)
    try:
        fill(small_fs)
        big, small = tmp_path / "big", tmp_path / "small"
        big.write_bytes(os.urandom(2 * MiB))
        small.write_bytes(b"small\n")
        reserve = os.path.join(root, "nix/var/nix/db/reserved")
        for blob in (big, small):
            before = os.path.getsize(reserve)
            r = subprocess.run(["nix-store", "--store", f"unix://{sock}", "--add", str(blob)], env=env,
                               capture_output=True, text=True, timeout=120)
            if blob is small and r.returncode == 0:
                # the connection's first temp-root write gave up one step of the reserve
                # (store/reserve.py) and a tiny path fits in it; never more than that step
                assert before - os.path.getsize(reserve) == STEP, r.stderr
                continue
            assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
            assert "No space left on device" in r.stderr and f"'{small_fs}/" in r.stderr, r.stderr
    finally:
        stop_process(proc)
    for name in os.listdir(small_fs):
        if name.startswith("filler"):
            os.unlink(os.path.join(small_fs, name))
    subprocess.run(["mount", "-o", "remount,ro", small_fs], check=True, timeout=30)
    try:
        r = subprocess.run([sys.executable, "-m", "storekeeper.daemon", "--store", root, "--socket", sock],
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        last = r.stderr.splitlines()[-1]
        assert last.startswith(f"error: Read-only file system: '{small_fs}/"), r.stderr
    finally:
        subprocess.run(["mount", "-o", "remount,rw", small_fs], timeout=30)
