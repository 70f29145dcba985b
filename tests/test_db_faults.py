"""Faults of the SQLite database, injected for real: each is one ``error: …`` line naming
the database, with no traceback; a writer waiting for another one says so, once.

(A full disk and a read-only file system are in test_full_disk.py: they need root.)
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import needs_nix, nix_env
from daemon_util import start_daemon, stop_process

from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

SK = [sys.executable, "-m", "storekeeper.cli.main"]


def sk(root: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run([*SK, "--store", root, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"storekeeper {args} failed ({r.returncode}): {r.stderr}")
    return r


@pytest.fixture
def populated(tmp_path):
    """A store with a few paths, its database file, and one of its paths."""
    root = str(tmp_path / "root")
    with LocalStore(LocalLayout.chroot(root)) as store:
        paths = [store.print_path(store.add_text(f"f{i}", f"file {i}\n".encode() * 50).path)
                 for i in range(12)]
    db = os.path.join(root, "nix", "var", "nix", "db", "db.sqlite")
    return root, db, paths


def one_error_line(r: subprocess.CompletedProcess, db: str, exit_code: int | None = None) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    # (progress lines such as "finding garbage collector roots..." may come first)
    errors = [line for line in lines if line.startswith("error")]
    assert errors == lines[-1:] and errors[0].startswith("error: "), r.stderr
    assert db in errors[0], r.stderr
    if exit_code is not None:
        assert r.returncode == exit_code, r.stderr


def test_corrupt_table_pages(populated):
    root, db, paths = populated
    with open(db, "r+b") as f:
        data = bytearray(f.read())
        for i in range(4096 + 64, len(data), 7):  # every page but the header page
            data[i] = 0x5A
        f.seek(0)
        f.write(data)
    for args in (("verify",), ("path-info", paths[0]), ("gc",)):
        r = sk(root, *args, check=False)
        one_error_line(r, db, 1)
        assert "malformed" in r.stderr or "not a database" in r.stderr


def test_file_is_not_a_database(populated):
    root, db, paths = populated
    with open(db, "wb") as f:
        f.write(os.urandom(8192))
    for f in (db + "-wal", db + "-shm"):
        if os.path.exists(f):
            os.unlink(f)
    r = sk(root, "path-info", paths[0], check=False)
    one_error_line(r, db, 1)
    assert "file is not a database" in r.stderr


def test_missing_table(populated):
    root, db, paths = populated
    conn = sqlite3.connect(db)
    conn.execute("drop table Refs")
    conn.commit()
    conn.close()
    r = sk(root, "query", "--references", paths[0], check=False)
    one_error_line(r, db, 1)
    assert "no such table: Refs" in r.stderr


def test_database_that_cannot_be_opened(populated, tmp_path):
    root, db, paths = populated
    for f in (db, db + "-wal", db + "-shm"):
        if os.path.exists(f):
            os.unlink(f)
    os.mkdir(db)  # where the file should be
    r = sk(root, "path-info", paths[0], check=False)
    one_error_line(r, db)


@pytest.mark.slow  # (waits for the busy warning: seconds)
def test_a_waiting_writer_says_so_once(populated, tmp_path):
    root, db, _ = populated
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         f"c = sqlite3.connect({db!r}, isolation_level=None)\n"
         "c.execute('begin immediate')\n"
         "print('held', flush=True)\n"
         "time.sleep(float(sys.argv[1]))\n"
         "c.execute('commit')\n", "3.5"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        f = tmp_path / "new"
        f.write_text("new\n")
        t0 = time.monotonic()
        r = sk(root, "add", str(f), timeout=60)
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert waited >= 2.5, "the add did not wait for the writer"
    assert r.stdout.startswith("/nix/store/")
    busy = [line for line in r.stderr.splitlines() if "is busy" in line]
    assert len(busy) == 1 and db in busy[0] and busy[0].startswith("warning: "), r.stderr


def test_verify_finds_a_damaged_index_page(populated):
    """A page that no query of verify reads (an index of Refs) is still checked with
    --check-contents and with --repair (a plain verify reads what Nix's does)."""
    root, db, paths = populated
    conn = sqlite3.connect(db)
    (rootpage,) = conn.execute("select rootpage from sqlite_master where name = 'IndexReference'").fetchone()
    (page_size,) = conn.execute("pragma page_size").fetchone()
    conn.close()
    assert sk(root, "verify").returncode == 0
    with open(db, "r+b") as f:
        f.seek((rootpage - 1) * page_size)
        page = bytearray(f.read(page_size))
        page[0] = 0xFF  # not a b-tree page type
        f.seek((rootpage - 1) * page_size)
        f.write(page)
    for how in ("--check-contents", "--repair"):
        r = sk(root, "verify", how, check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert db in r.stdout + r.stderr and "damaged" in r.stdout + r.stderr, r.stdout + r.stderr
    # what a query reads still works: the damage is found by verify, not by luck
    assert sk(root, "path-info", paths[0]).returncode == 0


@needs_nix
@pytest.mark.nix
def test_a_waiting_writer_in_the_daemon_tells_the_client(populated, tmp_path):
    root, db, _ = populated
    sock = str(tmp_path / "sock")
    env = nix_env(str(tmp_path))
    proc = start_daemon("ours", root, sock, env)
    holder = None
    try:
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import sqlite3, sys, time\n"
             f"c = sqlite3.connect({db!r}, isolation_level=None)\n"
             "c.execute('begin immediate')\n"
             "print('held', flush=True)\n"
             "time.sleep(3.5)\n"
             "c.execute('commit')\n"],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        f = tmp_path / "via-daemon"
        f.write_text("via the daemon\n")
        r = subprocess.run(["nix-store", "--add", str(f)], capture_output=True, text=True, timeout=60,
                           env={**env, "NIX_REMOTE": f"unix://{sock}"})
        assert r.returncode == 0 and r.stdout.startswith("/nix/store/"), r.stderr
        busy = [line for line in r.stderr.splitlines() if "is busy" in line]
        assert len(busy) == 1 and db in busy[0] and busy[0].startswith("warning: "), r.stderr
        assert "warning: warning" not in r.stderr
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        stop_process(proc)
