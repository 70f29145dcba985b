#!/usr/bin/env python3
"""Substitution of one closure through our daemon vs through nix-daemon, from the same
file:// cache (and, with ``--http``, the same cache served over loopback by
``python -m http.server``), same run, interleaved rounds.

Makes ``--paths`` text paths (``--mib`` MiB in all, half random) plus one path
referring to all of them in a chroot store of ours under a temp dir, writes them to
a cache with real ``nix copy --to file://…?compression=C``, then each round starts
both daemons on empty chroot stores and times ``nix-store -r TOP --option
substituters URL`` through each.  Both run with ``max-jobs = 1`` (Nix's default: one
substitution at a time).  Nothing touches /nix.

    python3 bench/substitute.py --paths 500 --mib 256 --compression zstd --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import isolated_nix_env, rmtree

from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from daemon_util import start_daemon, stop_process  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=300)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--compression", default="zstd")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--http", action="store_true", help="also over http:// (python -m http.server)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sk-bench-subst-") as tmp:
        env = isolated_nix_env(tmp)
        src = os.path.join(tmp, "src")
        size = (a.mib << 20) // a.paths
        with LocalStore(LocalLayout.chroot(src)) as store:
            paths = []
            for i in range(a.paths):
                body = os.urandom(size // 4).hex().encode() if i % 2 else (b"text %d\n" % i) * (size // 8)
                paths.append(store.add_text(f"p{i}", body[:size]).path)
            top = store.add_text("top", " ".join(store.print_path(p) for p in paths).encode(),
                                 paths).path
            top_s = store.print_path(top)
        cache = os.path.join(tmp, "cache")
        t = time.monotonic()
        subprocess.run(["nix", "--extra-experimental-features", "nix-command", "copy", "--store", src,
                        "--to", f"file://{cache}?compression={a.compression}", top_s], env=env,
                       check=True, capture_output=True)
        print(f"cache: {a.paths + 1} paths, {a.mib} MiB, {a.compression} "
              f"(nix copy --to: {time.monotonic() - t:.1f} s)")
        urls = {"file": f"file://{cache}"}
        server = None
        if a.http:
            server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1",
                                       "--directory", cache], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
            line = server.stdout.readline() if server.stdout else ""
            urls["http"] = f"http://127.0.0.1:{line.split('port ')[1].split()[0]}"
        times: dict[tuple[str, str], list[float]] = {}
        try:
            for rnd in range(a.rounds):
                for scheme, url in urls.items():
                    kinds = ["ours", "nix"] if rnd % 2 == 0 else ["nix", "ours"]
                    for kind in kinds:
                        root, sock = os.path.join(tmp, f"{kind}-root"), os.path.join(tmp, f"{kind}.sock")
                        renv = dict(env, XDG_CACHE_HOME=os.path.join(tmp, f"xdg-{kind}-{rnd}-{scheme}"))
                        proc = start_daemon(kind, root, sock, renv)
                        try:
                            t = time.monotonic()
                            subprocess.run(["nix-store", "--store", f"unix://{sock}", "-r", top_s,
                                            "--option", "substituters", url], env=renv, check=True,
                                           capture_output=True)
                            times.setdefault((scheme, kind), []).append(time.monotonic() - t)
                        finally:
                            stop_process(proc)
                            rmtree(root)
        finally:
            if server is not None:
                server.terminate()
                server.wait()
        for scheme in urls:
            ours = statistics.median(times[scheme, "ours"])
            nix = statistics.median(times[scheme, "nix"])
            print(f"{scheme}: ours {ours:.2f} s, nix-daemon {nix:.2f} s, ratio {ours / nix:.2f} "
                  f"(median of {a.rounds})")
        print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
