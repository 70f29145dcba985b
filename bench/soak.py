#!/usr/bin/env python3
"""Soak: real Nix 2.8 clients hammer storekeeper's daemon for N minutes, then the store is checked.

``--clients`` threads (default 8) each loop over real client commands through our
daemon: ``nix-store --add`` of a fresh tree (then rooted with ``nix-store -r
--add-root --indirect``), ``nix-build -o LINK`` of a fresh derivation (sandboxed,
rooted by its result link), and unrooting (deleting a link; each client keeps at
most ``--max-roots``).  Meanwhile a GC through the daemon runs every ``--gc-every``
seconds, ``nix-store --optimise`` runs in a loop, and the store lives on a small
loop-mounted ext4 (as root: ``--fs-mib``) with ``min-free``/``max-free`` set so
that auto-GC runs before adds.

At the end (daemon stopped): every path still rooted is valid with the NAR hash
its content has (computed by the client before adding, or known from the build
script), our ``verify --check-contents`` and real ``nix-store --verify
--check-contents`` pass.  Prints ops/s, GC and auto-GC runs, p50/p99 latency per
op, the daemon's peak RSS (the largest process, and all its processes together)
and the machine load.  Not in CI (a 20 s smoke run is in tests/test_soak.py).

    sudo python3 bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _nixenv import wait_for_socket  # noqa: E402

from storekeeper.formats import nar as narfmt
from storekeeper.formats.hashes import Hash
from storekeeper.fs.narfs import nar_hash_path

SK = [sys.executable, "-m", "storekeeper.cli.main"]
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
SYSTEM = "x86_64-linux"
MiB = 2**20
NS_ENV = "STOREKEEPER_SOAK_NAMESPACE"


def build_expr(seed: str) -> str:
    return (f'derivation {{ name = "soak-{seed}"; system = "{SYSTEM}"; builder = "/bin/sh"; '
            f'args = ["-c" "echo soak-{seed} > $out"]; }}')


def build_hash(seed: str) -> str:
    return Hash.of("sha256", narfmt.dump_string(f"soak-{seed}\n".encode())).typed("base32")


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lat: dict[str, list[float]] = collections.defaultdict(list)
        self.counts: collections.Counter[str] = collections.Counter()

    def time(self, op: str, t0: float) -> None:
        with self.lock:
            self.lat[op].append(time.monotonic() - t0)

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n


class Soak:
    def __init__(self, args: argparse.Namespace, scratch: str, root: str, env: dict[str, str]) -> None:
        self.args, self.scratch, self.root, self.env = args, scratch, root, env
        self.sock = os.path.join(scratch, "sock")
        self.cenv = {**env, "NIX_REMOTE": f"unix://{self.sock}"}
        self.stats = Stats()
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.rooted: dict[str, tuple[str, str]] = {}  # link -> (path, expected NAR hash)
        self.rooted_lock = threading.Lock()
        self.peak_one = self.peak_all = 0

    # --- the clients -------------------------------------------------------------

    def run(self, argv: list[str], op: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, env=env or self.cenv, timeout=600)
        self.stats.time(op, t0)
        self.stats.count("auto-GC runs", r.stderr.count("running auto-GC"))
        return r

    def fail(self, msg: str) -> None:
        with self.stats.lock:
            self.failures.append(msg)
        print("FAIL", msg, flush=True)

    def client(self, k: int) -> None:
        rnd = random.Random(k)
        links = os.path.join(self.scratch, "links", str(k))
        os.makedirs(links)
        mine: list[str] = []
        n = 0
        while not self.stop.is_set():
            n += 1
            seed = f"{k}-{n}-{rnd.getrandbits(32):08x}"
            op = rnd.choices(["add", "build", "unroot"], [6, 2, 2])[0]
            if op == "unroot" or len(mine) >= self.args.max_roots:
                if mine:
                    link = mine.pop(rnd.randrange(len(mine)))
                    with self.rooted_lock:
                        del self.rooted[link]
                    t0 = time.monotonic()
                    os.unlink(link)
                    self.stats.time("unroot", t0)
                continue
            link = os.path.join(links, seed)
            if op == "add":
                src = os.path.join(self.scratch, "src", seed)
                os.makedirs(os.path.join(src, "d"))
                for i in range(rnd.randint(1, 4)):
                    size = int(rnd.expovariate(1 / self.args.mean_kib)) * 1024 + rnd.randrange(1024)
                    with open(os.path.join(src, "d" if i % 2 else "", f"f{i}"), "wb") as f:
                        f.write(rnd.randbytes(size))
                want = nar_hash_path(src)[0].typed("base32")
                r = self.run(["nix-store", "--add", src], "add")
                shutil.rmtree(src)
                if r.returncode != 0:
                    self.fail(f"add: {r.stderr.strip()}")
                    continue
                path = r.stdout.strip()
                r = self.run(["nix-store", "--add-root", link, "--indirect", "-r", path], "root")
                if r.returncode != 0:
                    # collected between the two commands (it had no root yet): fine
                    self.stats.count("added paths collected before rooting")
                    continue
            else:
                r = self.run(["nix-build", "-o", link, "-E", build_expr(seed)], "build")
                if r.returncode != 0:
                    self.fail(f"build: {r.stderr.strip()[-500:]}")
                    continue
                path, want = r.stdout.strip(), build_hash(seed)
            with self.rooted_lock:
                self.rooted[link] = (path, want)
            mine.append(link)

    def gc_loop(self) -> None:
        while not self.stop.wait(self.args.gc_every):
            r = self.run([*SK, "--store", f"unix://{self.sock}", "gc"], "gc", env=self.env)
            self.stats.count("GC runs")
            if r.returncode != 0:
                self.fail(f"gc: {r.stderr.strip()}")

    def optimise_loop(self) -> None:
        while not self.stop.is_set():
            r = self.run(["nix-store", "--optimise"], "optimise")
            self.stats.count("optimise runs")
            if r.returncode != 0:
                self.fail(f"optimise: {r.stderr.strip()}")
            self.stop.wait(0.5)

    def sample_rss(self, daemon_pid: int) -> None:
        while not self.stop.wait(0.25):
            total = 0
            for pid in _tree(daemon_pid):
                pss, hwm = _memory(pid)
                total += pss
                self.peak_one = max(self.peak_one, hwm)
            self.peak_all = max(self.peak_all, total)

    # --- the whole run -------------------------------------------------------------

    def go(self) -> int:
        subprocess.run([*SK, "--store", self.root, "init"], env=self.env, check=True, capture_output=True)
        daemon = subprocess.Popen([sys.executable, "-m", "storekeeper.daemon", "--store", self.root,
                                   "--socket", self.sock], env=self.env, stdout=subprocess.DEVNULL,
                                  stderr=open(os.path.join(self.scratch, "daemon.log"), "wb"))
        wait_for_socket(self.sock, daemon)
        load0 = os.getloadavg()
        threads = [threading.Thread(target=self.client, args=(k,)) for k in range(self.args.clients)]
        threads += [threading.Thread(target=self.gc_loop), threading.Thread(target=self.optimise_loop),
                    threading.Thread(target=self.sample_rss, args=(daemon.pid,))]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        try:
            self.stop.wait(self.args.minutes * 60)
        finally:
            self.stop.set()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t0
            load1 = os.getloadavg()
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        problems = self.check()
        self.report(elapsed, load0, load1, problems)
        return 1 if problems or self.failures else 0

    def check(self) -> list[str]:
        problems = []
        with self.rooted_lock:
            rooted = dict(self.rooted)
        for path, want in sorted(rooted.values()):
            q = subprocess.run(["nix-store", "--store", self.root, "-q", "--hash", path], env=self.env,
                               capture_output=True, text=True)
            if q.returncode != 0:
                problems.append(f"rooted {path} not valid: {q.stderr.strip()}")
                continue
            if q.stdout.strip() != want:
                problems.append(f"rooted {path}: recorded {q.stdout.strip()}, expected {want}")
            try:
                got = nar_hash_path(self.root + path)[0].typed("base32")
            except OSError as e:
                got = str(e)
            if got != want:
                problems.append(f"rooted {path} changed on disk: {got}")
        ours = subprocess.run([*SK, "--store", self.root, "verify", "--check-contents"], env=self.env,
                              capture_output=True, text=True)
        if ours.returncode != 0:
            problems.append("our verify: " + (ours.stdout + ours.stderr).strip()[-1000:])
        nix = subprocess.run(["nix-store", "--store", self.root, "--verify", "--check-contents"],
                             env=self.env, capture_output=True, text=True)
        if nix.returncode != 0 or "modified" in nix.stderr:
            problems.append("nix verify: " + nix.stderr.strip()[-1000:])
        self.checked = len(rooted)
        return problems

    def report(self, elapsed: float, load0, load1, problems: list[str]) -> None:
        st = self.stats
        client_ops = sum(len(st.lat[o]) for o in ("add", "build", "unroot"))
        print(f"{self.args.clients} clients, {elapsed:.0f} s, load {load0[0]:.1f} at the start, "
              f"{load1[0]:.1f} at the end (1-min avg; {os.cpu_count()} CPUs)")
        print(f"client ops: {client_ops} ({client_ops / elapsed:.1f}/s); all commands: "
              f"{sum(len(v) for v in st.lat.values()) / elapsed:.1f}/s")
        for what in ("GC runs", "auto-GC runs", "optimise runs", "added paths collected before rooting"):
            print(f"{what}: {st.counts[what]}")
        print(f"{'op':10} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for op in ("add", "root", "build", "unroot", "gc", "optimise"):
            v = sorted(st.lat[op])
            if v:
                p99 = v[min(len(v) - 1, int(len(v) * 0.99))]
                print(f"{op:10} {len(v):6} {statistics.median(v) * 1e3:8.1f} {p99 * 1e3:8.1f} "
                      f"{v[-1] * 1e3:8.1f}")
        print(f"daemon peak RSS: {self.peak_one / 1024:.0f} MiB (largest process), "
              f"{self.peak_all / 1024:.0f} MiB (all its processes at once, PSS)")
        print(f"checked {self.checked} rooted paths; {len(self.failures)} failed commands; "
              f"{len(problems)} problems")
        for p in problems[:20]:
            print("PROBLEM", p)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(Pss, VmHWM) in KiB (Pss: shared pages counted once over the forked processes);
    0 for a process gone meanwhile."""
    pss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return pss, hwm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--gc-every", type=float, default=3, metavar="SECONDS")
    ap.add_argument("--max-roots", type=int, default=25, help="rooted paths per client at most")
    ap.add_argument("--mean-kib", type=int, default=128, help="mean size of an added file "
                    "(the roots at most: clients x max-roots x ~2.5 files: keep well below --fs-mib)")
    ap.add_argument("--fs-mib", type=int, default=256, help="the store's file system (root only)")
    ap.add_argument("--min-free-mib", type=int, default=128)
    ap.add_argument("--max-free-mib", type=int, default=160)
    args = ap.parse_args()
    if os.geteuid() == 0 and not os.environ.get(NS_ENV) and shutil.which("unshare"):
        # a private mount namespace: the loop mount is ours alone, and gone when we are
        os.environ[NS_ENV] = "1"
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", sys.executable,
                              *sys.argv])
    scratch = tempfile.mkdtemp(prefix="sk-soak-")
    mnt = os.path.join(scratch, "fs")
    os.makedirs(mnt)
    small = False
    if os.environ.get(NS_ENV):
        img = os.path.join(scratch, "img")
        with open(img, "wb") as f:
            f.truncate(args.fs_mib * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
        small = subprocess.run(["mount", "-o", "loop", img, mnt]).returncode == 0
    if not small:
        print("note: not root (or no loop mount): the store is on the scratch file system, "
              "so min-free may never trigger an auto-GC", file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env.update(HOME=os.path.join(scratch, "home"), NIX_CONF_DIR=os.path.join(scratch, "etc"),
               NIX_STATE_DIR=os.path.join(scratch, "nixstate"), NIX_LOG_DIR=os.path.join(scratch, "log"),
               XDG_CACHE_HOME=os.path.join(scratch, "cache"))
    os.makedirs(env["NIX_CONF_DIR"])
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "w") as f:
        f.write("substituters =\nbuild-users-group =\nsandbox = false\n"
                f"sandbox-paths = /bin/sh={BUSYBOX}\n"
                f"min-free = {args.min_free_mib * MiB}\nmax-free = {args.max_free_mib * MiB}\n"
                "min-free-check-interval = 1\n")
    try:
        return Soak(args, scratch, os.path.join(mnt, "root"), env).go()
    finally:
        if small:
            subprocess.run(["umount", mnt])
        subprocess.run(["chmod", "-R", "u+w", scratch], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
