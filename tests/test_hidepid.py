"""An unprivileged daemon under ``hidepid=2``: a user's running program is safe only
because her client reported it, and only while the lease lasts.

Everything runs in a PID namespace of its own whose /proc is mounted
``hidepid=2``: the daemon (a dedicated user, no capabilities) and bob cannot see
alice's processes; alice's client can see her own.
"""

from __future__ import annotations

import json
import os
import sys
import time

from realusers import (
    PidNamespace,
    as_user,
    needs_root_users,
    real_users,
    sk_as,
    spawn_as,
    start_daemon_as,
)

LEASE = 20

HOLD = """#!/bin/sh
touch "$HOME/running-$1"
i=0
while [ ! -e "$HOME/stop" ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
"""

SEES = ("import os, sys; uid = int(sys.argv[1]); print(len([p for p in os.listdir('/proc') "
        "if p.isdigit() and os.stat('/proc/' + p).st_uid == uid]))")


def _cap_eff(uid: int) -> list[int]:
    """CapEff of the daemon processes running as ``uid`` (read from the host's /proc)."""
    caps = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"storekeeper.daemon" not in f.read():
                    continue
            with open(f"/proc/{pid}/status") as f:
                caps += [int(line.split()[1], 16) for line in f if line.startswith("CapEff:")]
        except OSError:
            continue
    return caps


def _deleted(r) -> set[str]:
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout)["paths"])


@needs_root_users
def test_alices_program_survives_bobs_gc_while_her_lease_lasts(shared_dir):
    with real_users(shared_dir, "d", "a", "b") as users:
        ns = PidNamespace()  # (closed, killing all in it, before the users are deleted)
        try:
            daemon, alice, bob = users["d"], users["a"], users["b"]
            proc, sock, url = start_daemon_as(
                daemon, os.path.join(shared_dir, "srv"),
                f"runtime-roots = client\nruntime-root-lease = {LEASE}\n", prefix=ns.prefix)
            assert _cap_eff(daemon.pw_uid) and set(_cap_eff(daemon.pw_uid)) == {0}

            # alice adds a program to the store, bob something nobody uses
            prog_dir = os.path.join(alice.home, "hold")
            assert as_user(alice, ["mkdir", "-p", f"{prog_dir}/bin"]).returncode == 0
            assert as_user(alice, ["sh", "-c", f"cat > {prog_dir}/bin/hold && chmod +x {prog_dir}/bin/hold"],
                           input=HOLD).returncode == 0
            r = sk_as(alice, url, "add", prog_dir, prefix=ns.prefix)
            assert r.returncode == 0, r.stderr
            prog = r.stdout.strip()
            # the same program under another name: she starts it after her client reported
            r = sk_as(alice, url, "add", "--name", "hold-late", prog_dir, prefix=ns.prefix)
            late = r.stdout.strip()
            assert as_user(bob, ["sh", "-c", "echo unused > unused"]).returncode == 0
            r = sk_as(bob, url, "add", os.path.join(bob.home, "unused"), prefix=ns.prefix)
            unused = r.stdout.strip()

            def start(path: str, tag: str):
                proc = spawn_as(alice, [f"{path}/bin/hold", tag], prefix=ns.prefix)
                deadline = time.monotonic() + 20
                while not os.path.exists(os.path.join(alice.home, f"running-{tag}")):
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
                running.append(proc)

            running: list = []
            try:
                start(prog, "reported")
                # hidepid=2: neither the daemon's user nor bob sees alice's processes
                counts = {u.pw_name: as_user(u, [sys.executable, "-c", SEES, str(alice.pw_uid)],
                                             prefix=ns.prefix).stdout.strip()
                          for u in (daemon, bob, alice)}
                assert counts[daemon.pw_name] == counts[bob.pw_name] == "0"
                assert int(counts[alice.pw_name]) >= 1

                t0 = time.time()
                r = sk_as(alice, url, "sync-roots", prefix=ns.prefix)
                assert r.returncode == 0 and f"1 runtime root(s) held for {LEASE} s" in r.stderr, r.stderr
                t1 = time.time()
                start(late, "late")  # nobody told the daemon about this one
                deleted = _deleted(sk_as(bob, url, "gc", "--json", prefix=ns.prefix))
                assert time.time() - t0 < LEASE, "too slow to collect within the lease"
                assert deleted == {unused, late}
                assert as_user(alice, ["test", "-x", f"{prog}/bin/hold"]).returncode == 0
            finally:
                open(os.path.join(alice.home, "stop"), "w").close()
                for p in running:
                    p.wait(30)
            # the program has exited; while the lease lasts the path stays ...
            if time.time() - t1 < LEASE - 5:  # (unless this machine is too slow to tell)
                assert prog not in _deleted(sk_as(bob, url, "gc", "--json", prefix=ns.prefix))
            # ... and once it has ended, bob's collection takes it
            time.sleep(max(0.0, t1 + LEASE + 0.5 - time.time()))
            assert _deleted(sk_as(bob, url, "gc", "--json", prefix=ns.prefix)) == {prog}
        finally:
            ns.close()
