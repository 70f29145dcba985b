#!/usr/bin/env python3
"""Many real Nix 2.8 clients at once against storekeeper's daemon and the real nix-daemon.

For each concurrency level (default 4, 16, 64) each daemon, on its own store
seeded the same way, serves that many client threads at once; each thread
runs real client processes one after the other, a fixed number of operations
in all (bounded, not a fixed time), in a fixed mix:

* ``query``: ``nix-store -q --references|--hash|--requisites P`` of a rooted path;
* ``add``:   ``nix-store --add FILE`` of a file no one added before;
* ``root``:  ``nix-store -r P --add-root ROOTS/NAME --indirect`` of a rooted path
  (the daemon is told an indirect root);
* ``gc``:    ``nix-store --gc`` (deletes what is dead: the added, unrooted paths).

Real client processes, not protocol clients: a process start of ``nix-store``
is ~15 ms on this machine (bench/startup.py), the same for both daemons, and
what a real client pays; the per-connection cost of the daemon (its fork,
store open, handshake) is what differs and is what this measures.

The daemons take turns (one alone on the machine at a time; which goes first
alternates per level and run) so drifting load hits both alike.  Prints, per
level and daemon: ops/s, and p50/p99 latency per op kind; then the ratios
(throughput ours/Nix, target >= 1.0x; p99 ours/Nix, target <= 1.0x), medians
over runs.  Any failed client command is reported.

    python3 bench/daemon_load.py --runs 3 --levels 4 16 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from daemon import remove_scratch, start, stop

KINDS = ("query", "add", "root", "gc")
# One cycle of the mix (per client, in order, rotated by the client's number):
# 12 queries, 6 adds, 5 roots, 1 GC out of 24.
MIX = ("query", "add", "query", "root", "query", "query", "add", "query", "root", "query",
       "add", "query", "gc", "query", "add", "root", "query", "query", "add", "root",
       "query", "add", "root", "query")
SEEDS = 24
DAEMONS = ("storekeeper", "nix-daemon")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (the value at or below which q of the samples lie)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


class Level:
    """One daemon at one concurrency level: latencies per op kind, wall time, failures."""

    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = {k: [] for k in KINDS}
        self.failures: list[str] = []
        self.wall = 0.0
        self.daemon_cpu = 0.0  # seconds: the daemon and its (reaped) connection processes
        self.lock = threading.Lock()

    @property
    def ops(self) -> int:
        return sum(len(v) for v in self.lat.values())


def run_level(env: dict[str, str], clients: int, total_ops: int, seeds: list[str],
              files: str, roots: str, tag: str) -> Level:
    result = Level()
    per_client = [total_ops // clients + (1 if c < total_ops % clients else 0) for c in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        barrier.wait()
        for i in range(per_client[c]):
            kind = MIX[(c * 7 + i) % len(MIX)]
            seed = seeds[(c * 5 + i) % len(seeds)]
            if kind == "query":
                flag = ("--references", "--hash", "--requisites")[i % 3]
                cmd = ["nix-store", "-q", flag, seed]
            elif kind == "add":
                path = os.path.join(files, f"{tag}-c{c}-{i}.txt")
                with open(path, "w") as f:
                    f.write(f"added by client {c}, op {i}, {tag}\n")
                cmd = ["nix-store", "--add", path]
            elif kind == "root":
                cmd = ["nix-store", "-r", seed, "--add-root", os.path.join(roots, f"{tag}-c{c}-{i}"),
                       "--indirect"]
            else:
                cmd = ["nix-store", "--gc"]
            t = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
            dt = time.perf_counter() - t
            with result.lock:
                result.lat[kind].append(dt)
                if r.returncode:
                    result.failures.append(f"{' '.join(cmd)}: {r.stderr.decode(errors='replace').strip()}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    result.wall = time.perf_counter() - t0
    return result


def process_cpu(pid: int) -> float:
    """CPU seconds of ``pid``, its reaped children and its living descendants (a
    daemon may keep connection processes for more connections)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return 0.0  # (exited meanwhile: counted in its parent's once reaped)
    own = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return own + sum(process_cpu(c) for c in children)


