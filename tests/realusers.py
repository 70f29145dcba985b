"""Helpers for tests with real unprivileged users: users with homes, a daemon running as
one of them, the CLI run as another, and a PID namespace whose /proc has ``hidepid=2``.

Everything runs from this venv's interpreter (made from Debian's /usr/bin/python3, so
other users can run it).  Needs root, ``useradd``, ``runuser`` (tests skip otherwise).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from daemon_util import wait_for_socket

needs_root_users = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None,
    reason="needs root, useradd and runuser to create real users")

PATH = "/usr/local/bin:/usr/bin:/bin"
SK = [sys.executable, "-c", "import sys; from storekeeper.cli.main import main; sys.exit(main())"]


@dataclass(frozen=True)
class User:
    pw_name: str
    pw_uid: int
    pw_gid: int
    home: str


@contextmanager
def real_users(base: str, *tags: str):
    """{tag: User} of fresh users, each with a home ``<base>/home-<tag>`` (0700)."""
    made: list[str] = []
    try:
        out = {}
        for tag in tags:
            name = f"sk{os.getpid() % 100000}{tag}"
            subprocess.run(["useradd", "-M", "-N", "-s", "/bin/sh", name], check=True,
                           capture_output=True)
            made.append(name)
            u = pwd.getpwnam(name)
            home = os.path.join(base, f"home-{tag}")
            os.mkdir(home, 0o700)
            os.chown(home, u.pw_uid, u.pw_gid)
            out[tag] = User(name, u.pw_uid, u.pw_gid, home)
        yield out
    finally:
        for name in made:
            # (a daemon just stopped may still be on its way out: bounded retries)
            for _ in range(50):
                if subprocess.run(["userdel", name], capture_output=True).returncode in (0, 6):
                    break
                time.sleep(0.1)


def user_env(user, home: str, **extra: str) -> list[str]:
    env = {"PATH": PATH, "HOME": home, "USER": user.pw_name, **extra}
    return ["env", "-i", *(f"{k}={v}" for k, v in env.items())]


class PidNamespace:
    """A PID namespace with its own /proc, remounted ``hidepid=2``; everything in it dies with
    it (``--kill-child``).  ``prefix`` runs a command inside."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
             "mount -o remount,hidepid=2 /proc && echo ready && exec sleep 300"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.close()
            pytest.skip(f"cannot make a PID namespace with hidepid=2 here: {err.strip() or line}")
        deadline = time.monotonic() + 10
        kids: list[str] = []
        while not kids and time.monotonic() < deadline:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                kids = f.read().split()
            time.sleep(0.01)
        self.init_pid = int(kids[0])
        self.prefix = ["nsenter", "-t", str(self.init_pid), "-p", "-m", "--"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def as_user(user, argv: list[str], prefix: list[str] = (), env: dict | None = None,
            home: str | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``argv`` as ``user`` (in its home, with a minimal environment) and wait."""
    return subprocess.run([*prefix, "runuser", "-u", user.pw_name, "--",
                           *user_env(user, home or user.home, **(env or {})), *argv],
                          capture_output=True, text=True, timeout=kw.pop("timeout", 120),
                          cwd=home or user.home, **kw)


def spawn_as(user, argv: list[str], prefix: list[str] = (), env: dict | None = None,
             home: str | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([*prefix, "runuser", "-u", user.pw_name, "--",
                             *user_env(user, home or user.home, **(env or {})), *argv],
                            cwd=home or user.home, **kw)


def sk_as(user, url: str, *args: str, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    """The storekeeper CLI as ``user`` against ``url``."""
    return as_user(user, [*SK, "--store", url, *args], prefix)


def start_daemon_as(user, srv: str, conf: str, prefix: list[str] = ()) -> tuple[subprocess.Popen, str, str]:
    """storekeeper's daemon as ``user`` serving ``local?store=<srv>/store…`` (``srv`` made for
    it); returns (process, socket, client store URL)."""
    os.makedirs(srv, exist_ok=True)
    os.chown(srv, user.pw_uid, user.pw_gid)
    os.chmod(srv, 0o755)
    etc = os.path.join(srv, "etc")
    os.makedirs(etc, exist_ok=True)
    with open(os.path.join(etc, "nix.conf"), "w") as f:
        f.write(conf)
    sock = os.path.join(srv, "daemon.sock")
    store = os.path.join(srv, "store")
    url = f"local?store={store}&state={srv}/state&log={srv}/log"
    with open(os.path.join(os.path.dirname(srv), "daemon.log"), "ab") as log:
        proc = spawn_as(user, [sys.executable, "-m", "storekeeper.daemon", "--store", url,
                               "--socket", sock], prefix, env={"NIX_CONF_DIR": etc}, home=srv,
                        stdout=subprocess.DEVNULL, stderr=log)
    wait_for_socket(sock, proc)
    return proc, sock, f"unix://{sock}?store={store}"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
