"""Hard-linking identical files (store.optimise): ``optimise``, ``stats``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..common import UsageError, daemon_of, local_of, needs_local

if TYPE_CHECKING:
    from ..common import Store


def cmd_optimise(store: Store, args: argparse.Namespace) -> int:
    from ...store.optimise import optimise_store
    daemon = daemon_of(store)
    if daemon is not None:
        given = [o for o, on in (("--dry-run", args.dry_run), ("--json", args.json),
                                 ("--trust-link-count", args.trust_link_count),
                                 ("--jobs", args.jobs is not None)) if on]
        if given:
            raise UsageError(f"optimise {' '.join(given)} needs a local store: a daemon's "
                             "OptimiseStore takes no options (run it against the store itself)")
        daemon.optimise(lambda m: print(m, file=sys.stderr))  # (the daemon's own summary)
        return 0
    local = needs_local(store, "optimise")
    log = None if args.json else (lambda m: print(m, file=sys.stderr))
    stats = optimise_store(local, dry_run=args.dry_run, trust_link_count=args.trust_link_count, log=log,
                           processes=args.jobs)
    if args.json:
        json.dump(stats.to_json(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(stats.summary())
    if stats.pool_dir_growth:
        print(f"the .links directory grew by {stats.pool_dir_growth / 2**20:.2f} MiB: "
              f"{stats.net_bytes_freed / 2**20:.2f} MiB freed net", file=sys.stderr)
    print(f"{stats.files_already_linked} files already linked, {stats.new_pool_entries} new pool "
          f"entries, {stats.emlink} kept at the link limit (EMLINK)"
          + (f", {stats.corrupt_links_removed} corrupt pool entries "
             f"{'found' if args.dry_run else 'removed'}" if stats.corrupt_links_removed else ""),
          file=sys.stderr)
    return 0


def cmd_stats(store: Store, args: argparse.Namespace) -> int:
    local = local_of(store)
    if local is not None:
        from ...store.optimise import pool_stats
        ps = pool_stats(local)
    else:  # (storekeeper's daemon measures its pool; the real nix-daemon cannot)
        daemon = daemon_of(store)
        assert daemon is not None
        ps = daemon.store_stats()
    if args.json:
        json.dump(ps.to_json(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"distinct contents:  {ps.distinct_contents}")
    print(f"total references:   {ps.total_references}")
    print(f"unused pool entries: {ps.unused_entries}")
    print(f"bytes saved:        {ps.bytes_saved} ({ps.bytes_saved / 2**20:.2f} MiB on disk, "
          f"{ps.apparent_bytes_saved / 2**20:.2f} MiB of file contents)")
    return 0

