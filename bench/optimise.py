#!/usr/bin/env python3
"""Optimise against real `nix-store --optimise` and util-linux `hardlink`, on identical copies.

The store is generated once with ../shared/bench/mkstore.py (registered with real
Nix); each run makes three fresh copies (`cp -a`) and times, interleaved:

  * first run:   `storekeeper optimise`  vs  `nix-store --optimise`  vs  `hardlink STORE`
  * second run (no-op) of each on the copy it has just optimised
  * the two-core hashing limit, in the same round: SHA-256 of every byte of every
    regular file of the (unoptimised) store, by two processes taking the files
    partitioned by inode, each file read whole with one unbuffered `hashlib.file_digest`
    (the file list is made before the clock starts: what is timed is open, read, hash).

Prints the median wall times, the ratios (targets: first run <= 0.5x Nix 2.8 and
<= 1.5x the hashing limit, second run <= 0.5x), CPU time (user+sys, from wait4), and the bytes each tool saved,
measured the same way for all three: allocated blocks of the distinct inodes in the
store (`.links` included) before and after.

    python3 bench/optimise.py --paths 20000 --runs 3
    python3 bench/optimise.py --paths 5000 --runs 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import copy, isolated_nix_env, rmtree

HERE = os.path.dirname(os.path.abspath(__file__))
MKSTORE = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench", "mkstore.py"))


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + sys), stdout + stderr."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read() if p.stdout else b""
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.decode(errors='replace')}")
    return secs, ru.ru_utime + ru.ru_stime, out.decode(errors="replace")


def disk_bytes(store: str) -> int:
    """Allocated bytes of the distinct inodes under the store dir (hard links counted once)."""
    seen: set[int] = set()
    total = 0
    for d, dirs, files in os.walk(store):
        for n in files + dirs:
            st = os.lstat(os.path.join(d, n))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def regular_files(store: str) -> list[tuple[int, str]]:
    """(inode, path) of every regular file under the store dir, `.links` left out."""
    out = []
    for d, dirs, files in os.walk(store):
        if d == store and ".links" in dirs:
            dirs.remove(".links")
        for n in files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out.append((st.st_ino, p))
    return out


def _hash_files(paths: list[str]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            n += len(hashlib.file_digest(f, "sha256").digest())
    return n


def hash_limit(files: list[tuple[int, str]], procs: int = 2) -> tuple[float, float]:
    """Wall and CPU seconds (user + sys of the hashing processes) to SHA-256 every file
    in `procs` processes (files partitioned by inode)."""
    parts = [[p for ino, p in files if ino % procs == k] for k in range(procs)]
    ctx = multiprocessing.get_context("fork")
    before = os.times()
    t0 = time.perf_counter()
    with ctx.Pool(procs) as pool:
        pool.map(_hash_files, parts, chunksize=1)
        pool.close()
        pool.join()
    secs = time.perf_counter() - t0
    after = os.times()
    return secs, (after.children_user - before.children_user
                  + after.children_system - before.children_system)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mkstore", default=MKSTORE)
    ap.add_argument("--dir", default=None, help="scratch dir (default: a new temp dir)")
    ap.add_argument("--no-hardlink", action="store_true", help="leave util-linux hardlink out")
    ap.add_argument("mkstore_args", nargs="*", help="extra mkstore.py arguments (after --)")
    args = ap.parse_args()
    if shutil.which("nix-store") is None or not os.path.exists(args.mkstore):
        print("needs nix-store (apt-get install nix-bin) and ../shared/bench/mkstore.py", file=sys.stderr)
        return 2
    hardlink = None if args.no_hardlink else shutil.which("hardlink")
    if not args.no_hardlink and hardlink is None:
        print("util-linux hardlink not found (apt-get install util-linux); running without it",
              file=sys.stderr)
    scratch = tempfile.mkdtemp(prefix="sk-bench-optimise-", dir=args.dir)
    env = isolated_nix_env(scratch)
    sk = [sys.executable, "-m", "storekeeper.cli.main"]
    tools = ["sk", "nix"] + (["hardlink"] if hardlink else [])
    try:
        master = os.path.join(scratch, "master")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, args.mkstore, master, "--paths", str(args.paths), "--seed",
                        str(args.seed), "--quiet", *args.mkstore_args], check=True, env=env)
        print(f"generated {args.paths} paths in {time.perf_counter() - t0:.0f}s", flush=True)
        before = disk_bytes(os.path.join(master, "nix", "store"))
        files = regular_files(os.path.join(master, "nix", "store"))
        wall: dict[str, list[float]] = {f"{t}-{k}": [] for t in tools for k in ("first", "second")}
        wall["hash-limit"] = []
        cpu = {k: [] for k in wall}
        saved: dict[str, int] = {}
        reported: dict[str, str] = {}
        for r in range(args.runs):
            copies = {t: os.path.join(scratch, f"{t}{r}") for t in tools}
            for d in copies.values():
                copy(master, d)
            subprocess.run(["sync"])
            cmds = {"sk": sk + ["--store", copies["sk"], "optimise", "--json"],
                    "nix": ["nix-store", "--store", copies["nix"], "--optimise"]}
            if hardlink:
                cmds["hardlink"] = [hardlink, os.path.join(copies["hardlink"], "nix", "store")]
            for phase in ("first", "second"):
                order = tools if r % 2 == 0 else list(reversed(tools))  # spread drift evenly
                if phase == "first":
                    order = order + ["hash-limit"] if r % 2 == 0 else ["hash-limit"] + order
                for t in order:
                    if t == "hash-limit":
                        s, c = hash_limit(files)
                        wall[t].append(s)
                        cpu[t].append(c)
                        continue
                    s, c, out = run(cmds[t], env)
                    wall[f"{t}-{phase}"].append(s)
                    cpu[f"{t}-{phase}"].append(c)
                    if phase == "first" and r == 0:
                        if t == "sk":
                            o = json.loads(out.strip().splitlines()[-1])
                            reported[t] = (f"{o['filesLinked']} files linked, {o['bytesFreed']} bytes freed, "
                                           f"{o['netBytesFreed']} net of .links growth")
                        elif t == "nix":
                            m = re.search(r"([\d.]+ MiB) freed by hard-linking (\d+) files", out)
                            reported[t] = f"{m.group(2)} files linked, '{m.group(1)}' reported" if m else out
                        else:
                            m = re.search(r"Saved:\s*(.*)", out)
                            reported[t] = (m.group(1).strip() if m else out.strip().splitlines()[-1])
                subprocess.run(["sync"])
            if r == 0:
                for t in tools:
                    saved[t] = before - disk_bytes(os.path.join(copies[t], "nix", "store"))
            print(f"run {r} (load {os.getloadavg()[0]:.1f}): "
                  + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in wall.items()), flush=True)
            for d in copies.values():
                rmtree(d)
        med = {k: statistics.median(v) for k, v in wall.items()}
        mcpu = {k: statistics.median(v) for k, v in cpu.items()}
        for phase, target in (("first", 0.5), ("second", 0.5)):
            line = (f"median {phase} run: storekeeper {med[f'sk-{phase}']:.2f}s, "
                    f"nix {med[f'nix-{phase}']:.2f}s")
            if hardlink:
                line += f", hardlink {med[f'hardlink-{phase}']:.2f}s"
            line += (f"; ours/nix {med[f'sk-{phase}'] / med[f'nix-{phase}']:.2f}x (target <= {target}x)")
            if hardlink:
                line += f", ours/hardlink {med[f'sk-{phase}'] / med[f'hardlink-{phase}']:.2f}x"
            if phase == "first":
                line += (f"; hashing limit (2 processes) {med['hash-limit']:.2f}s, ours/limit "
                         f"{med['sk-first'] / med['hash-limit']:.2f}x (target <= 1.5x)")
            print(line)
            print("  cpu (user+sys): " + ", ".join(f"{t} {mcpu[f'{t}-{phase}']:.2f}s" for t in tools)
                  + (f", hash-limit {mcpu['hash-limit']:.2f}s" if phase == "first" else ""))
        for t in tools:
            print(f"saved by {t}: {saved[t]} bytes ({saved[t] / 2**20:.2f} MiB on disk); "
                  f"it reported: {reported.get(t, '?')}")
        return 0
    finally:
        rmtree(scratch)


if __name__ == "__main__":
    sys.exit(main())
