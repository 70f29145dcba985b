#!/usr/bin/env python3
"""GC against real `nix-store --gc` and a plain `rm -rf` of the same dead paths, on identical copies.

For each store: generate it once with ../shared/bench/mkstore.py (registered with
real Nix), then per run make fresh copies and time
  * liveness:  `storekeeper gc --print-dead`  vs  `nix-store --gc --print-dead`
  * deletion:  `storekeeper gc`               vs  `nix-store --gc`  vs  `rm -rf <dead paths>`
checking that both GCs find the same dead set.  Prints medians, ratios and
peak RSS of each process (ru_maxrss from wait4).

    python3 bench/gc.py --paths 20000 --runs 3
    python3 bench/gc.py --paths 100000 --runs 1
    python3 bench/gc.py --paths 20000 --files-per-path 1 --single-file-fraction 1   # .drv-like
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import copy, isolated_nix_env, rmtree

HERE = os.path.dirname(os.path.abspath(__file__))
MKSTORE = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench", "mkstore.py"))


def run(cmd: list[str], env: dict[str, str], stdout=subprocess.DEVNULL) -> tuple[float, int, bytes]:
    """Seconds, peak RSS in MiB, stdout."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if stdout is None else stdout,
                         stderr=subprocess.DEVNULL)
    out = p.stdout.read() if p.stdout else b""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode})")
    return secs, ru.ru_maxrss // 1024, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mkstore", default=MKSTORE)
    ap.add_argument("--dir", default=None)
    ap.add_argument("mkstore_args", nargs="*", help="extra mkstore.py arguments (after --)")
    args = ap.parse_args()
    if shutil.which("nix-store") is None or not os.path.exists(args.mkstore):
        print("needs nix-store (apt-get install nix-bin) and ../shared/bench/mkstore.py", file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix="sk-bench-gc-", dir=args.dir)
    env = isolated_nix_env(scratch)
    sk = [sys.executable, "-m", "storekeeper.cli.main"]
    try:
        master = os.path.join(scratch, "master")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, args.mkstore, master, "--paths", str(args.paths), "--seed",
                        str(args.seed), "--quiet", *args.mkstore_args], check=True, env=env)
        print(f"generated {args.paths} paths in {time.perf_counter() - t0:.0f}s", flush=True)
        res: dict[str, list[float]] = {k: [] for k in ("sk-live", "nix-live", "sk-gc", "nix-gc", "rm")}
        rss: dict[str, int] = {}
        for r in range(args.runs):
            a, b, c = (os.path.join(scratch, f"{x}{r}") for x in "abc")
            for d in (a, b, c):
                copy(master, d)
            subprocess.run(["sync"])
            s, m, out = run(sk + ["--store", a, "gc", "--print-dead"], env, stdout=None)
            res["sk-live"].append(s)
            rss["sk-live"] = max(rss.get("sk-live", 0), m)
            ours = set(out.split())
            s, m, out = run(["nix-store", "--store", b, "--gc", "--print-dead"], env, stdout=None)
            res["nix-live"].append(s)
            rss["nix-live"] = max(rss.get("nix-live", 0), m)
            theirs = set(out.split())
            if ours != theirs:
                print(f"DEAD SETS DIFFER: ours {len(ours)}, nix {len(theirs)}", file=sys.stderr)
                return 1
            dead_real = [os.path.join(c, p.decode().lstrip("/")) for p in sorted(ours)]
            s, m, _ = run(sk + ["--store", a, "gc"], env)
            res["sk-gc"].append(s)
            rss["sk-gc"] = max(rss.get("sk-gc", 0), m)
            s, m, _ = run(["nix-store", "--store", b, "--gc"], env)
            res["nix-gc"].append(s)
            rss["nix-gc"] = max(rss.get("nix-gc", 0), m)
            # (through xargs: 50 000 paths do not fit on one command line)
            listing = os.path.join(scratch, "dead.list")
            with open(listing, "wb") as f:
                f.write(b"\0".join(p.encode() for p in dead_real))
            s, _, _ = run(["sh", "-c", 'xargs -0 rm -rf < "$0"', listing], env)
            res["rm"].append(s)
            print(f"run {r}: dead {len(ours)}; " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in res.items()),
                  flush=True)
            for d in (a, b, c):
                rmtree(d)
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"median liveness: storekeeper {med['sk-live']:.2f}s, nix {med['nix-live']:.2f}s, "
              f"ratio {med['sk-live'] / med['nix-live']:.2f}x (target <= 0.3x)")
        print(f"median deletion: storekeeper {med['sk-gc']:.2f}s, nix {med['nix-gc']:.2f}s, "
              f"rm -rf {med['rm']:.2f}s; ours/rm {med['sk-gc'] / med['rm']:.2f}x (target <= 1.15x), "
              f"ours/nix {med['sk-gc'] / med['nix-gc']:.2f}x, rm/nix {med['rm'] / med['nix-gc']:.2f}x")
        print("peak RSS MiB: " + ", ".join(f"{k} {v}" for k, v in rss.items()))
        return 0
    finally:
        rmtree(scratch)


if __name__ == "__main__":
    sys.exit(main())
