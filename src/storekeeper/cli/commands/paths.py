"""Store contents: ``init``, ``add``, ``add-text``, ``query``, ``path-info``, ``dump``,
``restore``, ``verify``."""

from __future__ import annotations

import os
import sys

from ..common import UsageError, daemon_of, local_of, needs_local, print_paths, valid

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: query's cold start
if TYPE_CHECKING:
    import argparse

    from ...formats.storepath import StorePath
    from ..common import Store


def cmd_init(store: Store, args: argparse.Namespace) -> int:
    remote = daemon_of(store)
    if remote is not None:
        print(f"store: {remote.store_dir.path} (served by the daemon at {remote.socket_path}, "
              f"Nix {remote.daemon_nix_version or 'unknown'})")
        return 0
    local = needs_local(store, "init")
    print(f"store: {local.store_dir.path} (files in {local.real_store_dir})")
    print(f"state: {local.state_dir}")
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
        import json  # only for --json: off the query path (cold start)

        objs = []
        for info in infos:
            closure = None
            if args.closure_size:
                closure = sum(store.path_info(q).nar_size for q in store.query_closure([info.path]))
            objs.append(info.to_json(store.store_dir, closure))
        json.dump(objs, sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
        return 0
    columns = args.size or args.closure_size or args.sigs
    width = max((len(store.print_path(i.path)) for i in infos), default=0) if columns else 0
    size = _human_size if args.human_readable else "\t{:>11}".format
    for info in infos:
        line = store.print_path(info.path).ljust(width)
        if args.size:
            line += size(info.nar_size)
        if args.closure_size:
            line += size(sum(store.path_info(q).nar_size for q in store.query_closure([info.path])))
        if args.sigs:
            line += "\t" + " ".join(["ultimate"] * info.ultimate + [f"ca:{info.ca}"] * bool(info.ca)
                                    + sorted(info.sigs))
        print(line)
    return 0


def _human_size(n: int) -> str:
    """A size column of ``nix path-info -h``: one decimal and a 1024-power suffix
    (a space for bytes), six wide."""
    value, suffixes = float(n), " KMGTPEZY"
    i = 0
    while value > 1024 and i < len(suffixes) - 1:
        value /= 1024
        i += 1
    return f"\t{value:6.1f}{suffixes[i]}"


def cmd_dump(store: Store, args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    for chunk in store.dump_path(valid(store, args.path)):
        out.write(chunk)
    out.flush()
    return 0


def cmd_restore(store: Store | None, args: argparse.Namespace) -> int:
    from ...formats.nar import NarError
    from ...fs import remove_tree
    from ...fs.narfs import restore_nar
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
    """``nix-store --verify``; with ``--sigs`` the trust check of ``nix store verify``, and
    Nix's exit code bits: 1 an error of the store, 2 an untrusted path."""
    if (args.paths or args.sigs_needed or args.trusted_public_keys) and not args.sigs:
        raise UsageError("PATH, --sigs-needed and --trusted-public-keys go with --sigs")
    report = None
    if not args.sigs or args.check_contents or args.repair:
        local = local_of(store)
        if local is not None:
            # (a plain verify is given a StoreReader: the store's verify function takes
            # either, and a repair is always given a LocalStore: verify_reads_only)
            from ...store.verify import verify_store
            report = verify_store(local, check_contents=args.check_contents, repair=args.repair)
        else:
            report = store.verify(check_contents=args.check_contents, repair=args.repair)
        for line in report.repaired:
            print(f"repaired: {line}", file=sys.stderr)
        for line in report.errors:
            print(f"error: {line}", file=sys.stderr)
    untrusted: list[str] = []
    checked = report.checked if report else 0
    if args.sigs:
        from ...store import signing
        from ...store.settings import StoreSettings, environment_settings
        settings = StoreSettings().with_settings(environment_settings())  # nix.conf, NIX_CONFIG
        if args.trusted_public_keys is not None:
            settings = settings.with_settings([("trusted-public-keys", args.trusted_public_keys)])
        paths = [valid(store, p) for p in args.paths] if args.paths else None
        for sp in signing.untrusted_paths(store, paths, signing.trusted_keys(settings),
                                          args.sigs_needed):
            untrusted.append(store.print_path(sp))
            print(f"path '{untrusted[-1]}' is untrusted", file=sys.stderr)
        if args.json:
            checked = max(checked, len(paths) if paths is not None else
                          len(store.query_all_valid_paths()))
    if args.json:
        import json  # only for --json: off the query path (cold start)

        out: dict = {"checked": checked}
        if report:
            out.update(errors=report.errors, repaired=report.repaired)
        if args.sigs:
            out["untrusted"] = untrusted
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    return (0 if report is None or report.ok else 1) | (2 if untrusted else 0)


