#!/usr/bin/env python3
"""Sandboxed builds through the daemon: storekeeper's against the real nix-daemon 2.8.

Each run starts both daemons on fresh custom-layout stores (real store dirs
under a scratch dir, so Nix 2.8's sandbox can bind them) with ``sandbox =
true``, ``sandbox-fallback = false`` and no build users (run as root), and
times one real ``nix-build --no-out-link`` of N trivial derivations (builder:
a static busybox copied into the store, ``echo I > $out``), against each
daemon back to back, alternating which goes first.  Daemon start-up and the
evaluation's ``addToStore`` of busybox are in both timings alike.  Prints the
seconds per run, the medians and the ratio storekeeper / Nix (target <= 1.2x).

    python3 bench/build_sandbox.py --runs 3 --n 200
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import isolated_nix_env, rmtree

from storekeeper.config.settings import this_system

CONF = "substituters =\nsandbox = true\nsandbox-fallback = false\nbuild-users-group =\n"


def expr(n: int, salt: str) -> str:
    return (f'let bb = ./bb; mk = i: derivation {{ name = "t-{salt}-${{toString i}}"; '
            f'system = "{this_system()}"; builder = "${{bb}}/sh"; '
            'args = ["-c" "echo ${toString i} > $out"]; }; '
            f'in map mk (builtins.genList (x: x) {n})')


def start(kind: str, base: str, env: dict[str, str]) -> tuple[subprocess.Popen, dict[str, str]]:
    store, state, log = (os.path.join(base, d) for d in ("store", "state", "log"))
    etc = os.path.join(base, "etc")
    os.makedirs(etc)
    with open(os.path.join(etc, "nix.conf"), "w") as f:
        f.write(CONF)
    sock = os.path.join(base, "sock")
    denv = {**env, "NIX_CONF_DIR": etc, "NIX_STORE_DIR": store, "NIX_STATE_DIR": state,
            "NIX_LOG_DIR": log}
    if kind == "ours":
        cmd = [sys.executable, "-m", "storekeeper.daemon", "--store",
               f"local?store={store}&state={state}&log={log}", "--socket", sock]
    else:
        cmd, denv["NIX_DAEMON_SOCKET_PATH"], denv["NIX_REMOTE"] = ["nix-daemon"], sock, "local"
    proc = subprocess.Popen(cmd, env=denv, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(base, "daemon.log"), "ab"))
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{kind} daemon did not start (see {base}/daemon.log)")
        time.sleep(0.05)
    cenv = {**env, "NIX_STORE_DIR": store, "NIX_STATE_DIR": os.path.join(base, "cstate"),
            "NIX_LOG_DIR": os.path.join(base, "clog"), "NIX_REMOTE": f"unix://{sock}"}
    return proc, cenv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (nix-daemon's sandbox needs it)")
    scratch = tempfile.mkdtemp(prefix="sk-build-bench-", dir="/tmp")
    os.chmod(scratch, 0o755)
    env = isolated_nix_env(scratch)
    work = os.path.join(scratch, "work")
    os.makedirs(os.path.join(work, "bb"))
    shutil.copy(shutil.which("busybox") or "/bin/busybox", os.path.join(work, "bb", "busybox"))
    os.symlink("busybox", os.path.join(work, "bb", "sh"))
    times: dict[str, list[float]] = {"ours": [], "nix": []}
    try:
        for run in range(args.runs):
            order = ["ours", "nix"] if run % 2 == 0 else ["nix", "ours"]
            for kind in order:
                base = os.path.join(scratch, f"{kind}-{run}")
                proc, cenv = start(kind, base, env)
                try:
                    t = time.monotonic()
                    r = subprocess.run(["nix-build", "--no-out-link", "-E",
                                        expr(args.n, f"{run}")],
                                       env=cenv, cwd=work, capture_output=True, text=True)
                    dt = time.monotonic() - t
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
                if r.returncode != 0:
                    sys.exit(f"{kind}: nix-build failed:\n{r.stderr[-2000:]}")
                outs = r.stdout.split()
                if len(outs) != args.n:
                    sys.exit(f"{kind}: {len(outs)} outputs, not {args.n}")
                times[kind].append(dt)
                print(f"run {run} {kind:>4}: {dt:.2f} s ({args.n} sandboxed builds)", flush=True)
                rmtree(base)
        ours, nix = statistics.median(times["ours"]), statistics.median(times["nix"])
        print(f"median: ours {ours:.2f} s, nix-daemon 2.8 {nix:.2f} s, ratio {ours / nix:.2f}x "
              "(target <= 1.2x)")
    finally:
        rmtree(scratch)


if __name__ == "__main__":
    main()
