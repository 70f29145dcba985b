#!/usr/bin/env python3
"""SIGKILL storekeeper at every crash point it reaches, at many arrivals of each, and check
the store after each kill (tests/crashkit.py): no valid path lost (beyond what the whole
operation deletes) or changed, our ``verify --check-contents`` and real ``nix-store --verify
--check-contents`` pass, a profile still points at a valid generation, and the killed
command then succeeds.

Each scenario (add, add with auto-optimise, gc, gc -d, optimise, build, substitution,
profile rollback) first runs once with ``STOREKEEPER_CRASH_LOG`` to count how often it
reaches each point; then it is killed at ``(point, n)`` for every n up to ``--limit`` (beyond
that: the first ones, spread ones and the last).  tests/test_crash_points.py kills each
``(scenario, point)`` once.

    python3 bench/crashes.py            # about 400 kills, 250 distinct (point, n)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from crashkit import SCENARIOS, Harness, occurrences, remove  # noqa: E402

from storekeeper.fs.crash import POINTS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=20, help="kills per (scenario, point) at most")
    ap.add_argument("--only", action="append", help="only these scenarios")
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="sk-crashes-")
    t0 = time.monotonic()
    kills = failed = 0
    pairs: set[tuple[str, int]] = set()
    reached: set[str] = set()
    try:
        h = Harness(scratch)
        for sc in SCENARIOS:
            if args.only and sc.name not in args.only:
                continue
            h.survey(sc)
            reached |= set(sc.counts)
            n_sc = 0
            for point in sorted(sc.counts):
                for n in occurrences(sc.counts[point], args.limit):
                    problem = h.kill(sc, point, n)
                    kills += 1
                    n_sc += 1
                    pairs.add((point, n))
                    if problem:
                        failed += 1
                        print(f"FAIL {sc.name} {point}:{n}: {problem}", flush=True)
            print(f"{sc.name}: {n_sc} kills at {len(sc.counts)} points "
                  f"({sum(sc.counts.values())} arrivals in a full run)", flush=True)
    finally:
        remove(scratch)
    missing = sorted(set(POINTS) - reached)
    print(f"{kills} kills, {len(pairs)} distinct (point, n), {len(reached)}/{len(POINTS)} points "
          f"reached{' (not: ' + ', '.join(missing) + ')' if missing else ''}; {failed} stores "
          f"failing a check; {time.monotonic() - t0:.0f} s")
    return 1 if failed or missing and not args.only else 0


if __name__ == "__main__":
    sys.exit(main())
