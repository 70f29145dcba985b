"""The ``storekeeper`` command line.

Output follows nix-store: store paths one a line; ``--json`` where a script
would read a table.  Errors are one line on stderr (``error: …``) naming the
path or argument at fault, with no traceback and the exit code of its kind (``storekeeper.errors``: usage 2,
not found 3, refused 4, conflict 5, bad input 65, I/O 74, anything else 1).

Every command takes a local store or a daemon (``--store unix://SOCKET``,
``daemon``, ``NIX_REMOTE``) and answers the same through either; the few
that read the store's files themselves (``roots`` details, ``why-alive``,
``gc --dry-run``) say so when given a daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Sequence

from .. import __version__
from ..errors import EXIT_IO, StorekeeperError
from ..formats.errors import FormatError
from ..formats.hashes import ALGO_SIZES
from .common import UsageError, is_local, needs_local, open_store, print_paths, resolve_path, valid

if TYPE_CHECKING:
    from ..client.remote import RemoteStore
    from ..formats.storepath import StorePath
    from ..store.local import LocalStore

    Store = LocalStore | RemoteStore


# --- commands ---------------------------------------------------------------

def cmd_init(store: Store, args: argparse.Namespace) -> int:
    if not is_local(store):
        print(f"store: {store.store_dir.path} (served by the daemon at {store.socket_path}, "
              f"Nix {store.daemon_nix_version or 'unknown'})")
        return 0
    print(f"store: {store.store_dir.path} (files in {store.real_store_dir})")
    print(f"state: {store.state_dir}")
    return 0


def cmd_add(store: Store, args: argparse.Namespace) -> int:
    for src in args.paths:
        info = store.add_path(src, name=args.name, recursive=not args.flat, algo=args.algo)
        print(store.print_path(info.path))
    return 0


def cmd_add_text(store: Store, args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
    refs = [valid(store, r) for r in args.ref]
    info = store.add_text(args.name, data, refs)
    print(store.print_path(info.path))
    return 0


def cmd_query(store: Store, args: argparse.Namespace) -> int:
    paths = [valid(store, a) for a in args.paths]
    if args.what in ("references", "referrers", "requisites"):
        result: set[StorePath] = set()
        if args.what == "requisites":
            result = store.query_closure(paths, include_outputs=args.include_outputs)
            print_paths(store, reversed(store.topo_sort(result)))
            return 0
        for p in paths:
            result |= store.query_references(p) if args.what == "references" else store.query_referrers(p)
        print_paths(store, sorted(result))
        return 0
    for p in paths:
        info = store.path_info(p)
        if args.what == "hash":
            print(info.nar_hash.typed("nix32"))
        elif args.what == "size":
            print(info.nar_size)
        elif args.what == "deriver":
            print(store.print_path(info.deriver) if info.deriver else "unknown-deriver")
        elif args.what == "outputs":
            if p.is_derivation:
                print_paths(store, store.query_derivation_outputs(p).values())
            else:
                print(store.print_path(p))
    return 0


def cmd_path_info(store: Store, args: argparse.Namespace) -> int:
    paths = [valid(store, a) for a in args.paths]
    if args.recursive:
        paths = sorted(store.query_closure(paths))
    else:
        paths = sorted(set(paths))
    infos = [store.path_info(p) for p in paths]
    if args.json:
        objs = []
        for info in infos:
            closure = None
            if args.closure_size:
                closure = sum(store.path_info(q).nar_size for q in store.query_closure([info.path]))
            objs.append(info.to_json(store.store_dir, closure))
        json.dump(objs, sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
        return 0
    width = max((len(store.print_path(i.path)) for i in infos), default=0)
    for info in infos:
        line = store.print_path(info.path).ljust(width)
        line += f"\t{info.nar_size:>12}"
        if args.closure_size:
            line += f"\t{sum(store.path_info(q).nar_size for q in store.query_closure([info.path])):>12}"
        print(line)
    return 0


def cmd_dump(store: Store, args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    for chunk in store.dump_path(valid(store, args.path)):
        out.write(chunk)
    out.flush()
    return 0


def cmd_restore(store: Store | None, args: argparse.Namespace) -> int:
    from ..formats.nar import NarError
    from ..fs import remove_tree
    from ..fs.narfs import restore_nar
    if os.path.lexists(args.dir):
        raise UsageError(f"'{args.dir}' already exists")
    try:
        restore_nar(sys.stdin.buffer, args.dir)
    except NarError:
        if os.path.lexists(args.dir):
            remove_tree(args.dir)
        raise
    return 0


def cmd_verify(store: Store, args: argparse.Namespace) -> int:
    report = store.verify(check_contents=args.check_contents, repair=args.repair)
    for line in report.repaired:
        print(f"repaired: {line}", file=sys.stderr)
    for line in report.errors:
        print(f"error: {line}", file=sys.stderr)
    if args.json:
        json.dump({"checked": report.checked, "errors": report.errors,
                   "repaired": report.repaired}, sys.stdout)
        sys.stdout.write("\n")
    return 0 if report.ok else 1


def cmd_gc(store: Store, args: argparse.Namespace) -> int:
    from ..api import DEAD, DELETE_DEAD, LIVE, GCOptions
    action = LIVE if args.print_live else DEAD if (args.print_dead or args.dry_run) else DELETE_DEAD
    if args.dry_run:
        needs_local(store, "gc --dry-run (it measures the files a GC would free)")
    if is_local(store):
        cfg = store.settings
    elif args.keep_outputs or args.no_keep_derivations:
        raise UsageError("through a daemon, keep-outputs and keep-derivations are the daemon's "
                         "settings (its nix.conf)")
    else:
        from ..store.settings import StoreSettings
        cfg = StoreSettings()  # not sent: the daemon applies its own
    opts = GCOptions(action=action, max_freed=args.max_freed if args.max_freed is not None else 2**64 - 1,
                     keep_outputs=args.keep_outputs or cfg.keep_outputs,
                     keep_derivations=cfg.keep_derivations and not args.no_keep_derivations)
    if action == DELETE_DEAD and not is_local(store) and not args.no_sync_roots:
        from .roots_cmds import before_gc
        before_gc(args.store, args.skip_step or ())
    from .progress import Progress
    bar = Progress("deleting garbage")
    quiet = args.json or bar.enabled  # on a terminal the bar replaces the per-path lines

    def log(message: str) -> None:
        if not (quiet and message.startswith("deleting '")) and not args.json:
            bar.log(message)
    try:
        result = store.collect_garbage(opts, log, bar.update)
    finally:
        bar.close()
    if args.dry_run:
        from ..store.gc.inspect import bytes_freed_by
        disk, apparent = bytes_freed_by(store, result.paths)
        if args.json:
            json.dump({"action": "dry-run", "paths": result.paths, "bytesFreed": disk,
                       "apparentBytesFreed": apparent}, sys.stdout)
            sys.stdout.write("\n")
        else:
            if result.paths:
                sys.stdout.write("\n".join(result.paths) + "\n")
            print(f"would delete {len(result.paths)} store paths, freeing {disk} bytes "
                  f"({disk / 2**20:.2f} MiB on disk, {apparent / 2**20:.2f} MiB of file contents)",
                  file=sys.stderr)
        return 0
    if args.json:
        json.dump({"action": action, "paths": result.paths, "bytesFreed": result.bytes_freed}, sys.stdout)
        sys.stdout.write("\n")
    elif action in (LIVE, DEAD):
        if result.paths:
            sys.stdout.write("\n".join(result.paths) + "\n")
    else:
        print(f"{len(result.paths)} store paths deleted, {result.bytes_freed / 2**20:.2f} MiB freed")
    return 0


def cmd_roots(store: Store, args: argparse.Namespace) -> int:
    from .roots_cmds import print_root_infos, remote_roots
    if not is_local(store):
        return remote_roots(store, args.store, args.json)
    from ..store.gc.inspect import list_roots
    print_root_infos(list_roots(store), args.json)
    return 0


def cmd_why_alive(store: Store, args: argparse.Namespace) -> int:
    from ..store.gc.inspect import why_alive
    local = needs_local(store, "why-alive")
    sp = valid(local, args.path)
    chain = why_alive(local, sp)
    if chain is None:
        print(f"{store.print_path(sp)} is not reachable from any root: the next GC deletes it")
        return 1
    (root_label, first), *rest = chain
    print(f"{root_label}")
    print(f"  -> {first}")
    for kind, path in rest:
        print(f"  -> {path}   [{kind}]")
    return 0


def cmd_delete(store: Store, args: argparse.Namespace) -> int:
    from ..api import DELETE_SPECIFIC, GCOptions
    paths = frozenset(resolve_path(store, a) for a in args.paths)
    result = store.collect_garbage(GCOptions(action=DELETE_SPECIFIC, paths=paths,
                                             ignore_liveness=args.ignore_liveness),
                                   lambda m: print(m, file=sys.stderr))
    print(f"{len(result.paths)} store paths deleted, {result.bytes_freed / 2**20:.2f} MiB freed")
    return 0


# --- optimise and stats (store.optimise) ---------------------------------------

def cmd_optimise(store: Store, args: argparse.Namespace) -> int:
    from ..store.optimise import optimise_store
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
    from ..store.optimise import pool_stats
    ps = pool_stats(needs_local(store, "stats"))
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


def _add_optimise_parsers(sub) -> None:
    s = sub.add_parser("optimise", aliases=["optimize"],
                       help="hard-link identical files through the .links pool (like nix-store --optimise)")
    s.add_argument("--dry-run", action="store_true", help="change nothing; print what would be freed")
    s.add_argument("--json", action="store_true")
    s.add_argument("--trust-link-count", action="store_true",
                   help="take files with more than one link as linked already (skip hashing them)")
    s.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help="walker processes (default: one per CPU, up to 4, for big runs)")
    s.set_defaults(func=cmd_optimise)
    s = sub.add_parser("stats", help="dedup figures from the link counts in .links (read-only)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)


# --- parser -----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="storekeeper", description="A Nix-compatible package store.")
    p.add_argument("--store", metavar="URL", help="store URL: DIR (chroot root), local?root=DIR, "
                   "local?store=S&state=T&log=L, unix://SOCKET, daemon, ssh-ng://[USER@]HOST, "
                   "tcp://HOST:PORT (default: $NIX_REMOTE, else the embedded store under the "
                   "user's data dir)")
    p.add_argument("--version", action="version", version=f"storekeeper {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("daemon", help="serve the store over the Nix worker protocol "
                   "(see 'storekeeper daemon --help')", add_help=False)

    s = sub.add_parser("init", help="create the store if needed and show where it is")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("add", help="add files or directories to the store")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--flat", action="store_true", help="hash the file's bytes, not its NAR "
                   "(like nix-store --add-fixed without --recursive)")
    s.add_argument("--algo", default="sha256", choices=sorted(ALGO_SIZES))
    s.add_argument("--name", help="store path name (default: the file's base name)")
    s.set_defaults(func=cmd_add)

    s = sub.add_parser("add-text", help="add a text file (like builtins.toFile)")
    s.add_argument("name")
    s.add_argument("file", help="file with the text, or - for stdin")
    s.add_argument("--ref", action="append", default=[], metavar="PATH",
                   help="a store path the text refers to (repeatable)")
    s.set_defaults(func=cmd_add_text)

    s = sub.add_parser("query", help="query store paths (like nix-store -q)")
    g = s.add_mutually_exclusive_group(required=True)
    for what in ("references", "referrers", "requisites", "hash", "size", "deriver", "outputs"):
        g.add_argument(f"--{what}", dest="what", action="store_const", const=what)
    s.add_argument("--include-outputs", action="store_true")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.set_defaults(func=cmd_query)

    s = sub.add_parser("path-info", help="show path metadata")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--json", action="store_true")
    s.add_argument("-r", "--recursive", action="store_true", help="the whole closure")
    s.add_argument("-S", "--closure-size", action="store_true")
    s.set_defaults(func=cmd_path_info)

    s = sub.add_parser("dump", help="write the NAR of a store path to stdout")
    s.add_argument("path")
    s.set_defaults(func=cmd_dump)

    s = sub.add_parser("restore", help="unpack a NAR from stdin into DIR (strict reader)")
    s.add_argument("dir")
    s.set_defaults(func=cmd_restore, no_store=True)

    s = sub.add_parser("gc", help="collect garbage (or only print what is live or dead)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--print-live", action="store_true")
    g.add_argument("--print-dead", action="store_true")
    s.add_argument("--max-freed", type=int, metavar="BYTES")
    s.add_argument("--keep-outputs", action="store_true")
    s.add_argument("--no-keep-derivations", action="store_true")
    g.add_argument("--dry-run", action="store_true",
                   help="print what would be deleted and the exact bytes it would free")
    s.add_argument("--json", action="store_true")
    s.add_argument("--no-sync-roots", action="store_true",
                   help="through a daemon, skip the client's part (see sync-roots), which a "
                        "deleting gc runs before collecting")
    s.add_argument("--skip-step", action="append", choices=("clean", "runtime", "sync"),
                   help=argparse.SUPPRESS)  # test hook: leave out one step of sync-roots
    s.set_defaults(func=cmd_gc)

    s = sub.add_parser("roots", help="list every GC root: kind, owner, age, closure size (read-only)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_roots)

    s = sub.add_parser("why-alive", help="the shortest chain from a GC root to PATH")
    s.add_argument("path")
    s.set_defaults(func=cmd_why_alive)

    s = sub.add_parser("delete", help="delete store paths that are not alive")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--ignore-liveness", action="store_true",
                   help="delete even if a root keeps them alive (never while other valid paths "
                        "refer to them, nor while a process has them pinned)")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("verify", help="check that valid paths exist and (optionally) are intact")
    s.add_argument("--check-contents", action="store_true")
    s.add_argument("--repair", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)
    _add_optimise_parsers(sub)
    from .roots_cmds import add_parsers
    add_parsers(sub)
    from .tcpkey import add_parser as _add_tcp_key_parser
    _add_tcp_key_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `daemon` has its own parser (it also serves as the nix-daemon drop-in)
    store_args: list[str] = []
    if len(argv) >= 2 and argv[0] == "--store":
        store_args, argv = argv[:2], argv[2:]
    elif argv and argv[0].startswith("--store="):
        store_args, argv = ["--store", argv[0].split("=", 1)[1]], argv[1:]
    if argv and argv[0] == "daemon":
        from ..daemon.cli import main_daemon
        return main_daemon(store_args + argv[1:])
    args = build_parser().parse_args(store_args + argv)
    store = None
    try:
        if not getattr(args, "no_store", False):
            store = open_store(args.store)
        return int(args.func(store, args))
    except (StorekeeperError, FormatError) as e:
        # one line, even for a daemon's multi-line message; the exit code says what kind
        print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        return 1
    except OSError as e:
        where = f" '{e.filename}':" if e.filename else ""
        print(f"error:{where} {e.strerror or e}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        return 130
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    sys.exit(main())
