"""Garbage collection: ``gc``, ``delete`` (``why-alive``: :mod:`.why`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from ..common import UsageError, daemon_of, is_local, local_of, needs_local, resolve_path

if TYPE_CHECKING:
    from ...api import GCDryRun
    from ..common import Store


def cmd_gc(store: Store, args: argparse.Namespace) -> int:
    from ...api import DEAD, DELETE_DEAD, LIVE, GCOptions
    action = LIVE if args.print_live else DEAD if (args.print_dead or args.dry_run) else DELETE_DEAD
    local = local_of(store)
    if local is not None:
        cfg = local.settings
    elif args.keep_outputs or args.no_keep_derivations:
        raise UsageError("through a daemon, keep-outputs and keep-derivations are the daemon's "
                         "settings (its nix.conf)")
    else:
        from ...store.settings import StoreSettings
        cfg = StoreSettings()  # not sent: the daemon applies its own
    opts = GCOptions(action=action, max_freed=args.max_freed if args.max_freed is not None else 2**64 - 1,
                     keep_outputs=args.keep_outputs or cfg.keep_outputs,
                     keep_derivations=cfg.keep_derivations and not args.no_keep_derivations)
    _policy_flags(store, args)
    if args.delete_generations or args.delete_older_than:
        _delete_generations(store, args)
    if action == DELETE_DEAD and not is_local(store) and not args.no_sync_roots:
        from .roots import before_gc
        before_gc(args.store, args.skip_step or ())
    from ..progress import Progress
    bar = Progress("deleting garbage")
    quiet = args.json or bar.enabled  # on a terminal the bar replaces the per-path lines

    def log(message: str) -> None:
        if not (quiet and message.startswith("deleting '")) and not args.json:
            bar.log(message)
    try:
        if args.dry_run:
            dry = _dry_run(store, opts, log, bar.update)
        else:
            result = store.collect_garbage(opts, log, bar.update)
    finally:
        bar.close()
    if args.dry_run:
        if local is not None:
            from .policy import print_policy_plan
            print_policy_plan(local)
        return _print_dry_run(dry, args.json)
    if args.json:
        json.dump({"action": action, "paths": result.paths, "bytesFreed": result.bytes_freed}, sys.stdout)
        sys.stdout.write("\n")
    elif action in (LIVE, DEAD):
        if result.paths:
            sys.stdout.write("\n".join(result.paths) + "\n")
    else:
        print(f"{len(result.paths)} store paths deleted, {result.bytes_freed / 2**20:.2f} MiB freed")
    return 0


#: gc's policy flags and the settings they override
POLICY_FLAGS = ("keep_generations", "delete_generations_older_than", "root_ttl", "user_quota",
                "keep_recently_used")


def _policy_flags(store: Store, args: argparse.Namespace) -> None:
    pairs = [(f.replace("_", "-"), getattr(args, f)) for f in POLICY_FLAGS
             if getattr(args, f, None) is not None]
    if not pairs:
        return
    local = needs_local(store, "gc with policy flags (a daemon applies its own nix.conf)")
    local.settings = local.settings.with_settings(pairs)


def _delete_generations(store: Store, args: argparse.Namespace) -> None:
    """nix-collect-garbage's first step: old generations of every profile under the state
    dir's ``profiles`` (those this user may write)."""
    from ...store.generations import Selection, delete_all_generations
    from .profile import selection
    local = needs_local(store, "gc --delete-generations")
    if args.delete_generations and args.delete_older_than:
        raise UsageError("give --delete-generations or --delete-older-than, not both")
    if args.delete_older_than:
        sel = selection(argparse.Namespace(older_than=args.delete_older_than, keep=None, ids=None))
    else:
        sel = Selection.parse([args.delete_generations])
    dry = args.dry_run or args.print_dead or args.print_live
    for profile, gens in delete_all_generations(os.path.join(local.state_dir, "profiles"), sel,
                                                dry_run=dry):
        print(f"removing old generations of profile {profile}", file=sys.stderr)
        for g in gens:
            print(f"{'would remove' if dry else 'removing'} profile version {g.number}",
                  file=sys.stderr)


def _dry_run(store: Store, opts, log, progress) -> GCDryRun:
    """What a GC would delete and free, measured where the files are: here, or by
    storekeeper's daemon (GCDryRun; the real nix-daemon cannot)."""
    local = local_of(store)
    if local is not None:
        from ...store.gc.inspect import gc_dry_run
        return gc_dry_run(local, opts, log, progress)
    daemon = daemon_of(store)
    assert daemon is not None
    return daemon.gc_dry_run(log)


def _print_dry_run(result: GCDryRun, as_json: bool) -> int:
    if as_json:
        json.dump(result.to_json(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    if result.paths:
        sys.stdout.write("\n".join(result.paths) + "\n")
    disk, apparent = result.bytes_freed, result.apparent_bytes_freed
    print(f"would delete {len(result.paths)} store paths, freeing {disk} bytes "
          f"({disk / 2**20:.2f} MiB on disk, {apparent / 2**20:.2f} MiB of file contents)",
          file=sys.stderr)
    return 0


def cmd_delete(store: Store, args: argparse.Namespace) -> int:
    from ...api import DELETE_SPECIFIC, GCOptions
    paths = frozenset(resolve_path(store, a) for a in args.paths)
    result = store.collect_garbage(GCOptions(action=DELETE_SPECIFIC, paths=paths,
                                             ignore_liveness=args.ignore_liveness),
                                   lambda m: print(m, file=sys.stderr))
    print(f"{len(result.paths)} store paths deleted, {result.bytes_freed / 2**20:.2f} MiB freed")
    return 0


