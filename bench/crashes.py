#!/usr/bin/env python3
"""SIGKILL storekeeper at many crash points (``STOREKEEPER_CRASH_AT=<point>:<n>``) and check
the store after each: no rooted path lost or changed, our ``verify --check-contents`` and real
``nix-store --verify --check-contents`` pass, and the interrupted command then succeeds.

tests/test_crash_points.py drives every point once (and builds through the daemon); this
drives the n-th arrival at each point too (the 3rd file of an add, the 5th GC batch, …).

    python3 bench/crashes.py --max-n 20        # about 190 crashes
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _nixenv import isolated_nix_env

from storekeeper.formats.url import LocalLayout
from storekeeper.fs.crash import ENV
from storekeeper.fs.narfs import nar_hash_path
from storekeeper.store.local import LocalStore

SK = [sys.executable, "-m", "storekeeper.cli.main"]
N_ADD = 20  # files given to one `add`, so add.* points are reached that often

#: point -> command (in-store GC with a byte budget deletes one path per batch)
DRIVE = {
    "add.staged": "add", "add.moved": "add", "add.canonical": "add",
    "register.synced": "add", "register.written": "add", "register.committed": "add",
    "gc.invalidated": "gc", "gc.unlinked": "gc",
    "optimise.linked": "optimise", "optimise.renamed": "optimise",
}


def prepare(d: str) -> tuple[str, dict[str, str], list[str]]:
    root = os.path.join(d, "root")
    rooted: dict[str, str] = {}
    with LocalStore(LocalLayout.chroot(root)) as store:
        for i in range(30):
            src = os.path.join(d, f"t{i}")
            os.makedirs(os.path.join(src, "sub"))
            with open(os.path.join(src, "same"), "wb") as f:
                f.write(b"shared\n" * 200)
            with open(os.path.join(src, "sub", "own"), "wb") as f:
                f.write(f"own {i}\n".encode() * 50)
            info = store.add_path(src)
            p = store.print_path(info.path)
            if i % 2 == 0:
                rooted[p] = info.nar_hash.typed("base32")
                os.symlink(p, os.path.join(store.state_dir, "gcroots", f"r{i}"))
    new = []
    for i in range(N_ADD):
        f = os.path.join(d, f"new{i}")
        with open(f, "wb") as out:
            out.write(f"new {i}\n".encode() * 300 + b"shared\n" * 200)
        new.append(f)
    return root, rooted, new


def check(root: str, rooted: dict[str, str], env: dict[str, str]) -> str | None:
    with LocalStore(LocalLayout.chroot(root)) as store:
        for p, h in rooted.items():
            sp = store.parse_path(p)
            if not store.is_valid(sp):
                return f"{p} lost"
            if nar_hash_path(store.real_path(sp))[0].typed("base32") != h:
                return f"{p} changed"
    r = subprocess.run([*SK, "--store", root, "verify", "--check-contents"], capture_output=True,
                       text=True, env=env, timeout=300)
    if r.returncode != 0:
        return "our verify: " + r.stdout + r.stderr
    n = subprocess.run(["nix-store", "--store", root, "--verify", "--check-contents"],
                       capture_output=True, text=True, env=env, timeout=300)
    if n.returncode != 0 or "modified" in n.stderr:
        return "nix verify: " + n.stderr
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-n", type=int, default=20, help="crash at the 1st .. n-th arrival")
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="sk-crashes-")
    env = isolated_nix_env(scratch)
    done = failed = unreached = 0
    t0 = time.monotonic()
    try:
        for point, op in DRIVE.items():
            for n in range(1, args.max_n + 1):
                d = tempfile.mkdtemp(dir=scratch)
                root, rooted, new = prepare(d)
                cmd = {"add": ["add", *new], "gc": ["gc", "--max-freed", str(2**40)],
                       "optimise": ["optimise"]}[op]
                r = subprocess.run([*SK, "--store", root, *cmd], capture_output=True, text=True,
                                   env={**env, ENV: f"{point}:{n}"}, timeout=300)
                if r.returncode != -9:
                    unreached += 1  # fewer than n arrivals: nothing to test
                    shutil.rmtree(d, ignore_errors=True)
                    continue
                done += 1
                problem = check(root, rooted, env)
                if problem is None:
                    again = subprocess.run([*SK, "--store", root, *cmd], capture_output=True,
                                           text=True, env=env, timeout=300)
                    problem = None if again.returncode == 0 else "rerun: " + again.stderr
                    problem = problem or check(root, rooted, env)
                if problem:
                    failed += 1
                    print(f"FAIL {point}:{n}: {problem.strip()}", flush=True)
                shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{done} crashes ({unreached} points not reached that often), {failed} stores failing "
          f"a check, {time.monotonic() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
