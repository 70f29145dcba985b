#!/usr/bin/env python3
"""Adding the same tree with storekeeper and with real `nix-store --add`, on fresh chroot stores.

Prints per-run seconds, medians and the ratio storekeeper / Nix (target <= 1.2x).
Both tools run as separate processes, alternating, with the source tree warm in
the page cache (one untimed warm-up run each).

    python3 bench/add.py --size-mb 1024 --runs 3
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import isolated_nix_env

HERE = os.path.dirname(os.path.abspath(__file__))


def make_tree(root: str, size_mb: int, seed: int) -> tuple[int, int]:
    """A tree like a package: a few big binaries, many small files, dirs, symlinks."""
    rng = random.Random(seed)
    target = size_mb << 20
    total = files = 0
    block = rng.randbytes(1 << 20)
    i = 0
    while total < target:
        d = os.path.join(root, f"d{i % 37}", f"s{i % 11}")
        os.makedirs(d, exist_ok=True)
        if i % 50 == 0:
            size = rng.randint(8 << 20, 64 << 20)
        else:
            size = int(rng.lognormvariate(9, 1.5))
        size = min(size, target - total) if total + size > target else size
        p = os.path.join(d, f"f{i}")
        with open(p, "wb") as f:
            left = size
            while left:
                n = min(left, len(block))
                off = rng.randrange(0, len(block) - n + 1)
                f.write(block[off:off + n])
                left -= n
        if i % 7 == 0:
            os.chmod(p, 0o755)
        if i % 13 == 0:
            os.symlink(f"f{i}", os.path.join(d, f"l{i}"))
        total += size
        files += 1
        i += 1
    return total, files


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, check=True)
    return time.perf_counter() - t0, r.stdout.decode().strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=None, help="scratch dir (default: a temp dir)")
    args = ap.parse_args()
    if shutil.which("nix-store") is None:
        print("nix-store not found: apt-get install nix-bin", file=sys.stderr)
        return 2
    sk = [sys.executable, "-m", "storekeeper.cli.main"]
    scratch = tempfile.mkdtemp(prefix="sk-bench-add-", dir=args.dir)
    env = isolated_nix_env(scratch)
    try:
        src = os.path.join(scratch, "tree")
        total, files = make_tree(src, args.size_mb, args.seed)
        print(f"tree: {total / 2**20:.0f} MiB in {files} files")
        results: dict[str, list[float]] = {"storekeeper": [], "nix-store": []}
        paths = {}
        for run in range(args.runs + 1):
            order = ["storekeeper", "nix-store"] if run % 2 == 0 else ["nix-store", "storekeeper"]
            for tool in order:
                root = os.path.join(scratch, f"{tool}-{run}")
                cmd = (sk + ["--store", root, "add", src]) if tool == "storekeeper" \
                    else ["nix-store", "--store", root, "--add", src]
                secs, out = timed(cmd, env)
                paths[tool] = out
                shutil.rmtree(root, ignore_errors=True)
                subprocess.run(["chmod", "-R", "u+w", root], capture_output=True)
                shutil.rmtree(root, ignore_errors=True)
                if run == 0:
                    print(f"warm-up {tool}: {secs:.2f}s")
                else:
                    results[tool].append(secs)
                    print(f"run {run} {tool}: {secs:.2f}s")
        if paths["storekeeper"] != paths["nix-store"]:
            print(f"MISMATCH: {paths}", file=sys.stderr)
            return 1
        med = {t: statistics.median(v) for t, v in results.items()}
        ratio = med["storekeeper"] / med["nix-store"]
        print(f"same store path: {paths['storekeeper']}")
        print(f"median storekeeper {med['storekeeper']:.2f}s, nix-store {med['nix-store']:.2f}s, "
              f"ratio {ratio:.2f}x (target <= 1.2x); "
              f"{total / 2**20 / med['storekeeper']:.0f} MiB/s vs {total / 2**20 / med['nix-store']:.0f} MiB/s")
        return 0
    finally:
        subprocess.run(["chmod", "-R", "u+w", scratch], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
