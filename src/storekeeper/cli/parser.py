"""The ``storekeeper`` command line's argparse parser: every command's options, help and
usage errors.

:mod:`storekeeper.cli.main` imports it only when the hand parser for the hot path
(:mod:`storekeeper.cli.quick`) does not take the command line (cold start, issue 12).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Sequence

from .. import __version__
from .quick import QUERY_WHAT, verify_reads_only

#: ``add --algo`` choices: the keys of :data:`storekeeper.formats.hashes.ALGO_SIZES`
#: (spelt out so the parser needs no hashing module; tests/test_cli.py checks they agree)
HASH_ALGOS = ("md5", "sha1", "sha256", "sha512")
#: hidden ``--skip-step`` values of ``gc`` and ``sync-roots``: a test hook that shows
#: what each step of the client's part of a GC is for
SYNC_STEPS = ("clean", "runtime", "sync")

if TYPE_CHECKING:
    _Sub = argparse._SubParsersAction[argparse.ArgumentParser]


# --- parser -----------------------------------------------------------------
# One builder per command: a run that names its command builds only that command's
# parser (argparse spends ~0.2 ms on every option it adds); ``--help``, a misspelt
# command or an option before the command builds them all, so help and errors read
# the same as with the full parser.

def _daemon(sub: _Sub) -> None:
    sub.add_parser("daemon", help="serve the store over the Nix worker protocol "
                   "(see 'storekeeper daemon --help')", add_help=False)


def _init(sub: _Sub) -> None:
    s = sub.add_parser("init", help="create the store if needed and show where it is")
    s.set_defaults(func="paths.cmd_init")


def _add(sub: _Sub) -> None:
    s = sub.add_parser("add", help="add files or directories to the store")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--flat", action="store_true", help="hash the file's bytes, not its NAR "
                   "(like nix-store --add-fixed without --recursive)")
    s.add_argument("--algo", default="sha256", choices=HASH_ALGOS)
    s.add_argument("--name", help="store path name (default: the file's base name)")
    s.set_defaults(func="paths.cmd_add")


def _add_text(sub: _Sub) -> None:
    s = sub.add_parser("add-text", help="add a text file (like builtins.toFile)")
    s.add_argument("name")
    s.add_argument("file", help="file with the text, or - for stdin")
    s.add_argument("--ref", action="append", default=[], metavar="PATH",
                   help="a store path the text refers to (repeatable)")
    s.set_defaults(func="paths.cmd_add_text")


def _query(sub: _Sub) -> None:
    s = sub.add_parser("query", help="query store paths (like nix-store -q)")
    g = s.add_mutually_exclusive_group(required=True)
    for what in QUERY_WHAT:
        g.add_argument(f"--{what}", dest="what", action="store_const", const=what)
    s.add_argument("--include-outputs", action="store_true")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.set_defaults(func="paths.cmd_query", queries_only=True)


def _path_info(sub: _Sub) -> None:
    # -h is --human-readable, as in nix path-info; help is --help only
    s = sub.add_parser("path-info", help="show path metadata", add_help=False)
    s.add_argument("--help", action="help", help="show this help message and exit")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--json", action="store_true")
    s.add_argument("-r", "--recursive", action="store_true", help="the whole closure")
    s.add_argument("-s", "--size", action="store_true", help="a column with the NAR size")
    s.add_argument("-S", "--closure-size", action="store_true",
                   help="a column with the closure's NAR size")
    s.add_argument("-h", "--human-readable", action="store_true",
                   help="sizes as 5.67G instead of bytes")
    s.add_argument("--sigs", action="store_true",
                   help="a column with 'ultimate', 'ca:…' and the signatures, as nix path-info")
    s.set_defaults(func="paths.cmd_path_info", queries_only=True)


def _dump(sub: _Sub) -> None:
    s = sub.add_parser("dump", help="write the NAR of a store path to stdout")
    s.add_argument("path")
    s.set_defaults(func="paths.cmd_dump")


def _restore(sub: _Sub) -> None:
    s = sub.add_parser("restore", help="unpack a NAR from stdin into DIR (strict reader)")
    s.add_argument("dir")
    s.set_defaults(func="paths.cmd_restore", no_store=True)


def _gc(sub: _Sub) -> None:
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
    s.add_argument("--skip-step", action="append", choices=SYNC_STEPS,
                   help=argparse.SUPPRESS)  # test hook: leave out one step of sync-roots
    s.add_argument("-d", "--delete-generations", nargs="?", const="old", metavar="SPEC",
                   help="first delete every profile's old generations (SPEC: old (default), "
                        "+N, Nd), like nix-collect-garbage -d")
    s.add_argument("--delete-older-than", metavar="AGE",
                   help="first delete generations older than AGE (e.g. 30d) of every profile")
    # retention policies (nix.conf names; these flags override them for this run)
    s.add_argument("--keep-generations", metavar="N", help="policy: keep each profile's last N "
                   "generations")
    s.add_argument("--generations-older-than", metavar="AGE", dest="delete_generations_older_than",
                   help="policy: delete generations older than AGE (the one live then stays)")
    s.add_argument("--root-ttl", metavar="KIND=AGE", help="policy: roots of KIND (indirect: "
                   "result links) older than AGE stop counting")
    s.add_argument("--user-quota", metavar="BYTES", help="policy: warn about users whose roots "
                   "hold more")
    s.add_argument("--keep-recently-used", metavar="AGE", help="policy: keep paths used within AGE")
    s.set_defaults(func="gc.cmd_gc")


def _roots(sub: _Sub) -> None:
    s = sub.add_parser("roots", help="list every GC root: kind, owner, age, closure size (read-only)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--no-size", action="store_true",
                   help="leave out closure sizes (much faster on a big store: no reference graph)")
    s.set_defaults(func="roots.cmd_roots", queries_only=True)


def _du(sub: _Sub) -> None:
    s = sub.add_parser("du", help="where the space goes: per root the bytes only it keeps alive "
                       "and the bytes it shares, its largest paths (read-only)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--html", metavar="FILE", help="write a self-contained interactive treemap")
    s.add_argument("--tui", action="store_true", help="browse the same tree on the terminal")
    s.add_argument("--by", choices=["root", "user", "path"], default=None,
                   help="table per root (default), per owner of roots, or largest paths")
    s.add_argument("--nar", action="store_true",
                   help="count NAR sizes from the database instead of disk blocks (no walk)")
    s.add_argument("--top", type=int, default=10, metavar="N", help="largest paths listed per root")
    s.set_defaults(func="du.cmd_du")


def _profile(sub: _Sub) -> None:
    s = sub.add_parser("profile", help="a profile's generations: list, delete-generations, "
                       "rollback, switch (as nix-env does them)")
    ps = s.add_subparsers(dest="profile_command", required=True, metavar="ACTION")

    def one(name: str, func: str, help: str) -> argparse.ArgumentParser:
        p = ps.add_parser(name, help=help)
        p.add_argument("-p", "--profile", metavar="PATH",
                       help="the profile (default: where ~/.nix-profile points, as Nix)")
        p.set_defaults(func=f"profile.{func}")
        return p
    one("list", "cmd_list", "list generations (like nix-env --list-generations)").add_argument(
        "--json", action="store_true")
    d = one("delete-generations", "cmd_delete_generations",
            "delete generations, never the current one (like nix-env --delete-generations)")
    d.add_argument("ids", nargs="*", metavar="GEN", help="generation numbers, or 'old', '+N', 'Nd'")
    d.add_argument("--older-than", metavar="AGE", help="e.g. 30d: keep the one live then")
    d.add_argument("--keep", type=int, metavar="N", help="keep the current and N-1 before it")
    d.add_argument("--dry-run", action="store_true")
    one("rollback", "cmd_rollback", "switch to the previous generation")
    one("switch", "cmd_switch", "switch to generation N").add_argument("number", type=int)


def _why_alive(sub: _Sub) -> None:
    s = sub.add_parser("why-alive", help="the shortest chain from a GC root to PATH")
    s.add_argument("path")
    s.set_defaults(func="why.cmd_why_alive", queries_only=True)


def _delete(sub: _Sub) -> None:
    s = sub.add_parser("delete", help="delete store paths that are not alive")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--ignore-liveness", action="store_true",
                   help="delete even if a root keeps them alive (never while other valid paths "
                        "refer to them, nor while a process has them pinned)")
    s.set_defaults(func="gc.cmd_delete")


def _verify(sub: _Sub) -> None:
    s = sub.add_parser("verify", help="check that valid paths exist and (optionally) are intact")
    s.add_argument("--check-contents", action="store_true",
                   help="hash every path's files against its NAR hash; also SQLite's quick_check "
                        "of the whole database (a plain verify reads what nix-store --verify does)")
    s.add_argument("--repair", action="store_true",
                   help="invalidate vanished paths (with --check-contents: fix metadata and narSize "
                        "too); quick_check of the database first")
    s.add_argument("--json", action="store_true")
    s.add_argument("--sigs", action="store_true",
                   help="check signatures instead (with --check-contents: as well): report each "
                        "path that is neither built here, content-addressed nor signed by a key "
                        "in trusted-public-keys, as nix store verify; exit code 2 if any")
    s.add_argument("--sigs-needed", type=int, default=0, metavar="N",
                   help="with --sigs: N signatures by trusted keys (built paths too)")
    s.add_argument("--trusted-public-keys", metavar="KEYS",
                   help="with --sigs: these keys instead of nix.conf's trusted-public-keys")
    s.add_argument("paths", nargs="*", metavar="PATH",
                   help="with --sigs: only these paths (default: every valid path)")
    s.set_defaults(func="paths.cmd_verify")


def _optimise(sub: _Sub) -> None:
    s = sub.add_parser("optimise", aliases=["optimize"],
                       help="hard-link identical files through the .links pool (like nix-store --optimise)")
    s.add_argument("--dry-run", action="store_true", help="change nothing; print what would be freed")
    s.add_argument("--json", action="store_true")
    s.add_argument("--trust-link-count", action="store_true",
                   help="take files with more than one link as linked already (skip hashing them)")
    s.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help="walker processes (default: one per CPU, up to 4, for big runs)")
    s.set_defaults(func="optimise.cmd_optimise")


def _stats(sub: _Sub) -> None:
    s = sub.add_parser("stats", help="dedup figures from the link counts in .links (read-only)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func="optimise.cmd_stats")


def _add_root(sub: _Sub) -> None:
    s = sub.add_parser("add-root", help="make LINK point to PATH's store path and register it "
                       "with the daemon as your root (kept in ~/.local/state/storekeeper/roots)")
    s.add_argument("link")
    s.add_argument("path")
    s.set_defaults(func="roots.cmd_add_root")


def _remove_root(sub: _Sub) -> None:
    s = sub.add_parser("remove-root", help="unregister your root LINK (also an indirect root "
                       "you added with a Nix client, even if LINK can no longer be read)")
    s.add_argument("link")
    s.set_defaults(func="roots.cmd_remove_root")


def _sync_roots(sub: _Sub) -> None:
    s = sub.add_parser("sync-roots", help="the client's part of gc, without collecting: remove "
                       "broken links in your roots dir, tell the daemon which roots are gone, "
                       "report your running programs' store paths (held for the daemon's lease)")
    s.add_argument("--skip-step", action="append", choices=SYNC_STEPS, help=argparse.SUPPRESS)
    s.set_defaults(func="roots.cmd_sync_roots")


def _tcp_key(sub: _Sub) -> None:
    s = sub.add_parser("tcp-key", help="issue or revoke your key for the daemon's TCP listener "
                       "(ask the daemon on its own host)")
    s.add_argument("action", choices=["issue", "revoke"])
    s.add_argument("--output", metavar="FILE", help="where to write the key (default: "
                   "$XDG_CONFIG_HOME/storekeeper/tcp-key, i.e. ~/.config/storekeeper/tcp-key)")
    s.set_defaults(func="tcpkey.cmd_tcp_key")


def _build(sub: _Sub) -> None:
    s = sub.add_parser("build", help="build derivations on a local store (like nix-store "
                       "--realise DRV...): prints the output paths")
    s.add_argument("paths", nargs="+", metavar="DRV", help="a .drv path, or DRV!OUT,OUT")
    s.add_argument("--option", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a nix.conf setting for this build (e.g. --option sandbox true)")
    s.add_argument("--keep-failed", "-K", action="store_true")
    s.add_argument("--quiet", "-Q", action="store_true", help="no build log on stderr")
    s.set_defaults(func="build.cmd_build")


def _key(sub: _Sub) -> None:
    s = sub.add_parser("key", help="ed25519 signing keys in Nix's name:base64 files")
    ks = s.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    g = ks.add_parser("generate", help="make a key pair (like nix-store --generate-binary-cache-key)")
    g.add_argument("--name", required=True, help="key name, e.g. cache.example.org-1")
    g.add_argument("--secret", required=True, metavar="FILE", help="secret key file to create (0600)")
    g.add_argument("--public", metavar="FILE", help="public key file to create (default: print it)")
    g.set_defaults(func="cache.cmd_key_generate", no_store=True)
    p = ks.add_parser("public", help="print the public key of a secret key file")
    p.add_argument("secret", metavar="SECRET-FILE")
    p.set_defaults(func="cache.cmd_key_public", no_store=True)


def _sign(sub: _Sub) -> None:
    s = sub.add_parser("sign", help="sign store paths with secret keys (adds to their signatures)")
    s.add_argument("-k", "--key", action="append", required=True, metavar="SECRET-FILE")
    s.add_argument("-r", "--recursive", action="store_true", help="the whole closure")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.set_defaults(func="cache.cmd_sign")


def _copy(sub: _Sub) -> None:
    s = sub.add_parser("copy", help="copy closures to or from a binary cache "
                       "(file://DIR, http(s)://…, s3://BUCKET?endpoint=…)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--to", metavar="URL")
    g.add_argument("--from", dest="from_", metavar="URL")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--json", action="store_true", help="print a summary as JSON")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("-j", "--jobs", type=int, default=0, metavar="N",
                   help="compress N paths at once (--to from a local store)")
    s.add_argument("--no-check-sigs", action="store_true",
                   help="--from: accept paths without a trusted signature")
    s.add_argument("--trusted-public-keys", metavar="KEYS",
                   help="--from: these keys instead of nix.conf's trusted-public-keys")
    s.add_argument("--no-lease", action="store_true",
                   help="--to: no writer's lease (credentials that cannot list or delete; "
                   "a concurrent cache gc may then break what is uploaded)")
    s.add_argument("--root", metavar="NAME",
                   help="--to: pin the given paths as the cache root NAME (docs/CACHE-GC.md)")
    s.add_argument("--root-ttl", type=float, metavar="SECONDS", help="--root: expire after this")
    s.add_argument("--keep", type=int, metavar="N",
                   help="--root: keep only the N newest roots of NAME's group (NAME up to its last '/')")
    s.add_argument("--logs", action="store_true",
                   help="--to from a local store: also the build logs of the paths' derivers, "
                        "to log/<drv> (as nix store copy-log; paths without a log are skipped)")
    s.set_defaults(func="cache.cmd_copy")


def _cache(sub: _Sub) -> None:
    s = sub.add_parser("cache", help="binary cache information")
    cs = s.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    i = cs.add_parser("info", help="a cache's nix-cache-info (store dir, priority, mass query)")
    i.add_argument("url", metavar="URL")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func="cache.cmd_cache_info", no_store=True)
    r = cs.add_parser("roots", help="the cache's named roots (fleet cache GC, docs/CACHE-GC.md)")
    r.add_argument("url", metavar="URL")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func="cache_gc.cmd_roots", no_store=True)
    p = cs.add_parser("pin", help="root paths (and their closures, which must be in the cache)")
    p.add_argument("url", metavar="URL")
    p.add_argument("name", metavar="NAME")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--ttl", type=float, metavar="SECONDS", help="the root expires after this")
    p.add_argument("--keep", type=int, metavar="N",
                   help="keep only the N newest roots of NAME's group (NAME up to its last '/')")
    p.set_defaults(func="cache_gc.cmd_pin", no_store=True)
    u = cs.add_parser("unpin", help="remove a named root")
    u.add_argument("url", metavar="URL")
    u.add_argument("name", metavar="NAME")
    u.set_defaults(func="cache_gc.cmd_unpin", no_store=True)
    g = cs.add_parser("gc", help="delete what no root or writer's lease reaches")
    g.add_argument("url", metavar="URL")
    g.add_argument("--dry-run", action="store_true", help="only say what would go (exact bytes)")
    g.add_argument("--json", action="store_true")
    g.add_argument("--max-freed", type=int, metavar="BYTES", help="stop once this much is freed")
    for opt, default, what in (("--settle", 300, "wait between publishing and re-reading"),
                               ("--lease-ttl", 600, "writers' lease TTL (must match theirs)"),
                               ("--nar-grace", 86400, "keep a dead narinfo's NAR this long"),
                               ("--temp-grace", 86400, "half-finished uploads older than this go"),
                               ("--skew", 60, "clock skew allowed between machines"),
                               ("--margin", 60, "longest step between a check and its write")):
        g.add_argument(opt, type=float, default=default, metavar="SECONDS",
                       help=f"{what} (default {default})")
    g.set_defaults(func="cache_gc.cmd_gc", no_store=True)
    a = cs.add_parser("audit", help="closures with a missing narinfo or NAR")
    a.add_argument("url", metavar="URL")
    a.add_argument("--json", action="store_true")
    a.add_argument("--repair", action="store_true",
                   help="upload what is missing again, from the store (--store)")
    a.set_defaults(func="cache_gc.cmd_audit", no_store=True)
    g = cs.add_parser("log", help="print the build log a cache has for a derivation or for "
                      "the deriver of PATH (as nix log --store URL)")
    g.add_argument("url", metavar="URL")
    g.add_argument("paths", nargs="+", metavar="PATH")
    g.set_defaults(func="cache.cmd_cache_log", no_store=True)


def _serve(sub: _Sub) -> None:
    s = sub.add_parser("serve", help="serve the store as a read-only HTTP binary cache")
    s.add_argument("--listen", default="127.0.0.1:5000", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:5000; port 0: any free port)")
    s.add_argument("--sign-key", metavar="SECRET-FILE", help="sign narinfos with this key")
    s.add_argument("--compression", default="none", choices=["none", "xz", "zstd"],
                   help="compress NARs on the fly (default none)")
    s.add_argument("--priority", type=int, default=30, help="Priority in nix-cache-info (30)")
    s.set_defaults(func="serve.cmd_serve")


#: every command's builder, in ``--help`` order (``optimize`` is ``optimise``'s alias)
COMMANDS = {
    "daemon": _daemon, "init": _init, "add": _add, "add-text": _add_text, "query": _query,
    "path-info": _path_info, "dump": _dump, "restore": _restore, "gc": _gc, "roots": _roots, "du": _du,
    "profile": _profile,
    "why-alive": _why_alive, "delete": _delete, "verify": _verify, "optimise": _optimise,
    "optimize": _optimise, "stats": _stats, "add-root": _add_root, "remove-root": _remove_root,
    "sync-roots": _sync_roots, "tcp-key": _tcp_key, "build": _build, "key": _key, "sign": _sign,
    "copy": _copy, "cache": _cache, "serve": _serve,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser: with ``command``, only that command's subparser (see above)."""
    p = argparse.ArgumentParser(prog="storekeeper", description="A Nix-compatible package store.")
    p.add_argument("--store", metavar="URL", help="store URL: DIR (chroot root), local?root=DIR, "
                   "local?store=S&state=T&log=L, unix://SOCKET, daemon, ssh-ng://[USER@]HOST, "
                   "tcp://HOST:PORT (default: $NIX_REMOTE, else the embedded store under the "
                   "user's data dir)")
    p.add_argument("--version", action="version", version=f"storekeeper {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    only = COMMANDS.get(command) if command is not None else None
    for build in (only,) if only is not None else dict.fromkeys(COMMANDS.values()):
        build(sub)
    return p


def named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs, if nothing before it but ``--store`` could change what
    the parser does (``-h``, ``--version``): else None, and the full parser is built."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-"):
            return a if a in COMMANDS else None
        if a.startswith("--store="):
            i += 1
        elif a == "--store":
            i += 2
        else:
            return None
    return None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line parsed by argparse (``--help``, ``--version`` and usage errors exit)."""
    args = build_parser(named_command(argv)).parse_args(argv)
    if args.command == "verify":
        args.queries_only = verify_reads_only(args.repair, args.sigs)
    return args
