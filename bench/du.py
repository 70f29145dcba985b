#!/usr/bin/env python3
"""`storekeeper du` against what a user runs today: `nix-store --gc --print-live` plus
`nix path-info -rS` over every root, on the same store.

Generates one store with ../shared/bench/mkstore.py (registered with real Nix), optionally
hard-links it with `nix-store --optimise` first, then per run times
  * `storekeeper du --json`        (disk bytes, inodes once): cold (its cache removed, every
                                   live path walked) and warm (the cache of the cold run)
  * `storekeeper du --json --nar`  (NAR sizes from the DB, no walk)
  * `nix-store --gc --print-live` + `nix path-info -rS ROOT...` (every root's target)
and checks that our live path count and NAR live bytes agree with Nix's.  Prints medians
and peak RSS of each process (ru_maxrss from wait4; for Nix the larger of its two).

    python3 bench/du.py --paths 20000 --runs 3
    python3 bench/du.py --paths 100000 --runs 3 --optimise --no-path-info -- --files-per-path 3

`--no-path-info` leaves Nix's `path-info -rS` out (it takes half an hour on 100k paths):
the live path count is still checked against `--print-live`, NAR bytes are not.
`--store ROOT` reuses a store made before (by this script or mkstore.py) instead of
generating one; it is left in place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import isolated_nix_env, rmtree

HERE = os.path.dirname(os.path.abspath(__file__))
MKSTORE = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench", "mkstore.py"))


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, bytes]:
    """Seconds, peak RSS in MiB, stdout."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:4]} failed")
    return secs, ru.ru_maxrss // 1024, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--optimise", action="store_true", help="nix-store --optimise the store first")
    ap.add_argument("--mkstore", default=MKSTORE)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--no-path-info", action="store_true",
                    help="leave out Nix's path-info -rS (slow); live counts are still compared")
    ap.add_argument("--store", default=None, help="an existing store ROOT to measure (kept)")
    ap.add_argument("mkstore_args", nargs="*", help="extra mkstore.py arguments (after --)")
    args = ap.parse_args()
    if shutil.which("nix-store") is None or not os.path.exists(args.mkstore):
        print("needs nix-store (apt-get install nix-bin) and ../shared/bench/mkstore.py", file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix="sk-bench-du-", dir=args.dir)
    env = isolated_nix_env(scratch)
    sk = [sys.executable, "-m", "storekeeper.cli.main"]
    nix = ["nix", "--extra-experimental-features", "nix-command"]
    try:
        root = args.store or os.path.join(scratch, "store")
        t0 = time.perf_counter()
        if not args.store:
            subprocess.run([sys.executable, args.mkstore, root, "--paths", str(args.paths), "--seed",
                            str(args.seed), "--quiet", *args.mkstore_args], check=True, env=env)
            print(f"generated {args.paths} paths in {time.perf_counter() - t0:.0f}s", flush=True)
        if args.optimise and not args.store:
            subprocess.run(["nix-store", "--store", root, "--optimise"], check=True, env=env,
                           capture_output=True)
        roots = subprocess.run(["nix-store", "--store", root, "--gc", "--print-roots"], env=env,
                               capture_output=True, text=True, check=True).stdout.split("\n")
        targets = sorted({line.split(" -> ")[1] for line in roots if " -> " in line})
        subprocess.run(["sync"])
        res: dict[str, list[float]] = {k: [] for k in ("sk-disk", "sk-warm", "sk-nar", "nix-live",
                                                         "nix-sizes")}
        cache = os.path.join(root, "nix", "var", "nix", "storekeeper", "du-cache")
        rss: dict[str, int] = {}
        for r in range(args.runs):
            if os.path.exists(cache):
                os.unlink(cache)
            s, m, out = run(sk + ["--store", root, "du", "--json"], env)
            res["sk-disk"].append(s)
            rss["sk-disk"] = max(rss.get("sk-disk", 0), m)
            disk = json.loads(out)
            s, m, out = run(sk + ["--store", root, "du", "--json"], env)
            res["sk-warm"].append(s)
            rss["sk-warm"] = max(rss.get("sk-warm", 0), m)
            if json.loads(out) != disk:
                print("DISAGREE: the cached run differs from the cold one", file=sys.stderr)
                return 1
            s, m, out = run(sk + ["--store", root, "du", "--json", "--nar"], env)
            res["sk-nar"].append(s)
            rss["sk-nar"] = max(rss.get("sk-nar", 0), m)
            nar = json.loads(out)
            s, m, out = run(["nix-store", "--store", root, "--gc", "--print-live"], env)
            res["nix-live"].append(s)
            rss["nix"] = max(rss.get("nix", 0), m)
            live = out.split()
            if args.no_path_info:
                res["nix-sizes"].append(0.0)
                nix_bytes = nar["liveBytes"]
            else:
                s, m, out = run(nix + ["path-info", "--store", root, "-rS", "--json", *targets], env)
                res["nix-sizes"].append(s)
                rss["nix"] = max(rss.get("nix", 0), m)
                infos = json.loads(out)
                nix_bytes = sum(o["narSize"] for o in infos)
            if nar["livePaths"] != len(live) or disk["livePaths"] != len(live) or nar["liveBytes"] != nix_bytes:
                print(f"DISAGREE: ours {nar['livePaths']} paths {nar['liveBytes']} B, nix {len(live)} "
                      f"paths {nix_bytes} B", file=sys.stderr)
                return 1
            print(f"run {r} (load {os.getloadavg()[0]:.1f}): {len(targets)} root targets, {len(live)} live paths, "
                  f"{disk['liveBytes'] / 2**20:.1f} MiB on disk, {nix_bytes / 2**20:.1f} MiB NAR; "
                  + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in res.items()), flush=True)
        med = {k: statistics.median(v) for k, v in res.items()}
        nix_total = med["nix-live"] + med["nix-sizes"]
        print(f"median: du (disk, cold) {med['sk-disk']:.2f}s, warm {med['sk-warm']:.2f}s, "
              f"du --nar {med['sk-nar']:.2f}s, "
              f"nix print-live + path-info -rS {nix_total:.2f}s ({med['nix-live']:.2f} + "
              f"{med['nix-sizes']:.2f}); ratios {med['sk-disk'] / nix_total:.3f}x / "
              f"{med['sk-warm'] / nix_total:.3f}x / {med['sk-nar'] / nix_total:.3f}x")
        print("peak RSS MiB: " + ", ".join(f"{k} {v}" for k, v in rss.items()))
        return 0
    finally:
        rmtree(scratch)  # (a --store given is outside it)


if __name__ == "__main__":
    sys.exit(main())
