#!/usr/bin/env python3
"""Builds: the real nix-build against storekeeper's daemon and against nix-daemon.

A chain of N small derivations (node i depends on node i-1), plus some width:
every ``--every``-th node also depends on a leaf of its own, which can build
alongside the chain.  ``max-jobs = 2``.  Each run makes two fresh stores with
real store dirs (``local?store=…&state=…&log=…``; builders need real paths),
starts both daemons (not timed) and, alternating which goes first, times
``nix-instantiate`` (the .drv files go through the daemon) and ``nix-store
-r`` of the top derivation (the builds) with the real 2.8 clients.  Both must
build the same closure (up to the store dir).  Prints each run, the medians,
the ratio storekeeper / Nix (target <= 1.2x) and the load average around each
run.

    python3 bench/build.py --runs 3 --n 200

``--no-fsync`` runs our daemon with ``fsync-store-paths = false``.
``--profile FILE`` profiles our daemon's connections (cProfile around each
connection, in whichever process serves it; stats merged into FILE, the parts
kept as ``FILE.<n>`` with ``KEEP_PROFILE_PARTS=1``; the timings are then not
comparable) and prints the top functions.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import isolated_nix_env, rmtree


def system() -> str:
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(os.uname().machine, os.uname().machine)
    return f"{machine}-{os.uname().sysname.lower()}"


def expression(n: int, every: int, salt: str) -> str:
    sh = 'builder = "/bin/sh"; system = "%s";' % system()
    return f"""
let
  leaf = i: derivation {{ name = "leaf-${{toString i}}"; {sh}
    args = ["-c" "echo {salt} leaf ${{toString i}} > $out"]; }};
  node = i: derivation {{ name = "node-${{toString i}}"; {sh}
    prev = if i == 0 then "" else node (i - 1);
    side = if i - (i / {every}) * {every} == 0 then leaf i else "";
    args = ["-c" "echo {salt} ${{toString i}} $prev $side > $out"]; }};
in node {n - 1}
"""


# The daemon serves each connection in a forked (and possibly reused) process:
# profile each connection and dump its stats when it ends.
_PROFILED = """
import cProfile, os, runpy, sys, time
out = sys.argv[1]
import storekeeper.daemon.server as server
serve_one = server._serve_one
def profiled(*a, **k):
    prof = cProfile.Profile()
    prof.enable()
    try:
        return serve_one(*a, **k)
    finally:
        prof.disable()
        prof.dump_stats(f"{out}.{time.monotonic_ns()}")
