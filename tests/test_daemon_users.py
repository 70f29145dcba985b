"""Real unprivileged users against our daemon and the real nix-daemon, configured alike.

Both daemons run as root with ``allowed-users = <user1>``.  The real
``nix-store`` runs as each user (``runuser``): user1 is served, untrusted;
user2 is turned away before a byte is written; user1 cannot import an
unsigned, non-content-addressed path.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import pytest
from conftest import HAVE_NIX, nix_env
from daemon_util import start_daemon, stop_process

from storekeeper.client import RemoteStore

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None
                       or shutil.which("runuser") is None,
                       reason="needs root, useradd and runuser to create real users"),
    pytest.mark.skipif(not HAVE_NIX, reason="real Nix (nix-bin) not installed"),
    pytest.mark.nix,
]


@pytest.fixture
def users(shared_dir):
    names = [f"skd{os.getpid() % 100000}{c}" for c in "ab"]
    made = []
    try:
        for n in names:
            subprocess.run(["useradd", "-M", "-N", "-s", "/bin/sh", n], check=True, capture_output=True)
            made.append(n)
        out = []
        for n in names:
            u = pwd.getpwnam(n)
            home = os.path.join(shared_dir, f"home-{n}")
            os.mkdir(home, 0o700)
            os.chown(home, u.pw_uid, u.pw_gid)
            out.append(u)
        yield out
    finally:
        for n in made:
            subprocess.run(["userdel", n], capture_output=True)


def daemon_allowing(kind: str, base: str, allowed: str) -> tuple[subprocess.Popen, str, str]:
    root, sock = os.path.join(base, f"{kind}-root"), os.path.join(base, f"{kind}.sock")
    env = nix_env(os.path.join(base, f"{kind}-env"))
    if kind == "ours":
        return start_daemon(kind, root, sock, env, "--allowed-users", allowed), sock, root
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
        f.write(f"allowed-users = {allowed}\n")
    return start_daemon(kind, root, sock, env), sock, root


def as_user(user, base: str, sock: str, *cmd: str, input: bytes | None = None):
    """Real Nix as ``user``, with only the environment it needs, all in places it owns."""
    home = os.path.join(base, f"home-{user.pw_name}")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
           "XDG_CACHE_HOME": os.path.join(home, ".cache"), "NIX_CONF_DIR": os.path.join(home, "etc"),
           "NIX_STATE_DIR": os.path.join(home, "state"), "NIX_LOG_DIR": os.path.join(home, "log"),
           "NIX_REMOTE": f"unix://{sock}"}
    return subprocess.run(["runuser", "-u", user.pw_name, "--", "env", "-i",
                           *(f"{k}={v}" for k, v in env.items()), *cmd],
                          input=input, capture_output=True, timeout=60)


@pytest.mark.parametrize("kind", ["ours", "nix"])
def test_allowed_user_is_served_untrusted_and_others_are_refused(kind, users, shared_dir, tmp_path):
    user1, user2 = users
    # Something to export: a non-CA path from a separate store, made by real Nix as root.
    src = tmp_path / "exported.txt"
    src.write_text("exported by root\n")
    other = str(tmp_path / "other-root")
    env = nix_env(str(tmp_path))
    exported_path = subprocess.run(["nix-store", "--store", other, "--add", str(src)], env=env,
                                   check=True, capture_output=True).stdout.decode().strip()
    export = subprocess.run(["nix-store", "--store", other, "--export", exported_path], env=env,
                            check=True, capture_output=True).stdout

    proc, sock, root = daemon_allowing(kind, shared_dir, user1.pw_name)
    try:
        with RemoteStore(sock, timeout=30, log=lambda m: None) as store:  # root: trusted
            hello = store.add_text("users-hello.txt", b"hello users\n")
        want = hello.nar_hash.typed("nix32") + "\n"

        r = as_user(user1, shared_dir, sock, "nix-store", "-q", "--hash", store.print_path(hello.path))
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode() == want

        r = as_user(user2, shared_dir, sock, "nix-store", "-q", "--hash", store.print_path(hello.path))
        assert r.returncode != 0
        err = r.stderr.decode()
        assert "cannot open connection to remote store" in err
        # (which end notices first is a race, for the real daemon as for ours)
        assert any(why in err for why in ("Connection reset by peer", "Broken pipe",
                                          "unexpected end-of-file")), err

        # Untrusted: an unsigned import is refused, and nothing is registered.
        r = as_user(user1, shared_dir, sock, "nix-store", "--import", input=export)
        assert r.returncode != 0 and b"lacks a valid signature" in r.stderr
        # ... while a content-addressed add needs no signature.
        mine = os.path.join(shared_dir, f"home-{user1.pw_name}", "mine.txt")
        with open(mine, "w") as f:
            f.write(f"{kind} file of {user1.pw_name}\n")
        os.chown(mine, user1.pw_uid, user1.pw_gid)
        r = as_user(user1, shared_dir, sock, "nix-store", "--add-fixed", "sha256", mine)
        assert r.returncode == 0, r.stderr.decode()
        with RemoteStore(sock, timeout=30, log=lambda m: None) as store:
            assert not store.is_valid(store.parse_path(exported_path))
            assert store.is_valid(store.parse_path(r.stdout.decode().strip()))
        # The daemon made the user's per-user root dirs, owned by the user.
        per_user = os.path.join(root, "nix/var/nix/gcroots/per-user", user1.pw_name)
        assert os.stat(per_user).st_uid == user1.pw_uid
        assert not os.path.exists(os.path.join(root, "nix/var/nix/gcroots/per-user", user2.pw_name))
    finally:
        stop_process(proc)
