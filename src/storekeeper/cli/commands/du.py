"""``du``: where the store's space goes, per root (exclusive and shared bytes), per owner of
roots, or per path; as a table, JSON, or a self-contained HTML treemap."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..common import UsageError, daemon_of

if TYPE_CHECKING:
    from ..common import Store


def _mib(b: int) -> str:
    return f"{b / 2**20:10.2f} MiB"


def cmd_du(store: Store, args: argparse.Namespace) -> int:
    from ...fs.atomic import write_file_atomic
    from ...store.du import SpaceReport, by_owner, compute
    from ...store.du.html import render
    daemon = daemon_of(store)
    if daemon is not None:  # measured where the files are, by storekeeper's daemon
        report = SpaceReport.from_wire(daemon.space_report(args.nar, args.top))
    else:
        report = compute(store, nar=args.nar, top=args.top)
    if args.html:
        write_file_atomic(args.html, render(report).encode())
        print(f"wrote {args.html}", file=sys.stderr)
    if args.tui:
        from ...store.du.html import tree
        from .du_tui import browse
        if not sys.stdout.isatty():
            raise UsageError("du --tui needs a terminal")
        browse(tree(report))
        return 0
    if args.json:
        obj = report.to_json()
        if args.by == "user":
            obj["owners"] = by_owner(report)
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    if args.html and not args.by:
        return 0
    if args.by == "user":
        print(f"{'OWNER':12} {'ROOTS':>5} {'HELD':>14} {'ONLY THEIRS':>14}")
        for o in by_owner(report):
            print(f"{o['owner']:12} {o['roots']:5} {_mib(o['closureBytes'])} {_mib(o['exclusiveBytes'])}")
    elif args.by == "path":
        print(f"{'SIZE':>14} {'ROOTS':>5}  PATH")
        for p in report.largest:
            print(f"{_mib(p.bytes)} {p.holders:5}  {p.path}")
    else:
        print(f"{'EXCLUSIVE':>14} {'SHARED':>14} {'CLOSURE':>14} {'PATHS':>6}  KIND      OWNER      LINK")
        for r in sorted(report.roots, key=lambda r: (-r.exclusive_bytes, -r.closure_bytes, r.link)):
            print(f"{_mib(r.exclusive_bytes)} {_mib(r.shared_bytes)} {_mib(r.closure_bytes)} "
                  f"{r.closure_paths:6}  {r.kind:9} {r.owner or '-':10} {r.link} -> {r.target}"
                  + (f"  (one of {r.links} links to it)" if r.links > 1 else ""))
    unit = "disk bytes, each inode once" if report.unit == "disk" else "NAR bytes"
    print(f"live: {report.live_paths} paths, {report.live_bytes / 2**20:.2f} MiB ({unit}); "
          f"shared by several roots: {sum(g.bytes for g in report.groups) / 2**20:.2f} MiB",
          file=sys.stderr)
    return 0
