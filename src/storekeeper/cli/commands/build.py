"""``build``: realise derivations (and other store paths) on a local store, sandboxed where
the settings or the store ask for it, printing their output paths as ``nix-store
--realise`` does.

With ``substituters`` (nix.conf or ``--option``) set, what a cache has is downloaded
instead of built, through the daemon's own code (:class:`~storekeeper.build.Substituters`:
the same priorities, signature checks and falling through to the next cache); a path
that is not a derivation can then be realised too (the ``nix-store -r PATH`` case)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Sequence

from ...build import (
    Builder,
    BuildSettings,
    Missing,
    Substituters,
    SubstituteSettings,
    what_is_missing,
)
from ...config.nixconf import environment_settings
from ...errors import StoreError
from ...formats.wire import DerivedPath, ResultType
from ..common import needs_local, resolve_path, valid

if TYPE_CHECKING:
    from ...store.local import LocalStore
    from ..common import Store


class _StderrLogger:
    """Build log lines and messages to stderr (nothing with ``--quiet``)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self._n = quiet, 0

    def log(self, level: int, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr)

    def start_activity(self, level: int, act_type: int, text: str,
                       fields: Sequence[int | str] = (), parent: int = 0) -> int:
        self._n += 1
        if text and not self.quiet and level <= 3:
            print(text + "...", file=sys.stderr)  # as Nix's plain (non-tty) logger
        return self._n

    def stop_activity(self, act_id: int) -> None:
        pass

    def result(self, act_id: int, result_type: int, fields: Sequence[int | str]) -> None:
        if result_type == ResultType.BUILD_LOG_LINE and not self.quiet:
            print(fields[0], file=sys.stderr)


def _print_missing(store: LocalStore, m: Missing) -> None:
    """What nix-store -r says before it starts (derivations to build, paths to fetch with
    their sizes in MiB, paths nobody knows how to make)."""
    def say(line: str) -> None:
        print(line, file=sys.stderr)
    if m.will_build:
        n = len(m.will_build)
        say("this derivation will be built:" if n == 1 else f"these {n} derivations will be built:")
        for p in reversed(store.topo_sort(m.will_build)):
            say(f"  {store.print_path(p)}")
    if m.will_substitute:
        n = len(m.will_substitute)
        sizes = f"({m.download_size / 2**20:.2f} MiB download, {m.nar_size / 2**20:.2f} MiB unpacked)"
        say(f"this path will be fetched {sizes}:" if n == 1
            else f"these {n} paths will be fetched {sizes}:")
        for p in sorted(m.will_substitute, key=store.print_path):
            say(f"  {store.print_path(p)}")
    if m.unknown:
        say("don't know how to build these paths:")
        for p in sorted(m.unknown, key=store.print_path):
            say(f"  {store.print_path(p)}")


def cmd_build(store: Store, args: argparse.Namespace) -> int:
    local = needs_local(store, "build")
    options = [(n, v) for n, v in args.option]
    settings = BuildSettings.from_nix_conf().with_settings(
        options + ([("keep-failed", "true")] if args.keep_failed else []))
    if options:  # the store's own settings too (secret-key-files, …), as Nix's --option
        local.settings = local.settings.with_settings(options)
    logger = _StderrLogger(args.quiet)
    subs = Substituters(local, SubstituteSettings().with_settings(
        environment_settings() + options), logger)
    targets = []
    for arg in args.paths:
        path, sep, outs = arg.partition("!")
        # with substituters, a path that is not valid yet may come from a cache
        sp = resolve_path(local, path) if subs.enabled and not sep else valid(local, path)
        if sep and not sp.is_derivation:
            raise StoreError(f"'{path}' is not a derivation")
        if not sep and (not sp.is_derivation or not local.is_valid(sp)):
            targets.append(DerivedPath(sp))  # opaque: substituted (or valid already)
            continue
        names = frozenset(o for o in outs.split(",") if o) if outs and outs != "*" else frozenset()
        targets.append(DerivedPath(sp, names) if names else DerivedPath(sp, frozenset(), True))
    builder = Builder(local, settings, logger=logger, substituters=subs if subs.enabled else None)
    try:
        if not args.quiet:
            _print_missing(local, what_is_missing(local, targets, builder.substituters))
        results = builder.build(targets)
    finally:
        builder.close()
        subs.close()
    failed = [r for r in results if not r.success]
    for t, r in zip(targets, results):
        if r.success and not t.is_built:
            print(local.print_path(t.path))
        elif r.success:
            outs = local.query_derivation_outputs(t.path)
            for name in sorted(outs):
                if t.all_outputs or name in (t.outputs or ()):
                    print(local.print_path(outs[name]))
    if failed:
        raise StoreError("; ".join(r.error_msg for r in failed))
    return 0
