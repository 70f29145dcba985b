"""Post-build checks against a builder that keeps swapping its outputs.

Without the sandbox and without build users a builder's processes can outlive
it (a ``setsid`` child escapes the process-group kill) and run as the daemon's
own user.  Such a racer swaps an output, or a file in it, between the builder's
file, a symlink to a victim file and a hard link to it while the daemon checks,
canonicalises, scans and hashes the outputs.  Whatever the build's outcome, the
daemon must never change the victim (mode, owner, mtime), copy it into the
store, or tell its hash (a flat fixed output hashed through a swapped-in link
would show ``got: sha256-<victim>`` in the mismatch message).  Everything the
daemon does there goes through fds opened ``O_NOFOLLOW`` and is checked on the
fd it then changes or reads (``storekeeper.fs``); a second test swaps at a
fixed point, right after the first check, to show that deterministically.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import time

import pytest

from storekeeper.build import Builder, BuildSettings, BuildStatus
from storekeeper.build import outputs as outputs_mod
from storekeeper.config.settings import this_system
from storekeeper.formats.derivation import (
    Derivation,
    DerivationOutput,
    fill_output_paths,
    print_derivation,
)
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import DerivedPath
from storekeeper.store.local import LocalStore

pytestmark = pytest.mark.slow

SYSTEM = this_system()
SETTINGS = [("sandbox", "false"), ("build-users-group", "")]
HELLO_SHA256 = hashlib.sha256(b"hello").hexdigest()


@pytest.fixture
def area(tmp_path):
    base = str(tmp_path / "real")
    store = LocalStore(LocalLayout.custom(base + "/store", base + "/state", base + "/log"))
    secret = f"secret-{os.getpid()}-{time.monotonic_ns()}".encode()
    victim = tmp_path / "victim"
    victim.write_bytes(secret)
    os.chmod(victim, 0o640)
    os.utime(victim, (1_000_000_000, 1_000_000_000))
    before = os.lstat(victim)
    yield store, str(victim), secret
    store.close()
    after = os.lstat(victim)
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns, after.st_nlink) == \
        (before.st_mode, before.st_uid, before.st_gid, before.st_mtime_ns, 1)
    assert victim.read_bytes() == secret


def add_drv(store: LocalStore, name: str, script: str, fixed: bool = False):
    sd = store.store_dir
    out = DerivationOutput(hash_algo="sha256", hash=HELLO_SHA256) if fixed else DerivationOutput()
    drv = Derivation(outputs={"out": out}, platform=SYSTEM, builder="/bin/sh",
                     args=["-c", script], env={"builder": "/bin/sh", "name": name,
                                               "system": SYSTEM})
    drv = fill_output_paths(drv, sd, read_drv=None)
    return store.add_text(name + ".drv", print_derivation(drv), []).path


def racers(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def assert_not_leaked(store: LocalStore, secret: bytes, results) -> None:
    for dirpath, _dirs, filenames in os.walk(store.real_store_dir):
        for n in filenames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    assert secret not in f.read(), p
    digest = hashlib.sha256(secret).digest()
    shown = {hashlib.sha256(secret).hexdigest(), base64.b64encode(digest).decode()}
    for r in results:
        assert not any(s in (r.error_msg or "") for s in shown), r.error_msg


@pytest.mark.parametrize("kind", ["file", "fixed", "dir"])
def test_a_racing_builder_never_gets_a_file_outside_changed_read_or_hashed(area, kind):
    store, victim, secret = area
    marker = f"sk-racer-{os.getpid()}-{kind}"
    if kind == "dir":
        # a file in the output: a symlink, then a hard link to the victim, then a file again
        made = 'mkdir $out; echo x > $out/f'
        swap = (f'ln -sfn {victim} "$o/l"; mv -fT "$o/l" "$o/f"; ln -f {victim} "$o/h"; '
                'mv -fT "$o/h" "$o/f"; echo x > "$o/x"; mv -fT "$o/x" "$o/f"')
    else:
        made = 'printf hello > $out'
        swap = (f'ln -sfn {victim} "$o.l"; mv -fT "$o.l" "$o"; ln -f {victim} "$o.h"; '
                'mv -fT "$o.h" "$o"; printf hello > "$o.x"; mv -fT "$o.x" "$o"')
    racer = (f'o=$1; end=$(($(date +%s) + 2)); while [ $(date +%s) -lt $end ]; do {swap}; done')
    script = (f"export PATH=/usr/bin:/bin; {made}; setsid /bin/sh -c '{racer}' {marker} $out "
              "> /dev/null 2>&1 < /dev/null & sleep 0.05")
    results = []
    try:
        st = BuildSettings().with_settings(SETTINGS)
        for i in range(3):
            drv = add_drv(store, f"race-{kind}-{i}", script + f"; : {i}", fixed=kind == "fixed")
            results += Builder(store, st).build([DerivedPath(drv, frozenset({"out"}))])
        deadline = time.monotonic() + 10
        while racers(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for pid in racers(marker):
            os.kill(pid, signal.SIGKILL)
    for r in results:
        # built (with whatever was there when the fds were opened) or refused
        assert r.status in (BuildStatus.BUILT, BuildStatus.OUTPUT_REJECTED,
                            BuildStatus.MISC_FAILURE), r.error_msg
    assert_not_leaked(store, secret, results)


def test_an_output_swapped_for_a_link_after_the_first_check(area, monkeypatch):
    """Deterministic: right after the existence and suspicious-permission check (by
    name, relative to the store dir), the output becomes a symlink to the victim,
    a hard link to it, or a world-writable file.  The canonicalisation that follows
    must meet the link on its own fd: a symlink is registered as the symlink it is
    (never followed), a hard link to a file outside is refused untouched, and the
    writable file is refused as Nix's check would have refused it (the check is
    made again on that fd)."""
    store, victim, secret = area
    real_canon = outputs_mod.canonicalise_paths
    swap_to: list[str] = []

    def swapped(paths, *a, **kw):
        for p in paths:
            os.unlink(p)
            if swap_to[0] == "symlink":
                os.symlink(victim, p)
            elif swap_to[0] == "hardlink":
                os.link(victim, p)
            else:  # a world-writable file: anyone could have written it
                with open(p, "wb") as f:
                    f.write(b"hello")
                os.chmod(p, 0o666)
        return real_canon(paths, *a, **kw)

    monkeypatch.setattr(outputs_mod, "canonicalise_paths", swapped)
    st = BuildSettings().with_settings(SETTINGS)
    results = []
    for how in ("symlink", "hardlink", "fixed-symlink", "writable"):
        swap_to[:] = [how.removeprefix("fixed-")]
        drv = add_drv(store, f"swap-{how}", "printf hello > $out", fixed=how.startswith("fixed"))
        [r] = Builder(store, st).build([DerivedPath(drv, frozenset({"out"}))])
        results.append(r)
        out = store.real_path(store.query_derivation_outputs(drv)["out"])
        if how == "symlink":
            assert r.status == BuildStatus.BUILT, r.error_msg
            assert os.readlink(out) == victim  # (registered as a link; the victim untouched)
        elif how == "hardlink":
            assert r.status == BuildStatus.OUTPUT_REJECTED
            assert "is a hard link to a file outside the build output" in r.error_msg
        elif how == "writable":
            # (the check by name passed; it is made again on the fd canonicalise changes)
            assert r.status == BuildStatus.OUTPUT_REJECTED
            assert r.error_msg == (f"suspicious ownership or permission on "
                                   f"'{store.store_dir.print(store.parse_path(out))}' for output "
                                   "'out'; rejecting this build output")
        else:
            assert r.status == BuildStatus.OUTPUT_REJECTED
            assert "should be a non-executable regular file" in r.error_msg
    assert_not_leaked(store, secret, results)
