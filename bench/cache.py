#!/usr/bin/env python3
"""Binary caches against Nix 2.8, one run, one closure (issue 17's "Must show").

Makes a closure of ``--paths`` paths (``--mib`` MiB in all; each path one file of
random bytes and one of repetitive text, so the codecs do real work) plus one text
path referring to all of them, in a chroot store of ours under a temp dir, and
the very same paths in a Nix chroot store (``nix copy --from`` our uncompressed
cache).  Then, for each ``--compression``, ``--rounds`` times, each pair
interleaved (the order turns every round):

  * ``storekeeper copy --to file://…?compression=C``  vs  ``nix copy --to file://…?compression=C``
  * ``storekeeper copy --from file://…``               vs  ``nix copy --from file://…``
    (into empty chroot stores; each tool reads the cache it wrote)
  * substitution of the closure (``nix-store -r TOP --option substituters URL``)
    through our daemon vs through nix-daemon 2.8, each on an empty chroot store,
    from the same cache (the one ``nix copy --to`` wrote), as ``file://`` and as
    ``http://`` served by a real server on loopback (Python's threading
    ``http.server`` speaking HTTP/1.1, so keep-alive works);

and at the end ``storekeeper serve`` on our store: narinfo requests/s and NAR MB/s
with ``--clients`` concurrent keep-alive clients, p50/p99 latency.

Both daemons run with their defaults: nix-daemon 2.8 substitutes ``max-jobs`` (1)
paths at a time; ours ``max-substitution-jobs`` (Nix's later setting; see
RESULTS.md).  Prints medians, ratios (target <= 1.0) and the load average before
and after.  Nothing touches /nix: every Nix command runs with --store and an
isolated NIX_CONF_DIR.

    python3 bench/cache.py                                  # 2000 paths, 1 GiB
    python3 bench/cache.py --paths 300 --mib 64 --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import isolated_nix_env, rmtree
from serve import load, report, start

from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from daemon_util import start_daemon, stop_process  # noqa: E402

WORDS = [b"alpha", b"beta", b"gamma", b"delta", b"store", b"nix", b"cache", b"zeta"]


def make_closure(root: str, scratch: str, paths: int, mib: int) -> str:
    store = LocalStore(LocalLayout.chroot(root))
    rnd = random.Random(42)
    per = max(16, (mib << 20) // paths)
    made = []
    src = os.path.join(scratch, "src")
    for i in range(paths):
        d = os.path.join(src, f"p{i}")
        os.makedirs(d)
        with open(os.path.join(d, "random"), "wb") as f:
            f.write(rnd.randbytes(per // 2))
        text = b" ".join(rnd.choices(WORDS, k=per // 2 // 5 + 1))
        with open(os.path.join(d, "text"), "wb") as f:
            f.write(text[:per // 2])
        made.append(store.add_path(d, name=f"bench-{i}").path)
        shutil.rmtree(d)
    top = store.add_text("bench-top", " ".join(store.print_path(p) for p in made).encode(), made)
    out = store.print_path(top.path)
    store.close()
    return out


def timed(cmd: list[str], env: dict[str, str]) -> float:
    # Every timed command starts with nothing dirty in the page cache: otherwise the
    # one that runs right after a copy --to pays for writing back the ~1.2 GB the two
    # tools' caches left dirty (ours fsyncs what it stores, and an fsync waits behind
    # that writeback; Nix 2.8 syncs nothing and never waits), and which tool that is
    # alternates by round.
    os.sync()
    t = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr.decode()[-4000:]}")
    return time.monotonic() - t


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def http_server(directory: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1",
                             "--protocol", "HTTP/1.1", "--directory", directory],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    return proc, f"http://127.0.0.1:{line.split('port ')[1].split()[0]}"


def substitute(kind: str, url: str, top: str, scratch: str, env: dict[str, str], tag: str) -> float:
    """Seconds for ``nix-store -r TOP`` through a fresh daemon of ``kind`` on an empty store
    (a cold narinfo disk cache each time)."""
    root, sock = os.path.join(scratch, f"{kind}-root"), os.path.join(scratch, f"{kind}.sock")
    renv = dict(env, XDG_CACHE_HOME=os.path.join(scratch, f"xdg-{kind}-{tag}"))
    proc = start_daemon(kind, root, sock, renv)
    try:
        return timed(["nix-store", "--store", f"unix://{sock}", "-r", top,
                      "--option", "substituters", url], renv)
    finally:
        stop_process(proc)
        rmtree(root)
        rmtree(renv["XDG_CACHE_HOME"])


def serve_bench(root: str, top: str, clients: int, seconds: float, scratch: str) -> None:
    proc, port = start(root, ["--compression", "none"], os.path.join(scratch, "serve.log"))
    try:
        with LocalStore(LocalLayout.chroot(root)) as store:
            paths = sorted(store.query_closure([store.store_dir.parse(top)]))
        keys = [p.hash_part + ".narinfo" for p in paths]
        lat, n, wall = load(port, keys, clients, seconds)
        report(f"serve narinfo ({clients} clients, {len(keys)} paths)", lat, n, wall)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        urls = []
        for k in keys[:200]:
            conn.request("GET", "/" + k)
            text = conn.getresponse().read().decode()
            urls += [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("URL: ")]
        conn.close()
        lat, n, wall = load(port, urls, clients, seconds)
        report(f"serve NAR ({clients} clients, {len(urls)} NARs, uncompressed)", lat, n, wall)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--compression", nargs="+", default=["xz", "zstd"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-copy-from", action="store_true", help="skip the copy --from pair")
    ap.add_argument("--no-substitute", action="store_true", help="skip the daemon substitution")
    ap.add_argument("--clients", type=int, default=8, help="serve: concurrent clients")
    ap.add_argument("--serve-seconds", type=float, default=5.0, help="serve: seconds per phase (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="sk-bench-cache-")
    env = isolated_nix_env(scratch)
    sk = [os.path.join(os.path.dirname(sys.executable), "storekeeper")]
    nix = ["nix", "--extra-experimental-features", "nix-command"]
    load0 = os.getloadavg()
    results: list[tuple[str, float, float]] = []
    try:
        ours = os.path.join(scratch, "ours")
        t = time.monotonic()
        top = make_closure(ours, scratch, args.paths, args.mib)
        seed = os.path.join(scratch, "seed")
        timed(sk + ["--store", ours, "copy", "-q", "--to", f"file://{seed}?compression=none", top], env)
        theirs = os.path.join(scratch, "theirs")
        timed(nix + ["copy", "--from", f"file://{seed}", "--to", theirs, top], env)
        nar_mib = du(seed) / 2**20
        rmtree(seed)
        print(f"closure: {args.paths + 1} paths, {nar_mib:.0f} MiB of NAR (made in "
              f"{time.monotonic() - t:.0f} s); load {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}",
              flush=True)
        for comp in args.compression:
            times: dict[str, list[float]] = {}
            sizes = {}
            for rnd in range(args.rounds):
                flip = rnd % 2 == 1

                def pair(what: str, runs: dict[str, list[str]], flip: bool = flip,
                         times: dict[str, list[float]] = times) -> None:
                    for k in (reversed(list(runs)) if flip else list(runs)):
                        times.setdefault(f"{what} {k}", []).append(timed(runs[k], env))

                base = os.path.join(scratch, f"{comp}-{rnd}")
                pair("copy --to", {
                    "ours": sk + ["--store", ours, "copy", "-q", "--to",
                                  f"file://{base}-sk?compression={comp}", top],
                    "nix": nix + ["--store", theirs, "copy", "--to",
                                  f"file://{base}-nix?compression={comp}", top]})
                sizes = {"sk": du(f"{base}-sk"), "nix": du(f"{base}-nix")}
                if not args.no_copy_from:
                    pair("copy --from", {
                        "ours": sk + ["--store", f"{base}-skstore", "copy", "-q", "--no-check-sigs",
                                      "--from", f"file://{base}-sk", top],
                        "nix": nix + ["copy", "--no-check-sigs", "--from", f"file://{base}-nix",
                                      "--to", f"{base}-nixstore", top]})
                    rmtree(f"{base}-skstore")
                    rmtree(f"{base}-nixstore")
                if not args.no_substitute:
                    server, http_url = http_server(f"{base}-nix")
                    try:
                        for scheme, url in (("file://", f"file://{base}-nix"), ("http://", http_url)):
                            for kind in (["nix", "ours"] if flip else ["ours", "nix"]):
                                times.setdefault(f"substitute {scheme} {kind}", []).append(
                                    substitute(kind, url, top, scratch, env, f"{comp}{rnd}{scheme[:4]}"))
                    finally:
                        server.terminate()
                        server.wait()
                rmtree(f"{base}-sk")
                rmtree(f"{base}-nix")
                print(f"  {comp} round {rnd + 1}: " + ", ".join(
                    f"{k} {v[-1]:.1f}" for k, v in times.items()) + f" s; load {os.getloadavg()[0]:.1f}",
                    flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{comp} (cache {sizes['sk'] / 2**20:.0f} MiB ours, {sizes['nix'] / 2**20:.0f} MiB Nix; "
                  f"medians of {args.rounds}):")
            for what in ("copy --to", "copy --from", "substitute file://", "substitute http://"):
                if f"{what} ours" in med:
                    o, n = med[f"{what} ours"], med[f"{what} nix"]
                    results.append((f"{comp} {what}", o, n))
                    print(f"  {what:20} storekeeper {o:7.2f} s  nix {n:7.2f} s  ratio {o / n:.2f}",
                          flush=True)
        if args.serve_seconds > 0:
            serve_bench(ours, top, args.clients, args.serve_seconds, scratch)
        load1 = os.getloadavg()
        print(f"load before {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}, "
              f"after {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f}")
        worst = max((o / n for _, o, n in results), default=0.0)
        print(f"worst ratio {worst:.2f} (target <= 1.0)")
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            rmtree(scratch)


if __name__ == "__main__":
    main()
