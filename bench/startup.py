#!/usr/bin/env python3
"""CLI cold start against real `nix-store`'s own start, on the same small store.

Times, interleaved (the order turns every run, so drift falls on both tools) after
a warm-up, the wall time of:

  * `storekeeper --version`                 vs  `nix-store --version`
  * `storekeeper --store R query --hash P`  vs  `nix-store --store R -q --hash P`

where R is a small chroot store made in a temp dir with our CLI (never the
machine's /nix) and P one of its paths; both tools must print the same hash.
storekeeper runs as installed: the `storekeeper` script beside this Python
(`.venv/bin/storekeeper`, scripts/storekeeper as pip installs it), with its modules
precompiled (`compileall`) and
PYTHONDONTWRITEBYTECODE unset for the measured runs (this machine sets it, which
would otherwise time byte-compiling on every start).

Prints the medians, the ratios (target: <= 2x nix-store; the ratio of the fastest
runs too, which load disturbs least) and the load average (os.getloadavg) before and
after: on a shared machine a busy minute shows.

``--baseline SCRIPT`` also times another install's ``storekeeper`` (say, of the
commit before a change) in the same interleaved rounds, its modules precompiled the
same way, so a before/after comparison shares the machine's load:

    python3 bench/startup.py --runs 30
    git archive main | tar -x -C /tmp/before && python3 -m venv /tmp/before/.venv \
        && /tmp/before/.venv/bin/pip install -e /tmp/before
    python3 bench/startup.py --runs 30 --baseline /tmp/before/.venv/bin/storekeeper
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

from _nixenv import isolated_nix_env, rmtree


def default_storekeeper() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "storekeeper")
    return beside if os.path.exists(beside) else (shutil.which("storekeeper") or beside)


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds and stdout of one run (which must succeed)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr.decode(errors='replace')}")
    return secs, p.stdout.decode(errors="replace")


def precompile(script: str, env: dict[str, str]) -> None:
    """Byte-compile the storekeeper package the console script ``script`` runs (its
    interpreter is on its first line), as isolated_nix_env does for ours."""
    with open(script, "rb") as f:
        python = f.readline()[2:].decode().split()[0]
    where = subprocess.run([python, "-c", "import os, storekeeper; print(os.path.dirname(storekeeper.__file__))"],
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([python, "-m", "compileall", "-q", where], env=env, check=True, stdout=subprocess.DEVNULL)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30, help="measured runs of each command (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured runs of each first (default 3)")
    ap.add_argument("--storekeeper", default=default_storekeeper(), help="the console script to time")
    ap.add_argument("--baseline", default=None, metavar="SCRIPT",
                    help="another storekeeper console script to time alongside (before/after)")
    ap.add_argument("--dir", default=None, help="scratch dir (default: a new temp dir)")
    args = ap.parse_args()
    nix_store = shutil.which("nix-store")
    if nix_store is None:
        print("needs nix-store (apt-get install nix-bin)", file=sys.stderr)
        return 2
    if not os.path.exists(args.storekeeper):
        print(f"no storekeeper console script at '{args.storekeeper}' (pip install -e .)", file=sys.stderr)
        return 2
    sk = args.storekeeper
    scratch = tempfile.mkdtemp(prefix="sk-bench-startup-", dir=args.dir)
    try:
        env = isolated_nix_env(scratch)  # precompiles storekeeper, unsets PYTHONDONTWRITEBYTECODE
        root = os.path.join(scratch, "root")
        src = os.path.join(scratch, "hello.txt")
        with open(src, "w") as f:
            f.write("hello, startup\n")
        subprocess.run([sk, "--store", root, "add", src], env=env, check=True, stdout=subprocess.DEVNULL)
        _, out = run([sk, "--store", root, "add", src], env)
        path = out.strip()
        cmds = {
            "sk --version": [sk, "--version"],
            "nix --version": [nix_store, "--version"],
            "sk query --hash": [sk, "--store", root, "query", "--hash", path],
            "nix -q --hash": [nix_store, "--store", root, "-q", "--hash", path],
        }
        pairs = [("sk --version", "nix --version"), ("sk query --hash", "nix -q --hash")]
        if args.baseline:
            precompile(args.baseline, env)
            cmds["base --version"] = [args.baseline, "--version"]
            cmds["base query --hash"] = [args.baseline, "--store", root, "query", "--hash", path]
            pairs += [("base --version", "nix --version"), ("base query --hash", "nix -q --hash")]
        _, theirs = run(cmds["nix -q --hash"], env)
        for n in cmds:
            ours = run(cmds[n], env)[1] if n.endswith("query --hash") else theirs
            if ours != theirs:
                raise SystemExit(f"the hashes differ: {n} {ours!r}, nix-store {theirs!r}")
        print(f"store {root} (chroot), path {path}, hash {theirs.strip()}")
        print(f"storekeeper: {sk} ({sys.version.split()[0]}); {nix_store}: {run(cmds['nix --version'], env)[1].strip()}")
        load_before = load()
        names = list(cmds)
        for _ in range(args.warmup):
            for n in names:
                run(cmds[n], env)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.runs):
            order = names if r % 2 == 0 else list(reversed(names))
            for n in order:
                times[n].append(run(cmds[n], env)[0])
        load_after = load()
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"{args.runs} runs each after {args.warmup} warm-up, interleaved; medians (min):")
        for n in names:
            print(f"  {n:20} {med[n]:.4f} s  ({min(times[n]):.4f} s)")
        for ours_n, theirs_n in pairs:
            print(f"ratio {ours_n} / {theirs_n}: {med[ours_n] / med[theirs_n]:.2f}x (target <= 2x; "
                  f"fastest runs {min(times[ours_n]) / min(times[theirs_n]):.2f}x)")
        print(f"load average (1, 5, 15 min): {load_before} before, {load_after} after; "
              f"{os.cpu_count()} CPUs")
        return 0
    finally:
        rmtree(scratch)


if __name__ == "__main__":
    sys.exit(main())
