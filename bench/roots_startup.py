#!/usr/bin/env python3
"""`storekeeper roots --no-size` against `nix-store --gc --print-roots` on one store: a
command whose time is mostly start-up and the /proc scan (issue 20).

Interleaved rounds (the order turns every round) after a warm-up, median wall times of:

  * `storekeeper --store S roots --no-size`     (the console script beside this Python)
  * `nix-store --store S --gc --print-roots`
  * with ``--baseline SCRIPT``, another install's `storekeeper` (a before/after pair)
  * with ``--why-alive P``, also `storekeeper why-alive P` vs `nix-store -q --roots P`
    (``--why-runs`` rounds: Nix takes seconds on a million paths)

``--procs N`` keeps N extra `sleep` processes alive while timing (started here, killed
by pid at the end), so the /proc scan of both tools has N more processes to read.
S is only read.  Our modules are precompiled and PYTHONDONTWRITEBYTECODE is unset
for the timed runs (isolated_nix_env), as in bench/startup.py.

    python3 bench/roots_startup.py --store /work/scale-store/s1m --runs 30 --procs 500 \\
        --baseline /tmp/before/.venv/bin/storekeeper
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from _nixenv import isolated_nix_env, rmtree
from startup import default_storekeeper, load, precompile, run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a chroot store (only read)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--procs", type=int, default=0, help="extra sleeping processes while timing")
    ap.add_argument("--storekeeper", default=default_storekeeper())
    ap.add_argument("--baseline", default=None, metavar="SCRIPT")
    ap.add_argument("--why-alive", default=None, metavar="PATH")
    ap.add_argument("--why-runs", type=int, default=3)
    args = ap.parse_args()
    nix_store = shutil.which("nix-store")
    if nix_store is None:
        print("needs nix-store", file=sys.stderr)
        return 2
    root = os.path.abspath(args.store)
    scratch = tempfile.mkdtemp(prefix="sk-bench-roots-")
    kids: list[subprocess.Popen] = []
    try:
        env = isolated_nix_env(scratch)
        tools = {"sk": args.storekeeper}
        if args.baseline:
            precompile(args.baseline, env)
            tools["base"] = args.baseline
        cmds = {f"{t} roots --no-size": [s, "--store", root, "roots", "--no-size"] for t, s in tools.items()}
        cmds["nix --print-roots"] = [nix_store, "--store", root, "--gc", "--print-roots"]
        why = {}
        if args.why_alive:
            why = {f"{t} why-alive": [s, "--store", root, "why-alive", args.why_alive] for t, s in tools.items()}
            why["nix -q --roots"] = [nix_store, "--store", root, "-q", "--roots", args.why_alive]
            outs = {n: run(c, env)[1] for n, c in why.items() if not n.startswith("nix")}
            if len(set(outs.values())) != 1:
                raise SystemExit(f"why-alive outputs differ: {outs}")
        kids = [subprocess.Popen(["sleep", "3600"]) for _ in range(args.procs)]
        pids = sum(n.isdigit() for n in os.listdir("/proc"))
        print(f"store {root}; {pids} processes (/proc); load {load()}")
        for group, runs in ((cmds, args.runs), (why, args.why_runs)):
            if not group:
                continue
            names = list(group)
            for _ in range(args.warmup if group is cmds else 1):
                for n in names:
                    run(group[n], env)
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(runs):
                for n in (names if r % 2 == 0 else names[::-1]):
                    times[n].append(run(group[n], env)[0])
            nix = next(n for n in names if n.startswith("nix"))
            for n in names:
                med = statistics.median(times[n])
                print(f"  {n:22} median {med * 1000:8.1f} ms  min {min(times[n]) * 1000:8.1f} ms  "
                      f"{med / statistics.median(times[nix]):.2f}x Nix  ({runs} runs)")
            print(f"  load after: {load()}")
        return 0
    finally:
        for k in kids:
            k.kill()
        for k in kids:
            k.wait()
        rmtree(scratch)


if __name__ == "__main__":
    sys.exit(main())
