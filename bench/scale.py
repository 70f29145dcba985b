#!/usr/bin/env python3
"""storekeeper against Nix 2.8 on one big generated store (issue 20: a million paths).

The store is made once, outside this script (it takes minutes and ~12 GB):

    python3 ../shared/bench/mkstore.py /work/scale-store/s1m --paths 1000000 \\
        --files-per-path 1 --single-file-fraction 1 --seed 3 --register sqlite

Then, on that store (read-only operations run on it directly, with a warm cache):
  * liveness   `storekeeper gc --print-dead`   vs `nix-store --gc --print-dead` (dead sets compared)
  * roots      `storekeeper roots [--no-size]` vs `nix-store --gc --print-roots` (no sizes: like for like)
  * why-alive  `storekeeper why-alive P`       vs `nix-store -q --roots P` (Nix's nearest operation)
  * verify     `storekeeper verify`            vs `nix-store --verify`
  * du         `storekeeper du --nar`          (Nix has no such operation)
and, on fresh copies (`cp -a`; ext4 here has no reflinks, and a hard-linked copy
would only drop link counts), with the page cache dropped before each run:
  * deletion   `storekeeper gc`                vs `xargs -0 rm -rf` of the same dead paths

Dropping the page cache (``echo 3 > /proc/sys/vm/drop_caches``) is a machine-wide
setting: only this script does it, only with --delete, and it says so when it does.

Peak RSS is each child's ru_maxrss (wait4).  Nix's liveness takes minutes on a
million paths: ``--nix-from FILE`` reuses Nix's figures from an earlier run's
``--json`` output instead of running Nix again (the table then says so).

    python3 bench/scale.py --store /work/scale-store/s1m --label 1M --json out.json
    python3 bench/scale.py --store /work/scale-store/s1m --label 1M --nix-from out.json --delete
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import copy, isolated_nix_env, rmtree

TIME = "/usr/bin/time"
SK_SCRIPT = os.path.join(os.path.dirname(sys.executable), "storekeeper")


CPU: dict[str, float] = {}  # CPU seconds (user + sys) of the last run of each command


def run(cmd: list[str], env: dict[str, str], capture: bool = False,
        check: bool = True) -> tuple[float, int, bytes]:
    """Seconds, peak RSS in MiB, stdout (when ``capture``); its CPU seconds in ``CPU``
    (on a loaded machine the wall time is mostly waiting for a core).

    The peak RSS is taken by GNU time, a small process: a child forked straight
    from this one would report at least this process's own peak (Linux keeps
    the larger of the two ``maxrss`` across fork and exec), and we hold the
    million-path dead list.
    """
    with tempfile.NamedTemporaryFile("r") as rss_file:
        wrap = [TIME, "-f", "%U %S %M", "-o", rss_file.name] if os.path.exists(TIME) else []
        t0 = time.perf_counter()
        p = subprocess.Popen(wrap + cmd, env=env, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        out = p.stdout.read() if p.stdout else b""
        _, status, ru = os.wait4(p.pid, 0)
        secs = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        if check and code != 0:
            raise SystemExit(f"{' '.join(cmd[:6])}... failed ({code})")
        last = (rss_file.read().strip().splitlines() or [""])[-1].split()
        timed = bool(wrap) and len(last) == 3
        kib = int(last[2]) if timed else ru.ru_maxrss
        CPU[cmd[0] if cmd[0] not in (sys.executable, SK_SCRIPT) else "storekeeper"] = \
            float(last[0]) + float(last[1]) if timed else ru.ru_utime + ru.ru_stime
    return secs, kib // 1024, out


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Bench:
    def __init__(self, args, env: dict[str, str]) -> None:
        self.args, self.env = args, env
        # as installed: the `storekeeper` script (no runpy: ~3 ms of a `roots --no-size`)
        self.sk = ([SK_SCRIPT] if os.path.exists(SK_SCRIPT) else [sys.executable, "-m", "storekeeper.cli.main"]) \
            + ["--store"]
        self.rows: dict[str, dict] = {}
        self.old: dict[str, dict] = {}
        if args.nix_from:
            with open(args.nix_from) as f:
                self.old = json.load(f)["rows"]

    def measure(self, name: str, ours: list[str], nix: list[str] | None, runs: int,
                nix_runs: int = 1, warm: bool = True) -> tuple[bytes, bytes | None]:
        """Median seconds and max peak RSS of ours (and Nix's) over ``runs``; their outputs."""
        if warm:
            run(ours, self.env)  # the page cache and bytecode warm for both
        secs, rss, cpu, out = [], [], [], b""
        for _ in range(runs):
            s, m, out = run(ours, self.env, capture=True)
            secs.append(s)
            rss.append(m)
            cpu.append(CPU["storekeeper"])
        row = {"ours": statistics.median(secs), "ours_rss": max(rss), "ours_cpu": statistics.median(cpu),
               "runs": runs, "load": load()}
        nix_out = None
        if nix is not None and not self.args.skip_nix and not (self.old.get(name, {}).get("nix")):
            ns, nm, nc = [], [], []
            for _ in range(nix_runs):
                s, m, nix_out = run(nix, self.env, capture=True)
                ns.append(s)
                nm.append(m)
                nc.append(CPU[nix[0]])
            row.update(nix=statistics.median(ns), nix_rss=max(nm), nix_cpu=statistics.median(nc),
                       nix_load=load(), nix_reused=False)
        elif nix is not None and self.old.get(name, {}).get("nix"):
            o = self.old[name]
            row.update(nix=o["nix"], nix_rss=o["nix_rss"], nix_cpu=o.get("nix_cpu"), nix_load=o.get("nix_load"),
                       nix_reused=True)
        self.rows[name] = row
        self.report(name)
        return out, nix_out

    def report(self, name: str) -> None:
        r = self.rows[name]
        line = f"{name}: ours {r['ours']:.2f}s (cpu {r.get('ours_cpu') or 0:.2f}s) {r['ours_rss']} MiB"
        if "nix" in r:
            line += (f"; nix {r['nix']:.2f}s (cpu {r.get('nix_cpu') or 0:.2f}s) {r['nix_rss']} MiB"
                     f"{' (earlier run)' if r['nix_reused'] else ''}"
                     f"; ratio {r['ours'] / r['nix']:.3f}x")
        if "rm" in r:
            line += f"; rm -rf {r['rm']:.2f}s; ours/rm {r['ours'] / r['rm']:.3f}x"
        print(line + f"  (load {r['load']})", flush=True)

    def liveness(self, root: str) -> list[bytes]:
        ours, nix = self.measure("liveness", self.sk + [root, "gc", "--print-dead"],
                                 ["nix-store", "--store", root, "--gc", "--print-dead"], self.args.runs)
        dead = sorted(ours.split())
        if nix is not None:
            theirs = sorted(nix.split())
            if dead != theirs:
                raise SystemExit(f"DEAD SETS DIFFER: ours {len(dead)}, nix {len(theirs)}")
            self.rows["liveness"]["dead_equal_nix"] = True
        manifest = os.path.join(root, "bench-manifest.json")
        if os.path.exists(manifest):
            with open(manifest) as f:
                want = json.load(f)["dead_paths"]
            if len(dead) != want:
                raise SystemExit(f"dead paths: ours {len(dead)}, the generator made {want}")
        self.rows["liveness"]["dead"] = len(dead)
        print(f"  dead paths: {len(dead)}" + (" (equal to Nix's)" if nix is not None else ""), flush=True)
        return dead

    def read_only_ops(self, root: str, dead: list[bytes]) -> None:
        runs = self.args.runs
        self.measure("roots", self.sk + [root, "roots"],
                     ["nix-store", "--store", root, "--gc", "--print-roots"], runs, nix_runs=runs)
        # like for like: Nix's --print-roots computes no closure sizes
        self.measure("roots --no-size", self.sk + [root, "roots", "--no-size"],
                     ["nix-store", "--store", root, "--gc", "--print-roots"], runs, nix_runs=runs)
        # some live path (the first in name order: a random one, the same each run)
        live = run(self.sk + [root, "gc", "--print-live"], self.env, capture=True)[2].split()
        target = min(live) if live else None
        if target:
            self.measure("why-alive", self.sk + [root, "why-alive", target.decode()],
                         ["nix-store", "--store", root, "-q", "--roots", target.decode()], runs, nix_runs=runs)
        self.measure("verify", self.sk + [root, "verify"], ["nix-store", "--store", root, "--verify"],
                     runs, nix_runs=1)
        if self.args.du:
            self.measure("du", self.sk + [root, "du", "--nar"], None, 1)

    def deletion(self, root: str, dead: list[bytes]) -> None:
        work = tempfile.mkdtemp(prefix="sk-scale-", dir=self.args.work)
        try:
            print("note: dropping the page cache before each deletion "
                  "(echo 3 > /proc/sys/vm/drop_caches: machine-wide)", flush=True)
            copy_dir = os.path.join(work, "sk")
            t0 = time.perf_counter()
            copy(root, copy_dir)
            print(f"  copied the store in {time.perf_counter() - t0:.0f}s", flush=True)
            drop_caches()
            s, m, _ = run(self.sk + [copy_dir, "gc"], self.env)
            row = {"ours": s, "ours_rss": m, "runs": 1, "load": load()}
            left = run(self.sk + [copy_dir, "gc", "--print-dead"], self.env, capture=True)[2].split()
            gone = sum(not os.path.lexists(os.path.join(copy_dir, p.decode().lstrip("/"))) for p in dead)
            if left or gone != len(dead):
                raise SystemExit(f"after our gc: {len(left)} dead left, {gone}/{len(dead)} deleted")
            rmtree(copy_dir)
            copy(root, copy_dir)
            listing = os.path.join(work, "dead.list")
            with open(listing, "wb") as f:  # in name order, as the GC prints them
                f.write(b"\0".join(os.path.join(copy_dir, p.decode().lstrip("/")).encode() for p in dead))
            drop_caches()
            s, _, _ = run(["sh", "-c", 'xargs -0 rm -rf < "$0"', listing], self.env)
            row["rm"] = s
            row["rm_load"] = load()
            self.rows["deletion"] = row
            self.report("deletion")
        finally:
            rmtree(work)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a store made by mkstore.py (chroot root)")
    ap.add_argument("--label", default="", help="the size label of the table rows (1M, 100k)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each of our operations (median)")
    ap.add_argument("--skip-nix", action="store_true", help="do not run Nix")
    ap.add_argument("--nix-from", metavar="JSON", help="reuse Nix's figures from an earlier --json output")
    ap.add_argument("--delete", action="store_true",
                    help="also time deletion on two fresh copies (needs the store's size free twice)")
    ap.add_argument("--du", action="store_true", help="also time `storekeeper du --nar`")
    ap.add_argument("--only-liveness", action="store_true")
    ap.add_argument("--work", default=None, help="where the copies go (default: beside the store)")
    ap.add_argument("--json", metavar="FILE", help="write the figures here")
    args = ap.parse_args()
    root = os.path.abspath(args.store)
    args.work = args.work or os.path.dirname(root)
    scratch = tempfile.mkdtemp(prefix="sk-scale-env-", dir=args.work)
    try:
        env = isolated_nix_env(scratch)
        b = Bench(args, env)
        print(f"store {root}; load {load()}", flush=True)
        dead = b.liveness(root)
        if not args.only_liveness:
            b.read_only_ops(root, dead)
        if args.delete:
            b.deletion(root, dead)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"label": args.label, "store": root, "rows": b.rows}, f, indent=1)
        print(f"\n| op ({args.label}) | storekeeper s | Nix 2.8 s | ratio | our CPU s | our peak RSS MiB | "
              "Nix peak RSS MiB | load |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in b.rows.items():
            if "rm" in r:
                print(f"| deletion vs rm -rf | {r['ours']:.1f} | rm -rf {r['rm']:.1f} | "
                      f"{r['ours'] / r['rm']:.2f}x | - | {r['ours_rss']} | - | {r['load']} |")
                continue
            nix = f"{r['nix']:.2f}" + (" (earlier run)" if r.get("nix_reused") else "") if "nix" in r else "-"
            ratio = f"{r['ours'] / r['nix']:.3f}x" if "nix" in r else "-"
            print(f"| {name} | {r['ours']:.2f} | {nix} | {ratio} | {r.get('ours_cpu', 0):.2f} | {r['ours_rss']} | "
                  f"{r.get('nix_rss', '-')} | {r['load']} |")
        return 0
    finally:
        rmtree(scratch)


if __name__ == "__main__":
    sys.exit(main())
