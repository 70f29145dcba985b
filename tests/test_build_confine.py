"""Issue 11 items 5 and 6: what a build without the sandbox may not do, run as attacks.

Item 5 (daemon as root, build users, ``sandbox = false``, real nix-build): a builder
cannot make setuid/setgid files or set xattrs, gains nothing from a setuid program,
and what it leaves in shared places is gone after the build.  Item 6: builds that
would run as the daemon's own user are refused for untrusted real users (an
unprivileged daemon; a root daemon without build users), while the daemon's owner
still builds.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import subprocess

import pytest
from conftest import needs_nix
from daemon_util import strip_ansi
from realusers import PATH, needs_root_users, real_users, start_daemon_as, stop
from test_build import area_factory, build_users, drv_expr  # noqa: F401 -- fixtures

pytestmark = [needs_nix, pytest.mark.nix]

SH = "PATH=/bin:/usr/bin; "


def _build(a, name: str, script: str, conf: str = "") -> tuple[int, str, str]:
    args = ["nix-build", "--no-out-link"]
    for line in filter(None, conf.splitlines()):
        k, v = line.split("=", 1)
        args += ["--option", k.strip(), v.strip()]
    p = a.run([*args, "-E", drv_expr(name, SH + script)])
    return p.returncode, p.stdout.decode().strip(), strip_ansi(p.stderr.decode())


def _drop_dir(a) -> str:
    """A world-writable directory below the top level (the sweep does not look there)."""
    d = os.path.join(a.base, "drop")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o1777)
    return d


@pytest.mark.root
def test_builders_cannot_make_setuid_files_or_set_xattrs(area_factory, build_users):
    """chmod u+s / g+s (coreutils: fchmodat), python os.chmod/os.fchmod, and a file created
    with mode 04755 all fail with EPERM; setxattr with ENOTSUP; no setid file is left.

    Nix 2.8 refuses the chmod family and setxattr the same way, but not the create-with-mode
    calls (open/creat/mknod with 04755 make a setuid file under its filter too), nor
    fchmodat2 (glibc ≥ 2.39 on kernel ≥ 6.6 uses it for chmod)."""
    group, (u1, u2) = build_users
    a = area_factory(conf=f"build-users-group = {group}\n")
    a.start("ours")
    drop = _drop_dir(a)
    probe = os.path.join(a.base, "probe.py")
    with open(probe, "w") as f:
        f.write("import os\n"
                "def t(what, fn):\n"
                "    try:\n        fn(); print(what, 0)\n"
                "    except OSError as e: print(what, e.errno)\n"
                f"p = '{drop}/py'\nopen(p, 'w').close()\n"
                "t('chmod', lambda: os.chmod(p, 0o4755))\n"
                "t('fchmod', lambda: os.fchmod(os.open(p, os.O_RDONLY), 0o2755))\n"
                f"t('creat', lambda: os.close(os.open('{drop}/created', os.O_CREAT | os.O_WRONLY, 0o6755)))\n"
                "t('setxattr', lambda: os.setxattr(p, 'user.sk', b'1'))\n")
    os.chmod(probe, 0o644)
    script = (f"mkdir $out; touch {drop}/u {drop}/g; "
              f"chmod u+s {drop}/u 2>>$out/err; echo $? > $out/u; "
              f"chmod g+s {drop}/g 2>>$out/err; echo $? > $out/g; "
              f"/usr/bin/python3 {probe} > $out/py; "
              "grep NoNewPrivs /proc/self/status > $out/nnp")
    rc, out, err = _build(a, "setid", script)
    assert rc == 0, err
    assert open(f"{out}/u").read().strip() != "0" and open(f"{out}/g").read().strip() != "0"
    assert "Operation not permitted" in open(f"{out}/err").read()
    assert dict(line.split() for line in open(f"{out}/py")) == {
        "chmod": "1", "fchmod": "1", "creat": "1", "setxattr": "95"}
    assert open(f"{out}/nnp").read().split() == ["NoNewPrivs:", "1"]
    setid = [n for n in os.listdir(drop) if os.lstat(os.path.join(drop, n)).st_mode & 0o6000]
    assert setid == [] and os.stat(f"{drop}/u").st_uid == u1.pw_uid

    # filter-syscalls = false turns it off (the control: the same chmod then works)
    rc, out, err = _build(a, "setid-off", f"mkdir $out; touch {drop}/off; chmod u+s {drop}/off; "
                          "grep NoNewPrivs /proc/self/status > $out/nnp",
                          conf="filter-syscalls = false")
    assert rc == 0, err
    assert os.stat(f"{drop}/off").st_mode & 0o4000
    assert open(f"{out}/nnp").read().split() == ["NoNewPrivs:", "0"]


@pytest.mark.root
def test_a_setuid_program_gives_the_builder_nothing(area_factory, build_users):
    """no_new_privs: a setuid copy of ``id`` owned by the other build user reports the
    builder's own uid as effective uid, not that user's.  (Nix 2.8 sets it too.)"""
    group, (u1, u2) = build_users
    a = area_factory(conf=f"build-users-group = {group}\n")
    a.start("ours")
    suid = os.path.join(a.base, "suid-id")
    shutil.copy("/usr/bin/id", suid)
    os.chown(suid, u2.pw_uid, u2.pw_gid)
    os.chmod(suid, 0o4755)
    # (the control, outside any build: the bit works on this filesystem)
    r = subprocess.run(["runuser", "-u", u1.pw_name, "--", suid], capture_output=True, text=True)
    assert f"euid={u2.pw_uid}" in r.stdout, r.stdout + r.stderr
    rc, out, err = _build(a, "suid-exec", f"{suid} > $out")
    assert rc == 0, err
    text = open(out).read()
    assert f"uid={u1.pw_uid}" in text and "euid=" not in text, text


@pytest.mark.root
def test_files_a_build_user_leaves_in_shared_places_are_gone(area_factory, build_users):
    """Top-level leftovers in /tmp, /var/tmp, /dev/shm and the store dir, a tree, and a
    symlink to a directory are deleted after the build (failed or not), never followed;
    the other build user's files stay.  Nix 2.8 has no such sweep: all of it survives."""
    group, (u1, u2) = build_users
    a = area_factory(conf=f"build-users-group = {group}\n")
    a.start("ours")
    tag = f"sk-left-{secrets.token_hex(4)}"
    victim = os.path.join(a.base, "victim")
    os.mkdir(victim)
    with open(os.path.join(victim, "precious"), "w") as f:
        f.write("keep\n")
    left = [f"/tmp/{tag}", f"/tmp/{tag}-dir", f"/tmp/{tag}-link", f"/var/tmp/{tag}",
            f"/dev/shm/{tag}", os.path.join(a.store, tag)]
    theirs = f"/tmp/{tag}-theirs"
    with open(theirs, "w") as f:
        f.write("u2's\n")
    os.chown(theirs, u2.pw_uid, u2.pw_gid)
    try:
        script = (f"echo x > /tmp/{tag}; mkdir -p /tmp/{tag}-dir/a/b; echo y > /tmp/{tag}-dir/a/b/c; "
                  f"chmod 0500 /tmp/{tag}-dir/a; ln -s {victim} /tmp/{tag}-link; "
                  f"echo z > /var/tmp/{tag}; echo w > /dev/shm/{tag}; echo v > {a.store}/{tag}; ")
        rc, out, err = _build(a, "leftovers", script + "echo done > $out")
        assert rc == 0, err
        assert [p for p in left if os.path.lexists(p)] == []
        assert open(os.path.join(victim, "precious")).read() == "keep\n"
        assert os.path.exists(theirs)
        # a failing build is swept too
        rc, out, err = _build(a, "leftovers-fail", script + "exit 1")
        assert rc != 0
        assert [p for p in left if os.path.lexists(p)] == []
        # and what an earlier build left (say the daemon died) goes before the next one
        with open(f"/tmp/{tag}", "w") as f:
            f.write("stale\n")
        os.chown(f"/tmp/{tag}", u1.pw_uid, u1.pw_gid)
        rc, out, err = _build(a, "leftovers-pre", f"test -e /tmp/{tag} && echo seen > $out || echo gone > $out")
        assert rc == 0, err
        assert open(out).read().strip() == "gone"
    finally:
        for p in [*left, theirs]:
            if os.path.islink(p) or os.path.isfile(p):
                os.unlink(p)
            elif os.path.isdir(p):
                subprocess.run(["rm", "-rf", p])


