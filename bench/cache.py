#!/usr/bin/env python3
"""Binary caches: `storekeeper copy` against `nix copy`, same closure, same run.

Makes a closure of ``--paths`` paths (``--mib`` MiB in all, half random, half
repetitive text, so compressors have work) plus one text path referring to all
of them, in a chroot store of ours under a temp dir; puts the same closure in a
Nix chroot store (``nix copy --from`` our own cache, so both stores hold the
very same paths).  Then, for each ``--compression`` and ``--rounds`` times,
interleaved (the order turns every round):

  * ``storekeeper copy --to file://…?compression=C``  vs  ``nix copy --to file://…?compression=C``
  * ``storekeeper copy --from file://…``               vs  ``nix copy --from file://…``
    (into empty chroot stores; the cache of that round's `--to`, each tool its own)

Prints the median wall times, the ratios (target <= 1.0), sizes, and the load
average before and after (a shared machine's busy minute shows there).  Nothing
touches /nix: every Nix command runs with --store and an isolated NIX_CONF_DIR.

    python3 bench/cache.py --paths 2000 --mib 1024 --compression xz zstd
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import isolated_nix_env, rmtree

from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore


def make_closure(root: str, scratch: str, paths: int, mib: int) -> str:
    store = LocalStore(LocalLayout.chroot(root))
    rnd = random.Random(42)
    per = max(1, (mib << 20) // paths)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"store", b"nix"]
    made = []
    src = os.path.join(scratch, "src")
    for i in range(paths):
        d = os.path.join(src, f"p{i}")
        os.makedirs(d)
        with open(os.path.join(d, "random"), "wb") as f:
            f.write(rnd.randbytes(per // 2))
        with open(os.path.join(d, "text"), "wb") as f:
            f.write(b" ".join(rnd.choice(words) for _ in range(per // 2 // 5)))
        made.append(store.add_path(d, name=f"bench-{i}").path)
        shutil.rmtree(d)
    top = store.add_text("bench-top", " ".join(store.print_path(p) for p in made).encode(), made)
    out = store.print_path(top.path)
    store.close()
    return out


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr.decode()}")
    return time.monotonic() - t


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", type=int, default=300)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--compression", nargs="+", default=["xz", "zstd"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="sk-bench-cache-")
    env = isolated_nix_env(scratch)
    sk = [os.path.join(os.path.dirname(sys.executable), "storekeeper")]
    nix = ["nix", "--extra-experimental-features", "nix-command"]
    try:
        ours = os.path.join(scratch, "ours")
        top = make_closure(ours, scratch, args.paths, args.mib)
        seed = os.path.join(scratch, "seed")
        timed(sk + ["--store", ours, "copy", "-q", "--to", f"file://{seed}?compression=none", top], env)
        theirs = os.path.join(scratch, "theirs")
        timed(nix + ["copy", "--from", f"file://{seed}", "--to", theirs, top], env)
        print(f"closure: {args.paths + 1} paths, {du(seed) / 2**20:.0f} MiB of NAR; "
              f"load {os.getloadavg()[0]:.1f}")
        for comp in args.compression:
            times: dict[str, list[float]] = {k: [] for k in ("sk-to", "nix-to", "sk-from", "nix-from")}
            sizes = {}
            for rnd in range(args.rounds):
                base = os.path.join(scratch, f"{comp}-{rnd}")
                runs = {
                    "sk-to": sk + ["--store", ours, "copy", "-q", "--to",
                                   f"file://{base}-sk?compression={comp}", top],
                    "nix-to": nix + ["--store", theirs, "copy", "--to",
                                     f"file://{base}-nix?compression={comp}", top],
                }
                order = list(runs) if rnd % 2 == 0 else list(reversed(runs))
                for k in order:
                    times[k].append(timed(runs[k], env))
                sizes = {"sk": du(f"{base}-sk"), "nix": du(f"{base}-nix")}
                froms = {
                    "sk-from": sk + ["--store", f"{base}-skstore", "copy", "-q", "--no-check-sigs",
                                     "--from", f"file://{base}-sk", top],
                    "nix-from": nix + ["copy", "--no-check-sigs", "--from", f"file://{base}-nix",
                                       "--to", f"{base}-nixstore", top],
                }
                for k in (list(froms) if rnd % 2 == 0 else list(reversed(froms))):
                    times[k].append(timed(froms[k], env))
                for d in (f"{base}-sk", f"{base}-nix", f"{base}-skstore", f"{base}-nixstore"):
                    rmtree(d)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{comp:5} copy --to:   storekeeper {med['sk-to']:7.2f} s  nix {med['nix-to']:7.2f} s"
                  f"  ratio {med['sk-to'] / med['nix-to']:.2f}  (cache {sizes['sk'] / 2**20:.1f} vs "
                  f"{sizes['nix'] / 2**20:.1f} MiB)")
            print(f"{comp:5} copy --from: storekeeper {med['sk-from']:7.2f} s  nix {med['nix-from']:7.2f} s"
                  f"  ratio {med['sk-from'] / med['nix-from']:.2f}")
        print(f"load after: {os.getloadavg()[0]:.1f}")
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            rmtree(scratch)


if __name__ == "__main__":
    main()
