"""``build``: realise derivations on a local store (sandboxed where the settings or
the store ask for it), substituting from nix.conf's ``substituters`` what a cache has,
printing their output paths as ``nix-store --realise`` does."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Sequence

from ...build import Builder, BuildSettings, Substituters, SubstituteSettings
from ...config.nixconf import environment_settings
from ...errors import StoreError
from ...formats.wire import DerivedPath, ResultType
from ..common import needs_local, valid

if TYPE_CHECKING:
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
            print(text, file=sys.stderr)
        return self._n

    def stop_activity(self, act_id: int) -> None:
        pass

    def result(self, act_id: int, result_type: int, fields: Sequence[int | str]) -> None:
        if result_type == ResultType.BUILD_LOG_LINE and not self.quiet:
            print(fields[0], file=sys.stderr)


def cmd_build(store: Store, args: argparse.Namespace) -> int:
    local = needs_local(store, "build")
    settings = BuildSettings.from_nix_conf().with_settings(
        [(n, v) for n, v in args.option] + ([("keep-failed", "true")] if args.keep_failed else []))
    targets = []
    for arg in args.paths:
        path, _, outs = arg.partition("!")
        drv = valid(local, path)
        if not drv.base.endswith(".drv"):
            raise StoreError(f"'{path}' is not a derivation")
        names = frozenset(o for o in outs.split(",") if o) if outs and outs != "*" else frozenset()
        targets.append(DerivedPath(drv, names) if names else DerivedPath(drv, frozenset(), True))
    logger = _StderrLogger(args.quiet)
    subs = SubstituteSettings().with_settings([*environment_settings(), *args.option])
    results = Builder(local, settings, logger=logger,
                      substituters=Substituters(local, subs, logger)).build(targets)
    failed = [r for r in results if not r.success]
    for t, r in zip(targets, results):
        if r.success:
            outs = local.query_derivation_outputs(t.path)
            for name in sorted(outs):
                if t.all_outputs or name in (t.outputs or ()):
                    print(local.print_path(outs[name]))
    if failed:
        raise StoreError("; ".join(r.error_msg for r in failed))
    return 0