# --- item 6: builds as the daemon's own user ---------------------------------------------------

def _nix_as(user, sock: str, store: str, *cmd: str) -> subprocess.CompletedProcess:
    """Real Nix as ``user`` against the daemon at ``sock`` (store dir ``store``)."""
    home = user.home
    etc = os.path.join(home, "etc")
    if not os.path.isdir(etc):
        os.makedirs(etc)
        with open(os.path.join(etc, "nix.conf"), "w") as f:
            f.write("substituters =\n")
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", etc], check=True)
    env = {"PATH": PATH, "HOME": home, "XDG_CACHE_HOME": os.path.join(home, ".cache"),
           "NIX_CONF_DIR": etc, "NIX_STATE_DIR": os.path.join(home, "state"),
           "NIX_LOG_DIR": os.path.join(home, "log"), "NIX_STORE_DIR": store,
           "NIX_REMOTE": f"unix://{sock}"}
    return subprocess.run(["runuser", "-u", user.pw_name, "--", "env", "-i",
                           *(f"{k}={v}" for k, v in env.items()), *cmd],
                          capture_output=True, text=True, timeout=120, cwd=home)


def _valid_paths(db: str) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return c.execute("select path, hash, registrationTime from ValidPaths order by path").fetchall()


def _expr(name: str, script: str) -> str:
    return drv_expr(name, SH + script)


