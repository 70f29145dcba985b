#!/usr/bin/env python3
"""Fleet cache GC (issue 18): a collection of a big synthetic cache.

Builds a cache of ``--narinfos`` narinfos (a DAG: each path refers to up to 3 of the
50 paths before it; every ``--share``-th NAR is shared by two narinfos) and ten roots
over random paths, on ``file://`` (default 100k) or on an S3 server started on
loopback (moto, ``--s3``, default 20k).  Then, in a fresh child process per run (so
its peak RSS is the collection's), ``Collector.run()`` with no settle wait and no NAR
grace, timing the mark (LIST + one GET per narinfo) and the sweep, and counting the
requests (S3: every HTTP request boto sends; file: backend calls).  Compared with:

* file://: ``rm`` of exactly the objects the GC deleted (one ``xargs rm`` over a list);
* S3: the fewest requests a plain LIST + DeleteObjects needs for the same keys.

    python3 bench/cache_gc.py --narinfos 100000 --runs 3
    python3 bench/cache_gc.py --s3 --narinfos 20000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from storekeeper.cache import open_cache
from storekeeper.cache.gc import Clock, Collector, Timings, put_root
from storekeeper.formats.hashes import nix32_encode as nix32

#: no settle, no grace: the bench measures the work, not the protocol's waits
FAST = Timings(lease_ttl=0.03, settle=0.011, nar_grace=0.0, temp_grace=86400.0, skew=0.0,
               margin=0.0, sweep_budget=86400.0)


def _hash(rng: random.Random, n: int) -> str:
    return nix32(rng.randbytes(n))


def build(url: str, n: int, share: int, threads: int) -> dict:
    rng = random.Random(18)
    cache = open_cache(url)
    b = cache.backend
    b.put("nix-cache-info", b"StoreDir: /nix/store\n")
    hashes = [_hash(rng, 20) for _ in range(n)]
    items = []
    nar = None
    for i, h in enumerate(hashes):
        refs = sorted({hashes[j] for j in rng.sample(range(max(0, i - 50), i), min(i, rng.randint(0, 3)))})
        if nar is None or i % share:
            nar = f"nar/{_hash(rng, 32)}.nar"
            items.append((nar, rng.randbytes(rng.randint(64, 4096))))
        refs_text = " ".join(f"{r}-p" for r in refs)
        text = (f"StorePath: /nix/store/{h}-p\nURL: {nar}\nCompression: none\n"
                f"FileHash: sha256:{'0' * 52}\nFileSize: 1\nNarHash: sha256:{'0' * 52}\n"
                f"NarSize: 1\nReferences: {refs_text}\n")
        items.append((f"{h}.narinfo", text.encode()))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda kv: b.put(*kv), items))
    for r in range(10):
        put_root(b, f"bench/{r}", [f"{h}-p" for h in rng.sample(hashes, max(1, n // 400))], Clock())
    cache.close()
    return {"objects": len(items) + 11}


def _count_calls(b: object, name: str, requests: dict) -> None:
    inner = getattr(b, name)

    def counted(*args: object, **kw: object) -> object:
        requests["n"] += len(args[0]) if name == "delete_many" else 1  # type: ignore[arg-type]
        return inner(*args, **kw)
    setattr(b, name, counted)


def child(url: str, threads: int) -> None:
    """One collection; prints its figures as JSON."""
    cache = open_cache(url)
    b = cache.backend
    requests = {"n": 0}
    if hasattr(b, "_s3"):  # every HTTP request boto sends
        b._s3.meta.events.register("before-send.s3", lambda **kw: requests.__setitem__("n", requests["n"] + 1))
    else:  # file://: one per get/put/exists, per key deleted, per listing
        for name in ("get", "put", "exists", "delete_many", "list_keys"):
            _count_calls(b, name, requests)
    gc = Collector(b, FAST, threads=threads)
    t0 = time.perf_counter()
    gc.mark()
    t1 = time.perf_counter()
    mark_requests = requests["n"]
    deleted_keys = ([h + ".narinfo" for h in gc.dead] + [h + ".ls" for h in gc.dead if h in gc.listings]
                    + sorted(gc.dead_nars))
    gc.publish()
    gc.reread()  # (no settle wait)
    gc.sweep()
    gc.finish()
    t2 = time.perf_counter()
    r = gc.report
    print(json.dumps({"mark_s": t1 - t0, "sweep_s": t2 - t1, "narinfos": r.narinfos,
                      "live": r.live, "deleted_narinfos": r.narinfos_deleted,
                      "deleted_nars": r.nars_deleted, "bytes": r.bytes_freed,
                      "requests": requests["n"], "mark_requests": mark_requests,
                      "deleted_keys": deleted_keys,
                      "rss_mib": _peak_rss_mib()}))


def _peak_rss_mib() -> float:
    """VmHWM: this program's own peak (ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_child(url: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", url, "--threads", str(threads)],
                         capture_output=True, check=True, text=True, env=os.environ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _moto() -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--narinfos", type=int, default=0)
    ap.add_argument("--s3", action="store_true")
    ap.add_argument("--share", type=int, default=10, help="every Nth NAR is shared by two narinfos")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--child", metavar="URL")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.threads)
        return
    n = a.narinfos or (20000 if a.s3 else 100000)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    print(f"load before: {os.getloadavg()}")
    runs = []
    moto = None
    try:
        if a.s3:
            import boto3  # noqa: PLC0415 -- optional: only for --s3
            moto, port = _moto()
        for i in range(a.runs):
            tmp = tempfile.mkdtemp(prefix="sk-cache-gc-")
            try:
                if a.s3:
                    name = f"bench-{i}-{os.urandom(3).hex()}"
                    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                                 region_name="us-east-1").create_bucket(Bucket=name)
                    url = f"s3://{name}?endpoint=127.0.0.1:{port}&scheme=http&region=us-east-1"
                else:
                    url = f"file://{tmp}/cache"
                t0 = time.perf_counter()
                objects = build(url, n, a.share, 16 if a.s3 else 1)["objects"]
                build_s = time.perf_counter() - t0
                if not a.s3:  # a copy of the cache, for the plain rm of the same objects
                    shutil.copytree(f"{tmp}/cache", f"{tmp}/copy")
                    os.sync()  # a cache at rest: neither side waits for the build's writeback
                res = run_child(url, a.threads)
                keys = res.pop("deleted_keys")
                res["objects"], res["build_s"] = objects, build_s
                if a.s3:
                    res["minimal_requests"] = -(-objects // 1000) + -(-len(keys) // 1000)
                else:
                    listfile = f"{tmp}/dead"
                    with open(listfile, "w") as f:
                        f.write("\n".join(f"{tmp}/copy/{k}" for k in keys))
                    t0 = time.perf_counter()
                    subprocess.run(f"xargs rm < {listfile}", shell=True, check=True)
                    res["rm_s"] = time.perf_counter() - t0
                    left = {os.path.relpath(os.path.join(d, f), f"{tmp}/copy")
                            for d, _, fs in os.walk(f"{tmp}/copy") for f in fs}
                    ours = {os.path.relpath(os.path.join(d, f), f"{tmp}/cache")
                            for d, _, fs in os.walk(f"{tmp}/cache") for f in fs}
                    res["same_result_as_rm"] = not {k for k in left ^ ours if not k.startswith("gc/")}
                print(json.dumps(res))
                runs.append(res)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    med["requests_per_narinfo"] = med["requests"] / med["narinfos"]
    print("median:", json.dumps({k: round(v, 3) for k, v in med.items()}))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
