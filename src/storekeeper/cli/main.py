"""The ``storekeeper`` command line.

Output follows nix-store: store paths one a line; ``--json`` where a script
would read a table.  Errors are one line on stderr (``error: …``) naming the
path or argument at fault, with a non-zero exit and no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Sequence

from ..formats.errors import FormatError
from ..formats.hashes import ALGO_SIZES
from ..formats.storepath import StorePath
from ..store.errors import StoreError
from ..store.layout import DaemonAddress, LocalLayout, parse_store_url
from ..store.local import LocalStore
from ..store.settings import StoreSettings


class UsageError(Exception):
    pass


def open_store(url: str | None) -> LocalStore:
    address = parse_store_url(url)
    if isinstance(address, DaemonAddress):
        raise UsageError(f"daemon stores ('{address.socket_path}') are not supported by this "
                         "command yet")
    assert isinstance(address, LocalLayout)
    return LocalStore(address, settings=StoreSettings.from_nix_conf())


def resolve_path(store: LocalStore, arg: str) -> StorePath:
    """A store path from an argument: a store path, a path inside one, or a link to one."""
    sd = store.store_dir
    path = os.path.abspath(arg) if not arg.startswith("/") else os.path.normpath(arg)
    for _ in range(40):
        if sd.is_in_store(path):
            sp, _rest = sd.split(path)
            return sp
        if not os.path.islink(path):
            break
        target = os.readlink(path)
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    raise UsageError(f"path '{arg}' is not in the Nix store")


def _valid(store: LocalStore, arg: str) -> StorePath:
    sp = resolve_path(store, arg)
    if not store.is_valid(sp):
        raise StoreError(f"path '{store.print_path(sp)}' is not valid")
    return sp


def _print_paths(store: LocalStore, paths: Iterable[StorePath]) -> None:
    out = sys.stdout
    for p in paths:
        out.write(store.print_path(p) + "\n")


# --- commands ---------------------------------------------------------------

def cmd_init(store: LocalStore, args: argparse.Namespace) -> int:
    print(f"store: {store.store_dir.path} (files in {store.real_store_dir})")
    print(f"state: {store.state_dir}")
    return 0


def cmd_add(store: LocalStore, args: argparse.Namespace) -> int:
    for src in args.paths:
        info = store.add_path(src, name=args.name, recursive=not args.flat, algo=args.algo)
        print(store.print_path(info.path))
    return 0


def cmd_add_text(store: LocalStore, args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
    refs = [_valid(store, r) for r in args.ref]
    info = store.add_text(args.name, data, refs)
    print(store.print_path(info.path))
    return 0


def cmd_query(store: LocalStore, args: argparse.Namespace) -> int:
    paths = [_valid(store, a) for a in args.paths]
    if args.what in ("references", "referrers", "requisites"):
        result: set[StorePath] = set()
        if args.what == "requisites":
            result = store.query_closure(paths, include_outputs=args.include_outputs)
            _print_paths(store, reversed(store.topo_sort(result)))
            return 0
        for p in paths:
            result |= store.query_references(p) if args.what == "references" else store.query_referrers(p)
        _print_paths(store, sorted(result))
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
                _print_paths(store, store.query_derivation_outputs(p).values())
            else:
                print(store.print_path(p))
    return 0


def cmd_path_info(store: LocalStore, args: argparse.Namespace) -> int:
    paths = [_valid(store, a) for a in args.paths]
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


def cmd_dump(store: LocalStore, args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    for chunk in store.dump_path(_valid(store, args.path)):
        out.write(chunk)
    out.flush()
    return 0


def cmd_restore(store: LocalStore | None, args: argparse.Namespace) -> int:
    from ..formats.nar import NarError
    from ..store.narfs import remove_tree, restore_nar
    if os.path.lexists(args.dir):
        raise UsageError(f"'{args.dir}' already exists")
    try:
        restore_nar(sys.stdin.buffer, args.dir)
    except NarError:
        if os.path.lexists(args.dir):
            remove_tree(args.dir)
        raise
    return 0


def cmd_verify(store: LocalStore, args: argparse.Namespace) -> int:
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


def cmd_gc(store: LocalStore, args: argparse.Namespace) -> int:
    from ..store.gc import DEAD, DELETE_DEAD, LIVE, GCOptions
    action = LIVE if args.print_live else DEAD if (args.print_dead or args.dry_run) else DELETE_DEAD
    cfg = store.settings
    opts = GCOptions(action=action, max_freed=args.max_freed if args.max_freed is not None else 2**64 - 1,
                     keep_outputs=args.keep_outputs or cfg.keep_outputs,
                     keep_derivations=cfg.keep_derivations and not args.no_keep_derivations)
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
        from ..store.inspect import bytes_freed_by
        disk, apparent = bytes_freed_by(store, result.paths)
        if args.json:
            json.dump({"action": "dry-run", "paths": result.paths, "bytesFreed": disk,
                       "apparentBytesFreed": apparent}, sys.stdout)
            sys.stdout.write("\n")
        else:
            for p in result.paths:
                print(p)
            print(f"would delete {len(result.paths)} store paths, freeing {disk} bytes "
                  f"({disk / 2**20:.2f} MiB on disk, {apparent / 2**20:.2f} MiB of file contents)",
                  file=sys.stderr)
        return 0
    if args.json:
        json.dump({"action": action, "paths": result.paths, "bytesFreed": result.bytes_freed}, sys.stdout)
        sys.stdout.write("\n")
    elif action in (LIVE, DEAD):
        for p in result.paths:
            print(p)
    else:
        print(f"{len(result.paths)} store paths deleted, {result.bytes_freed / 2**20:.2f} MiB freed")
    return 0


def cmd_roots(store: LocalStore, args: argparse.Namespace) -> int:
    from ..store.inspect import list_roots
    roots = list_roots(store)
    if args.json:
        json.dump([r.to_json() for r in roots], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    for r in roots:
        age = "-" if r.age_seconds is None else _age(r.age_seconds)
        flag = "" if r.valid else "  (invalid target)"
        print(f"{r.kind:9} {r.owner or '-':10} {age:>6} {r.closure_size / 2**20:10.2f} MiB  "
              f"{r.link} -> {r.target}{flag}")
    return 0


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{int(seconds // n)}{unit}"
    return f"{int(seconds)}s"


def cmd_why_alive(store: LocalStore, args: argparse.Namespace) -> int:
    from ..store.inspect import why_alive
    sp = _valid(store, args.path)
    chain = why_alive(store, sp)
    if chain is None:
        print(f"{store.print_path(sp)} is not reachable from any root: the next GC deletes it")
        return 1
    (root_label, first), *rest = chain
    print(f"{root_label}")
    print(f"  -> {first}")
    for kind, path in rest:
        print(f"  -> {path}   [{kind}]")
    return 0


def cmd_delete(store: LocalStore, args: argparse.Namespace) -> int:
    from ..store.gc import DELETE_SPECIFIC, GCOptions
    paths = frozenset(resolve_path(store, a) for a in args.paths)
    result = store.collect_garbage(GCOptions(action=DELETE_SPECIFIC, paths=paths,
                                             ignore_liveness=args.ignore_liveness),
                                   lambda m: print(m, file=sys.stderr))
    print(f"{len(result.paths)} store paths deleted, {result.bytes_freed / 2**20:.2f} MiB freed")
    return 0


# --- parser -----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="storekeeper", description="A Nix-compatible package store.")
    p.add_argument("--store", metavar="URL", help="store URL: DIR (chroot root), local?root=DIR, "
                   "local?store=S&state=T&log=L, unix://SOCKET, daemon (default: $NIX_REMOTE, "
                   "else the embedded store under the user's data dir)")
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
    except (StoreError, FormatError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except OSError as e:
        where = f" '{e.filename}':" if e.filename else ""
        print(f"error:{where} {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    sys.exit(main())