@needs_root_users
def test_an_unprivileged_daemon_refuses_to_build_for_other_users(shared_dir):
    """A daemon running as a plain user has no build users: alice's builder would run as
    the daemon's uid and could rewrite db.sqlite.  Refused with one line; the daemon's
    owner still builds.  (Nix 2.8 runs alice's builder as the daemon's user.)"""
    with real_users(shared_dir, "d", "a") as users:
        owner, alice = users["d"], users["a"]
        srv = os.path.join(shared_dir, "srv")
        proc, sock, _ = start_daemon_as(owner, srv, "sandbox = false\nsubstituters =\n")
        try:
            store, db = os.path.join(srv, "store"), os.path.join(srv, "state", "db", "db.sqlite")
            marker = os.path.join(shared_dir, "alice-builder-ran")
            attack = _expr("attack", f"echo ran > {marker}; echo pwned >> {db}; echo x > $out")
            r = _nix_as(alice, sock, store, "nix-instantiate", "-E", attack)
            assert r.returncode == 0, r.stderr
            drv = r.stdout.strip()
            before = _valid_paths(db)
            with open(db, "rb") as f:
                db_bytes = f.read()
            r = _nix_as(alice, sock, store, "nix-store", "--realise", drv)
            assert r.returncode != 0
            err = strip_ansi(r.stderr)
            assert "Traceback" not in err
            lines = [ln for ln in err.splitlines() if ln.startswith("error")]
            assert lines == [f"error: cannot build '{drv}': refusing to run the builder of an "
                             f"untrusted client as the daemon's own user (uid {owner.pw_uid}): it "
                             "could rewrite the store's database, other users' roots and TCP keys; "
                             "run the daemon as root with 'build-users-group', or build as a "
                             "trusted user"], r.stderr
            assert not os.path.exists(marker)
            assert _valid_paths(db) == before
            with open(db, "rb") as f:
                assert f.read() == db_bytes

            # the daemon's owner (not in trusted-users either) builds as before
            mine = _expr("owners", "echo mine > $out")
            r = _nix_as(owner, sock, store, "nix-build", "--no-out-link", "-E", mine)
            assert r.returncode == 0, r.stderr
            out = r.stdout.strip()
            assert open(out).read() == "mine\n" and any(p == out for p, *_ in _valid_paths(db))
        finally:
            stop(proc)


@needs_root_users
def test_a_root_daemon_without_build_users_refuses_untrusted_builds(area_factory, shared_dir):
    """``build-users-group =`` as root: an untrusted user's builder would run as root."""
    a = area_factory()  # (the test areas have 'build-users-group =')
    a.start("ours")
    with real_users(shared_dir, "a") as users:
        alice = users["a"]
        marker = os.path.join(a.base, "root-builder-ran")
        os.chmod(a.base, 0o755)
        r = _nix_as(alice, a.socket, a.store, "nix-build", "--no-out-link", "-E",
                    _expr("as-root", f"id -u > {marker}; echo x > $out"))
        assert r.returncode != 0
        err = strip_ansi(r.stderr)
        assert "error: cannot build '" in err and "refusing to run the builder of an untrusted " \
            "client as root (the daemon's own user, uid 0)" in err and \
            "configure 'build-users-group'" in err, err
        assert "Traceback" not in err and not os.path.exists(marker)
    # root itself (trusted) still builds
    p = a.run(["nix-build", "--no-out-link", "-E", _expr("as-root-ok", "echo ok > $out")], check=True)
    assert open(p.stdout.decode().strip()).read() == "ok\n"
