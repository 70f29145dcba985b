#!/usr/bin/env python3
"""The same real-Nix client commands against storekeeper's daemon and the real nix-daemon.

Each run starts both daemons on identical fresh chroot stores and plays one
sequence of real Nix 2.8 client commands: N x ``nix-store --add`` of small
files, N x ``nix-store -q --references``/``--hash``, a few text paths with
references (``nix-instantiate``), ``nix path-info --json -r`` and
``nix-store --verify-path``.  Each command runs against both daemons back to
back, alternating which goes first, so that drifting machine load hits both
alike.  Daemon start-up is not timed.  Prints per-phase and total seconds per
run, the medians and the ratio storekeeper / Nix (target <= 1.2x), and checks
that both daemons gave the same answers.

    python3 bench/daemon.py --runs 3 --n 200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import wait_for_socket  # noqa: E402

NIX_CMD = ["--extra-experimental-features", "nix-command"]
PHASES = ("add", "query", "text", "path-info", "verify")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def remove_scratch(path: str) -> None:
    subprocess.run(["chmod", "-R", "u+w", path], capture_output=True)  # store files are read-only
    shutil.rmtree(path, ignore_errors=True)


def start(kind: str, root: str, sock: str, env: dict[str, str], log,
          config: str | None = None) -> subprocess.Popen:
    """Start one daemon on a fresh store; ``config``: a settings file for ours only."""
    env = dict(env)
    if kind == "storekeeper":
        cmd = [sys.executable, "-m", "storekeeper.daemon", "--store", root, "--socket", sock]
        if config is not None:
            cmd += ["--config", config]
    else:
        # A fresh store is created before the daemon starts: 2.8's first
        # connections race to create it.
        subprocess.run(["nix-store", "--store", root, "--init"], env=env, check=True)
        cmd = ["nix-daemon", "--store", root]
        env["NIX_DAEMON_SOCKET_PATH"] = sock
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for_socket(sock, proc)
    return proc


class Pair:
    """Runs each client command against both daemons, back to back, alternating which
    goes first: load drifting on the machine then hits both alike."""

    def __init__(self, envs: dict[str, dict[str, str]]) -> None:
        self.envs = envs
        self.times = {kind: dict.fromkeys(PHASES, 0.0) for kind in envs}
        self.count = 0
        self.mismatches: list[str] = []

    def run(self, phase: str, *cmd: str, normalise=lambda out: out) -> str:
        kinds = list(self.envs)
        if self.count % 2:
            kinds.reverse()
        self.count += 1
        outs = {}
        for kind in kinds:
            t = time.perf_counter()
            r = subprocess.run(cmd, env=self.envs[kind], capture_output=True, timeout=120)
            self.times[kind][phase] += time.perf_counter() - t
            if r.returncode:
                raise RuntimeError(f"{kind}: {' '.join(cmd)} failed: {r.stderr.decode()}")
            outs[kind] = normalise(r.stdout.decode())
        a, b = outs.values()
        if a != b:
            self.mismatches.append(f"{' '.join(cmd)}: {outs}")
        return a


def without_registration_time(out: str) -> str:
    info = json.loads(out)
    for entry in info:
        entry.pop("registrationTime", None)
    return json.dumps(info, sort_keys=True)


def session(pair: Pair, files: list[str]) -> None:
    """The client commands of one run."""
    paths = [pair.run("add", "nix-store", "--add", f).strip() for f in files]
    for i, p in enumerate(paths):
        pair.run("query", "nix-store", "-q", "--references" if i % 2 else "--hash", p)
    chain, texts = paths[0], []
    for i in range(5):
        expr = f'builtins.toFile "chain{i}" "{i} uses ${{builtins.storePath "{chain}"}}"'
        chain = json.loads(pair.run("text", "nix-instantiate", "--read-write-mode", "--eval", "-E", expr))
        texts.append(chain)
    for p in texts:
        pair.run("path-info", "nix", *NIX_CMD, "path-info", "--json", "-r", p,
                 normalise=without_registration_time)
    for i in range(0, len(paths), 50):
        pair.run("verify", "nix-store", "--verify-path", *paths[i:i + 50])
    pair.run("verify", "nix-store", "--verify-path", *texts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n", type=int, default=200, help="files to add and paths to query")
    ap.add_argument("--dir", default=None, help="scratch dir (default: a temp dir)")
    args = ap.parse_args()
    if shutil.which("nix-daemon") is None:
        print("nix-daemon not found: apt-get install nix-bin", file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix="sk-bench-daemon-", dir=args.dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env.update(HOME=os.path.join(scratch, "home"), NIX_CONF_DIR=os.path.join(scratch, "etc"),
               NIX_STATE_DIR=os.path.join(scratch, "state"), NIX_LOG_DIR=os.path.join(scratch, "log"),
               XDG_CACHE_HOME=os.path.join(scratch, "home", ".cache"))
    os.makedirs(env["NIX_CONF_DIR"])
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "w") as f:
        f.write("substituters =\nsandbox = false\nbuild-users-group =\n")
    src = os.path.join(scratch, "src")
    os.makedirs(src)
    files = []
    for i in range(args.n):
        files.append(os.path.join(src, f"f{i:04d}.txt"))
        with open(files[-1], "w") as f:
            f.write(f"small file {i}\n" * (1 + i % 7))
    kinds = ("storekeeper", "nix-daemon")
    totals: dict[str, list[float]] = {k: [] for k in kinds}
    phases: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PHASES} for k in kinds}
    try:
        for run in range(args.runs):
            procs, envs = [], {}
            try:
                for kind in kinds:
                    root = os.path.join(scratch, f"{kind}-{run}")
                    sock = os.path.join(scratch, f"{kind}-{run}.sock")
                    with open(os.path.join(scratch, f"{kind}-{run}.log"), "wb") as log:
                        procs.append(start(kind, root, sock, env, log))
                    envs[kind] = dict(env, NIX_REMOTE=f"unix://{sock}?root={root}")
                pair = Pair(envs if run % 2 == 0 else dict(reversed(envs.items())))
                session(pair, files)
            finally:
                for proc in procs:
                    stop(proc)
            if pair.mismatches:
                print(f"MISMATCH: {pair.mismatches[0]}", file=sys.stderr)
                return 1
            for kind in kinds:
                times = pair.times[kind]
                totals[kind].append(sum(times.values()))
                for p in PHASES:
                    phases[kind][p].append(times[p])
                detail = "  ".join(f"{p} {times[p]:.2f}" for p in PHASES)
                print(f"run {run + 1} {kind:11}: {totals[kind][-1]:6.2f}s   ({detail})", flush=True)
        med = {k: statistics.median(v) for k, v in totals.items()}
        for p in PHASES:
            a, b = (statistics.median(phases[k][p]) for k in kinds)
            print(f"  {p:10} median storekeeper {a:6.2f}s  nix-daemon {b:6.2f}s  ratio {a / b:.2f}x")
        print(f"same answers to all {pair.count} commands")
        print(f"median storekeeper {med['storekeeper']:.2f}s, nix-daemon {med['nix-daemon']:.2f}s, "
              f"ratio {med['storekeeper'] / med['nix-daemon']:.2f}x (target <= 1.2x)")
        return 0
    finally:
        remove_scratch(scratch)


if __name__ == "__main__":
    sys.exit(main())
