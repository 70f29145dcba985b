#!/usr/bin/env python3
"""``storekeeper verify --sigs`` vs ``nix store verify --all --no-contents`` on one store,
same run, interleaved rounds.

Makes a chroot store (under a temp dir) of ``--paths`` small input-addressed paths,
each referring to the one before it: a third signed by the trusted key, a third by
another key, a third unsigned; then each round times both commands with that
trusted key and checks they name the same untrusted paths.  Nothing touches /nix.

    python3 bench/verify_sigs.py --paths 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from _nixenv import isolated_nix_env, rmtree

from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import dump_string
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.signatures import SecretKey, sign_info
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore
from storekeeper.store.settings import StoreSettings


def make_store(root: str, n: int, trusted: SecretKey, other: SecretKey) -> None:
    settings = StoreSettings().with_settings([("fsync-store-paths", "false")])
    with LocalStore(LocalLayout.chroot(root), settings=settings) as store:
        sd = store.store_dir
        prev = None
        for i in range(n):
            nar = dump_string(f"path {i}\n".encode())
            sp = sd.make_output_path("out", Hash.of("sha256", str(i).encode()).digest, f"p{i}")
            info = ValidPathInfo(sp, Hash.of("sha256", nar), len(nar),
                                 frozenset({prev} if prev else ()))
            key = (trusted, other, None)[i % 3]
            if key is not None:
                info = info.with_(sigs=frozenset({sign_info(sd, info, key)}))
            store.add_nar(info, io.BytesIO(nar), check_sigs=False)
            prev = sp


def untrusted(stderr: str) -> list[str]:
    return sorted(re.findall(r"^path '([^']*)' is untrusted$", stderr, re.M))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="sk-bench-verify-")
    try:
        env = isolated_nix_env(scratch)
        trusted, other = SecretKey.generate("bench-1"), SecretKey.generate("other-1")
        root = os.path.join(scratch, "root")
        t0 = time.monotonic()
        make_store(root, args.paths, trusted, other)
        print(f"store of {args.paths} paths made in {time.monotonic() - t0:.1f} s", flush=True)
        key = trusted.public().render()
        cmds = {
            "ours": [sys.executable, "-m", "storekeeper.cli.main", "--store", root, "verify",
                     "--sigs", "--trusted-public-keys", key],
            "nix": ["nix", "--extra-experimental-features", "nix-command", "store", "verify",
                    "--store", root, "--all", "--no-contents", "--trusted-public-keys", key],
        }
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for r in range(args.rounds):
            found = {}
            for kind, cmd in cmds.items():
                t = time.monotonic()
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                times[kind].append(time.monotonic() - t)
                found[kind] = (p.returncode, untrusted(p.stderr))
            if found["ours"] != found["nix"]:
                sys.exit(f"round {r}: the untrusted paths differ: {found}")
            print(f"round {r}: ours {times['ours'][-1]:.2f} s, nix {times['nix'][-1]:.2f} s, "
                  f"{len(found['ours'][1])} untrusted, exit {found['ours'][0]}", flush=True)
        mo, mn = statistics.median(times["ours"]), statistics.median(times["nix"])
        print(f"median of {args.rounds}: ours {mo:.2f} s, nix {mn:.2f} s = {mo / mn:.2f}x")
    finally:
        rmtree(scratch)


if __name__ == "__main__":
    main()