def seed_store(env: dict[str, str], src: str, roots: str) -> list[str]:
    """SEEDS paths added and rooted (what queries and root ops use; never dead)."""
    paths = []
    for i in range(SEEDS):
        f = os.path.join(src, f"seed{i:02d}.txt")
        with open(f, "w") as out:
            out.write(f"seed {i}\n" * (1 + i))
        p = subprocess.run(["nix-store", "--add", f], env=env, capture_output=True, check=True,
                           text=True).stdout.strip()
        subprocess.run(["nix-store", "-r", p, "--add-root", os.path.join(roots, f"seed{i}"),
                        "--indirect"], env=env, capture_output=True, check=True)
        paths.append(p)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--levels", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--ops", type=int, default=384,
                    help="client commands per daemon and level (at least 4 per client)")
    ap.add_argument("--dir", default=None, help="scratch dir (default: a temp dir)")
    args = ap.parse_args()
    if shutil.which("nix-daemon") is None:
        print("nix-daemon not found: apt-get install nix-bin", file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix="sk-bench-load-", dir=args.dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env.update(HOME=os.path.join(scratch, "home"), NIX_CONF_DIR=os.path.join(scratch, "etc"),
               NIX_STATE_DIR=os.path.join(scratch, "state"), NIX_LOG_DIR=os.path.join(scratch, "log"),
               XDG_CACHE_HOME=os.path.join(scratch, "home", ".cache"))
    os.makedirs(env["NIX_CONF_DIR"])
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "w") as f:
        f.write("substituters =\nsandbox = false\nbuild-users-group =\n")
    # Our daemon limits connections per uid (32 by default) and every client
    # here is root: the limit is raised above the highest level, not removed.
    ours_conf = os.path.join(scratch, "storekeeper.conf")
    with open(ours_conf, "w") as f:
        f.write(f"max-connections-per-user = {max(args.levels) + 8}\n"
                f"max-connections = {max(args.levels) + 16}\n")
    # (median over runs) of ops/s, and p50/p99 per kind and overall
    stats: dict[tuple[int, str], dict[str, list[float]]] = {}
    try:
        for run in range(args.runs):
            for li, level in enumerate(args.levels):
                order = list(DAEMONS) if (run + li) % 2 == 0 else list(reversed(DAEMONS))
                for kind in order:
                    base = os.path.join(scratch, f"{kind}-{run}-{level}")
                    root, sock = base + "-store", base + ".sock"
                    src, roots = base + "-src", base + "-roots"
                    os.makedirs(src)
                    os.makedirs(roots)
                    with open(base + ".log", "wb") as log:
                        proc = start(kind, root, sock, env, log, config=ours_conf)
                    try:
                        denv = dict(env, NIX_REMOTE=f"unix://{sock}?root={root}")
                        seeds = seed_store(denv, src, roots)
                        cpu0 = process_cpu(proc.pid)
                        res = run_level(denv, level, max(args.ops, 4 * level), seeds, src, roots,
                                        f"r{run}")
                        time.sleep(0.3)  # (the last connection processes are reaped)
                        res.daemon_cpu = process_cpu(proc.pid) - cpu0
                    finally:
                        stop(proc)
                    if res.failures:
                        print(f"{kind}, {level} clients: {len(res.failures)} failed, first: "
                              f"{res.failures[0]}", file=sys.stderr)
                    s = stats.setdefault((level, kind), {})
                    s.setdefault("ops/s", []).append(res.ops / res.wall)
                    s.setdefault("failed", []).append(len(res.failures))
                    s.setdefault("cpu ms/op", []).append(res.daemon_cpu / res.ops * 1000)
                    every = [x for v in res.lat.values() for x in v]
                    for k, v in (*res.lat.items(), ("all", every)):
                        if v:
                            s.setdefault(f"{k} p50", []).append(percentile(v, 50))
                            s.setdefault(f"{k} p99", []).append(percentile(v, 99))
                    print(f"run {run + 1} {level:3} clients {kind:11}: {res.ops} ops in {res.wall:6.2f}s "
                          f"= {res.ops / res.wall:6.1f} ops/s  p50 {percentile(every, 50) * 1000:6.1f} ms  "
                          f"p99 {percentile(every, 99) * 1000:7.1f} ms  daemon cpu {res.daemon_cpu / res.ops * 1000:5.2f} ms/op  "
                          f"failed {len(res.failures)}  "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
                    remove_scratch(root)
        print("\nmedians over runs (latencies in ms)")
        ok = True
        for level in args.levels:
            ours, nix = stats[(level, "storekeeper")], stats[(level, "nix-daemon")]
            med = {k: {m: statistics.median(v) for m, v in s.items()} for k, s in
                   (("ours", ours), ("nix", nix))}
            tput = med["ours"]["ops/s"] / med["nix"]["ops/s"]
            p99 = med["ours"]["all p99"] / med["nix"]["all p99"]
            ok = ok and tput >= 1.0 and p99 <= 1.0
            print(f"{level:3} clients: ops/s ours {med['ours']['ops/s']:6.1f}  nix {med['nix']['ops/s']:6.1f}"
                  f"  ratio {tput:.2f}x (target >= 1.0x);  p99 all ours {med['ours']['all p99'] * 1000:.1f}"
                  f"  nix {med['nix']['all p99'] * 1000:.1f}  ratio {p99:.2f}x (target <= 1.0x)")
            print(f"      daemon cpu per op ours {med['ours']['cpu ms/op']:.2f} ms, "
                  f"nix {med['nix']['cpu ms/op']:.2f} ms")
            for k in (*KINDS, "all"):
                a50, b50 = med["ours"][f"{k} p50"] * 1000, med["nix"][f"{k} p50"] * 1000
                a99, b99 = med["ours"][f"{k} p99"] * 1000, med["nix"][f"{k} p99"] * 1000
                print(f"      {k:6} p50 {a50:7.1f} / {b50:7.1f} = {a50 / b50:.2f}x   "
                      f"p99 {a99:7.1f} / {b99:7.1f} = {a99 / b99:.2f}x")
            if med["ours"]["failed"] or med["nix"]["failed"]:
                print(f"      failed commands (median): ours {med['ours']['failed']}, "
                      f"nix {med['nix']['failed']}")
        print("all targets met" if ok else "targets NOT met at every level")
        return 0
    finally:
        remove_scratch(scratch)


if __name__ == "__main__":
    sys.exit(main())
