#!/usr/bin/env python3
"""`storekeeper serve` under load: narinfo requests/s and NAR MB/s with N concurrent
clients (threads doing keep-alive HTTP/1.1 GETs), p50/p99 latency.

Makes a chroot store in a temp dir with our store API (PATHS small text paths and
one BIG-MiB path; never the machine's /nix), starts `storekeeper serve` on a free
loopback port, and runs for SECONDS each phase:

    python3 bench/serve.py [--clients 8] [--paths 500] [--big 64] [--seconds 5]
        [--compression none|xz|zstd] [--sign]

Compare with real Nix's own HTTP reading: none here (Nix 2.8 has no server).
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from storekeeper.formats.signatures import SecretKey
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore


def start(root: str, args: list[str], log: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "storekeeper.cli.main", "--store", root, "serve",
                             "--listen", "127.0.0.1:0", *args],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    for _ in range(150):
        text = open(log).read()
        if "serving" in text:
            return proc, int(text.split("http://127.0.0.1:")[1].split()[0])
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("storekeeper serve did not start")


def load(port: int, keys: list[str], clients: int, seconds: float) -> tuple[list[float], int, float]:
    """Latencies, bytes received and the wall time (requests started before the end
    run to completion, so it can exceed ``seconds``)."""
    t0 = time.monotonic()
    lat: list[float] = []
    total = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: list[float] = []
        n = 0
        j = i
        while time.monotonic() < stop:
            t = time.perf_counter()
            conn.request("GET", "/" + keys[j % len(keys)])
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200, r.status
            mine.append(time.perf_counter() - t)
            n += len(body)
            j += clients
        conn.close()
        with lock:
            lat.extend(mine)
            total[0] += n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, total[0], time.monotonic() - t0


def report(what: str, lat: list[float], nbytes: int, seconds: float) -> None:
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"{what}: {len(lat)} requests in {seconds:.1f} s: {len(lat) / seconds:.0f} req/s, {nbytes / seconds / 2**20:.1f} MB/s, "
          f"p50 {statistics.median(lat) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--paths", type=int, default=500)
    ap.add_argument("--big", type=int, default=64, help="MiB of the big path")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--compression", default="none")
    ap.add_argument("--sign", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sk-bench-serve-") as tmp:
        root = os.path.join(tmp, "root")
        with LocalStore(LocalLayout.chroot(root)) as store:
            paths = [store.add_text(f"p{i}.txt", f"path {i}\n".encode()).path
                     for i in range(a.paths)]
            big = os.path.join(tmp, "big")
            with open(big, "wb") as f:
                f.write(os.urandom(a.big << 20))
            bigp = store.add_path(big, "big")
            big_info = store.path_info(bigp.path if hasattr(bigp, "path") else bigp)
        extra = ["--compression", a.compression]
        if a.sign:
            with open(os.path.join(tmp, "sk"), "w") as f:
                f.write(SecretKey.generate("bench-1").render())
            extra += ["--sign-key", os.path.join(tmp, "sk")]
        proc, port = start(root, extra, os.path.join(tmp, "log"))
        try:
            keys = [p.hash_part + ".narinfo" for p in paths]
            lat, n, wall = load(port, keys, a.clients, a.seconds)
            report(f"narinfo ({a.clients} clients{', signed' if a.sign else ''})", lat, n, wall)
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("GET", f"/{big_info.path.hash_part}.narinfo")
            url = [line.split(": ", 1)[1] for line in conn.getresponse().read().decode().splitlines()
                   if line.startswith("URL: ")][0]
            lat, n, wall = load(port, [url], a.clients, a.seconds)
            report(f"NAR {a.big} MiB ({a.compression}, {a.clients} clients)", lat, n, wall)
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