server._serve_one = profiled
sys.argv = ["storekeeper.daemon", *sys.argv[2:]]
runpy.run_module("storekeeper.daemon", run_name="__main__", alter_sys=True)
"""


def merge_profiles(out: str) -> None:
    d, base = os.path.split(os.path.abspath(out))
    parts = [os.path.join(d, n) for n in os.listdir(d)
             if n.startswith(base + ".") and n[len(base) + 1:].isdigit()]
    if not parts:
        print("no profile was written")
        return
    stats = None
    for p in parts:
        try:  # (a child killed while dumping leaves a truncated file)
            if stats is None:
                stats = pstats.Stats(p)
            else:
                stats.add(p)
        except (EOFError, ValueError, TypeError):
            pass
        if not os.environ.get("KEEP_PROFILE_PARTS"):
            os.unlink(p)
    if stats is None:
        print("no readable profile was written")
        return
    stats.dump_stats(out)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(25)


class Daemon:
    def __init__(self, kind: str, base: str, env: dict[str, str], profile: str | None,
                 extra_conf: str = "") -> None:
        self.kind, self.base = kind, base
        for d in ("store", "state", "log", "etc"):
            os.makedirs(os.path.join(base, d), exist_ok=True)
        with open(os.path.join(base, "etc", "nix.conf"), "w") as f:
            f.write("substituters =\nsandbox = false\nbuild-users-group =\nmax-jobs = 2\n" + extra_conf)
        self.sock = os.path.join(base, "sock")
        self.env = dict(env, NIX_CONF_DIR=os.path.join(base, "etc"),
                        NIX_STORE_DIR=os.path.join(base, "store"),
                        NIX_STATE_DIR=os.path.join(base, "state"),
                        NIX_LOG_DIR=os.path.join(base, "log"))
        denv = dict(self.env, NIX_REMOTE="local")
        if kind == "storekeeper":
            url = f"local?store={base}/store&state={base}/state&log={base}/log"
            args = ["--store", url, "--socket", self.sock]
            if profile:
                cmd = [sys.executable, "-c", _PROFILED, profile, *args]
            else:
                cmd = [sys.executable, "-m", "storekeeper.daemon", *args]
        else:
            cmd = ["nix-daemon"]
            denv["NIX_DAEMON_SOCKET_PATH"] = self.sock
            subprocess.run(["nix-store", "--init"], env=denv, check=True)
        self.log = open(os.path.join(base, "daemon.log"), "wb")
        self.proc = subprocess.Popen(cmd, env=denv, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=base)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} daemon exited with {self.proc.returncode}")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(self.sock)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} daemon did not start") from None
                time.sleep(0.02)
            finally:
                probe.close()
        self.env["NIX_REMOTE"] = f"unix://{self.sock}"

    def run(self, *cmd: str) -> tuple[float, str]:
        t = time.perf_counter()
        p = subprocess.run(cmd, env=self.env, cwd=self.base, capture_output=True, timeout=1800)
        took = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError(f"{self.kind}: {' '.join(cmd)} failed:\n{p.stderr.decode()[-2000:]}")
        return took, p.stdout.decode().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # (SIGTERM lets cProfile write its stats)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def one_run(i: int, scratch: str, env: dict[str, str], args) -> dict[str, dict[str, float]]:
    salt = secrets.token_hex(4)
    expr = os.path.join(scratch, f"chain-{i}.nix")
    with open(expr, "w") as f:
        f.write(expression(args.n, args.every, salt))
    order = ["storekeeper", "nix"] if i % 2 == 0 else ["nix", "storekeeper"]
    times: dict[str, dict[str, float]] = {}
    outs = {}
    for kind in order:
        d = Daemon(kind, os.path.join(scratch, f"{kind}-{i}"), env,
                   args.profile if kind == "storekeeper" else None,
                   "fsync-store-paths = false\n" if kind == "storekeeper" and args.no_fsync else "")
        try:
            t_inst, drv = d.run("nix-instantiate", expr)
            t_build, out = d.run("nix-store", "-r", drv)
            # (the store dirs differ, so do the hashes: compare the rest)
            closure = d.run("nix-store", "-qR", out)[1].split()
            with open(out) as f:
                content = f.read().replace(os.path.join(d.base, "store"), "<store>")
            outs[kind] = (len(closure), re.sub(r"<store>/[0-9a-z]{32}-", "<store>/", content))
            times[kind] = {"instantiate": t_inst, "build": t_build, "total": t_inst + t_build}
        finally:
            d.stop()
            if not args.keep:
                rmtree(d.base)
    if outs["storekeeper"] != outs["nix"]:
        raise RuntimeError(f"different results: {outs}")
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n", type=int, default=200, help="length of the chain")
    ap.add_argument("--every", type=int, default=4, help="a leaf for every EVERY-th node")
    ap.add_argument("--profile", metavar="FILE", help="cProfile our daemon into FILE")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--no-fsync", action="store_true",
                    help="our daemon with fsync-store-paths = false (Nix 2.8 syncs nothing)")
    args = ap.parse_args()
    # world-traversable: builders may run as other users
    scratch = tempfile.mkdtemp(prefix="sk-bench-build-", dir="/tmp")
    os.chmod(scratch, 0o755)
    env = isolated_nix_env(scratch)
    leaves = (args.n + args.every - 1) // args.every
    print(f"{args.n} chained derivations + {leaves} leaves, max-jobs = 2, {args.runs} runs; "
          f"{os.cpu_count()} CPUs")
    results: list[dict[str, dict[str, float]]] = []
    try:
        for i in range(args.runs):
            load0 = os.getloadavg()[0]
            times = one_run(i, scratch, env, args)
            load1 = os.getloadavg()[0]
            results.append(times)
            print(f"run {i}: " + "  ".join(
                f"{k}: instantiate {t['instantiate']:.2f} s, build {t['build']:.2f} s"
                for k, t in sorted(times.items())) + f"  (load {load0:.2f} -> {load1:.2f})", flush=True)
    finally:
        if not args.keep:
            rmtree(scratch)
    if args.profile:
        merge_profiles(args.profile)
    med = {k: {p: statistics.median(r[k][p] for r in results) for p in ("instantiate", "build", "total")}
           for k in ("storekeeper", "nix")}
    for p in ("instantiate", "build", "total"):
        ratio = med["storekeeper"][p] / med["nix"][p]
        print(f"median {p}: storekeeper {med['storekeeper'][p]:.2f} s, nix {med['nix'][p]:.2f} s, "
              f"ratio {ratio:.2f}x")
    ratio = med["storekeeper"]["total"] / med["nix"]["total"]
    print(f"ratio storekeeper / nix (total): {ratio:.2f}x (target <= 1.2x); load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
