"""A store on a file system mounted read-only (an HPC node's /nix over NFS, an image):
``?read-only=true`` answers every query as on the writable store, writes fail with one
line, and the plain URL says what to do.  The read-only mount is a bind mount in a
private mount namespace (``unshare -m``), so nothing outside the test sees it."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest
from daemon_util import our_daemon_cmd, wait_for_socket

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root and unshare(1) for a private read-only bind mount")]

SK = [sys.executable, "-m", "storekeeper.cli.main"]


def sk(root: str, *args: str, url: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SK, "--store", url or root, *args], capture_output=True,
                          text=True, timeout=60)


def on_read_only_mount(root: str, commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """Run each storekeeper command with ``root`` bind-mounted read-only in a private mount
    namespace; each one's exit code, stdout and stderr."""
    script = f"mount --bind {root} {root} && mount -o remount,bind,ro {root} || exit 99\n"
    outdir = os.path.join(os.path.dirname(root), "ro-out")
    os.makedirs(outdir, exist_ok=True)
    for i, cmd in enumerate(commands):
        quoted = " ".join("'" + c.replace("'", "'\\''") + "'" for c in [*SK, *cmd])
        script += f"{quoted} >{outdir}/{i}.out 2>{outdir}/{i}.err; echo $? >{outdir}/{i}.rc\n"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 99, r.stderr
    results = []
    for i in range(len(commands)):
        with open(f"{outdir}/{i}.rc") as rc, open(f"{outdir}/{i}.out") as out, \
                open(f"{outdir}/{i}.err") as err:
            results.append((int(rc.read()), out.read(), err.read()))
    return results


def make_store(tmp_path) -> tuple[str, str, str]:
    root = str(tmp_path / "root")
    (tmp_path / "a").write_text("alpha\n")
    a = sk(root, "add", str(tmp_path / "a")).stdout.strip()
    (tmp_path / "b").write_text(f"refers to {a}\n")
    b = sk(root, "add-text", "b", str(tmp_path / "b"), "--ref", a).stdout.strip()
    assert a and b
    return root, a, b


def test_queries_on_a_read_only_mount_answer_as_on_the_writable_store(tmp_path):
    root, a, b = make_store(tmp_path)
    url = f"local?root={root}&read-only=true"
    queries = [["query", "--hash", a, b], ["query", "--requisites", b], ["path-info", "-s", a, b],
               ["gc", "--print-dead"], ["gc", "--print-live"], ["verify", "--check-contents"],
               ["dump", a], ["why-alive", a], ["roots", "--no-size"]]
    writable = [sk(root, *q, url=url) for q in queries]
    # (why-alive exits 1 for a path nothing keeps alive)
    assert [w.returncode for w in writable] == [0] * 7 + [1, 0], [w.stderr for w in writable]
    assert sorted(writable[3].stdout.split()) == sorted([a, b])  # nothing roots them
    writes = [["add", str(tmp_path / "a")], ["gc"], ["optimise"], ["delete", b]]
    got = on_read_only_mount(root, [["--store", url, *q] for q in queries + writes]
                             + [["--store", root, "query", "--hash", a]])
    for q, w, (code, out, err) in zip(queries, writable, got):
        assert (code, out) == (w.returncode, w.stdout), (q, err)
        assert "Traceback" not in err
    for q, (code, _out, err) in zip(writes, got[len(queries):]):
        assert code != 0 and "read-only" in err and len(err.strip().splitlines()) == 1, (q, err)
    code, _, err = got[-1]  # the plain URL: one line saying what to do
    assert code != 0 and "read-only=true" in err and len(err.strip().splitlines()) == 1, err
    # and nothing was written: the store is as it was
    assert sk(root, "verify", "--check-contents").returncode == 0
    assert sorted(sk(root, "gc", "--print-dead").stdout.split()) == sorted([a, b])


def test_a_non_empty_wal_on_a_read_only_mount_is_reported(tmp_path):
    """An image taken while a writer had the database open: its WAL holds the last
    registration, which an immutable (lock-free) open cannot read; we warn."""
    root, a, _ = make_store(tmp_path)
    db = os.path.join(root, "nix", "var", "nix", "db", "db.sqlite")
    keep = sqlite3.connect(db)  # holds the WAL open: the add below stays in it
    try:
        keep.execute("select count(*) from ValidPaths").fetchone()
        (tmp_path / "c").write_text("gamma\n")
        c = sk(root, "add", str(tmp_path / "c")).stdout.strip()
        assert os.path.getsize(db + "-wal") > 0
        image = str(tmp_path / "image" / "root")
        shutil.copytree(root, image, symlinks=True)
    finally:
        keep.close()
    url = f"local?root={image}&read-only=true"
    (code_a, out_a, err_a), (code_c, _, _) = on_read_only_mount(
        image, [["--store", url, "query", "--hash", a], ["--store", url, "query", "--hash", c]])
    assert code_a == 0 and out_a.startswith("sha256:")
    assert "-wal' is not empty" in err_a and "may be missing" in err_a
    assert code_c != 0  # the registration only in the WAL is not seen, as the warning says


def test_daemon_writes_a_store_mounted_read_only_for_everyone_else(tmp_path):
    """The store dir bind-mounted read-only on itself (as NixOS mounts /nix/store): our
    daemon, started as root, writes it from a private mount namespace; every other
    process (root's shell here) still gets EROFS there."""
    root, _, b = make_store(tmp_path)
    store = os.path.join(root, "nix", "store")
    sock, pidfile = str(tmp_path / "sock"), str(tmp_path / "daemon.pid")
    daemon = " ".join(our_daemon_cmd("--store", root, "--socket", sock))
    # the shell stays in the namespace where the store is read-only; the daemon is its child
    outer = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                              f"mount --bind {store} {store} && mount -o remount,bind,ro {store} "
                              f"|| exit 99; {daemon} & echo $! >{pidfile}; wait"])
    try:
        wait_for_socket(sock, outer)
        shell_ns = ["nsenter", "-t", str(outer.pid), "-m"]
        # outside the daemon: read-only, root or not
        touch = subprocess.run([*shell_ns, "touch", os.path.join(store, "x")],
                               capture_output=True, text=True, timeout=30)
        assert touch.returncode != 0 and "Read-only file system" in touch.stderr
        # through the daemon, from that same namespace: adds and deletes work
        (tmp_path / "new").write_text("written through the daemon\n")
        client = [*shell_ns, *SK, "--store", f"unix://{sock}"]
        added = subprocess.run([*client, "add", str(tmp_path / "new")], capture_output=True,
                               text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        new = added.stdout.strip()
        cat = subprocess.run([*shell_ns, "cat", os.path.join(store, new.rsplit("/", 1)[1])],
                             capture_output=True, text=True, timeout=30)
        assert cat.stdout == "written through the daemon\n"
        gc = subprocess.run([*client, "delete", b], capture_output=True, text=True, timeout=60)
        assert gc.returncode == 0, gc.stderr
        assert not os.path.lexists(os.path.join(store, b.rsplit("/", 1)[1]))
        # and the daemon's own namespace is another one, with the store writable
        with open(pidfile) as f:
            daemon_pid = int(f.read())
        assert os.readlink(f"/proc/{daemon_pid}/ns/mnt") != os.readlink(f"/proc/{outer.pid}/ns/mnt")
    finally:
        if os.path.exists(pidfile):
            with open(pidfile) as f:
                os.kill(int(f.read()), signal.SIGTERM)  # (the shell then returns)
        outer.wait(30)
    # this process's namespace never saw any of the mounts
    assert not any(store in line for line in open("/proc/self/mountinfo"))
