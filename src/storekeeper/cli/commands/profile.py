"""``profile list|delete-generations|rollback|switch``: a profile's generations, with the same
effect on disk as ``nix-env --list-generations``, ``--delete-generations``, ``--rollback`` and
``--switch-generation`` (see :mod:`storekeeper.store.generations`)."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
import time
from typing import TYPE_CHECKING

from ..common import UsageError, local_of

if TYPE_CHECKING:
    from ..common import Store


def default_profile(store: Store) -> str:
    """Nix's default: where ``~/.nix-profile`` points, else root's ``profiles/default`` or
    the user's ``profiles/per-user/<name>/profile`` (nothing is created).  Through a daemon
    the state dir is this machine's (``NIX_STATE_DIR`` or /nix/var/nix), as for nix-env:
    profiles are symlinks the client reads and changes itself."""
    try:
        return os.path.join(os.path.expanduser("~"), os.readlink(os.path.expanduser("~/.nix-profile")))
    except OSError:
        pass
    local = local_of(store)
    if local is not None:
        state = local.state_dir
    else:
        from ...formats.url import DEFAULT_STATE_DIR
        state = os.environ.get("NIX_STATE_DIR") or DEFAULT_STATE_DIR
    if os.getuid() == 0:
        return os.path.join(state, "profiles", "default")
    return os.path.join(state, "profiles", "per-user", pwd.getpwuid(os.getuid()).pw_name, "profile")


def _profile(store: Store, args: argparse.Namespace) -> str:
    return os.path.abspath(args.profile) if args.profile else default_profile(store)


def selection(args: argparse.Namespace):
    """The deletion asked for by --older-than / --keep / IDs (exactly one)."""
    from ...store.generations import Selection, parse_age
    given = [x for x in (args.older_than, args.keep, args.ids or None) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --older-than AGE, --keep N, generation numbers, "
                         "'old', '+N' or 'Nd'")
    if args.older_than is not None:
        return Selection.older_than(parse_age(args.older_than))
    if args.keep is not None:
        return Selection.keep_last(args.keep)
    return Selection.parse(args.ids)


def cmd_list(store: Store, args: argparse.Namespace) -> int:
    from ...store.generations import generations
    gens, current = generations(_profile(store, args))
    if args.json:
        json.dump([g.to_json(current) for g in gens], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    for g in gens:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g.created))
        print(f"{g.number:4}   {when}   {'(current)' if g.number == current else ''}")
    return 0


def cmd_delete_generations(store: Store, args: argparse.Namespace) -> int:
    from ...store.generations import delete_generations
    profile = _profile(store, args)
    for g in delete_generations(profile, selection(args), dry_run=args.dry_run):
        verb = "would remove" if args.dry_run else "removing"
        print(f"{verb} profile version {g.number}", file=sys.stderr)
    return 0


def cmd_rollback(store: Store, args: argparse.Namespace) -> int:
    from ...store.generations import switch
    before, after = switch(_profile(store, args), None)
    print(f"switching profile from version {before} to {after}", file=sys.stderr)
    return 0


def cmd_switch(store: Store, args: argparse.Namespace) -> int:
    from ...store.generations import switch
    before, after = switch(_profile(store, args), args.number)
    print(f"switching profile from version {before} to {after}", file=sys.stderr)
    return 0
