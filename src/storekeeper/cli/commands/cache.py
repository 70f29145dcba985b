"""Binary caches and signatures: ``key generate``, ``key public``, ``sign``, ``copy``,
``cache info``, ``cache log``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from ..common import UsageError, is_local, local_of, resolve_path, valid

if TYPE_CHECKING:
    from typing import Callable

    from ...cache import BinaryCache
    from ...formats.signatures import PublicKey, SecretKey
    from ...formats.storepath import StorePath
    from ..common import Store


def _read_secret(path: str) -> SecretKey:
    from ...formats.signatures import SecretKey
    try:
        with open(path) as f:
            return SecretKey.parse(f.read())
    except OSError as e:
        raise UsageError(f"cannot read secret key file '{path}': {e.strerror}") from None


def _write_new(path: str, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise UsageError(f"'{path}' exists already; not overwriting a key file") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)  # no trailing newline, as Nix writes key files


def cmd_key_generate(store: None, args: argparse.Namespace) -> int:
    from ...formats.signatures import SecretKey
    key = SecretKey.generate(args.name)
    _write_new(args.secret, key.render(), 0o600)
    if args.public:
        _write_new(args.public, key.public().render(), 0o644)
    else:
        print(key.public().render())
    return 0


def cmd_key_public(store: None, args: argparse.Namespace) -> int:
    print(_read_secret(args.secret).public().render())
    return 0


def cmd_sign(store: Store, args: argparse.Namespace) -> int:
    from ...formats.signatures import sign_info
    keys = [_read_secret(k) for k in args.key]
    roots = [valid(store, p) for p in args.paths]
    paths = store.query_closure(roots) if args.recursive else set(roots)
    added = 0
    for p in sorted(paths):
        info = store.path_info(p)
        new = {sign_info(store.store_dir, info, k) for k in keys} - info.sigs
        if new:
            store.add_signatures(p, sorted(new))
            added += len(new)
    print(f"added {added} signatures", file=sys.stderr)
    return 0


def trusted_keys(args: argparse.Namespace) -> dict[str, PublicKey]:
    """``trusted-public-keys`` (nix.conf, or ``--trusted-public-keys``) and the public
    halves of the readable ``secret-key-files`` (spec §5.3): the store's own rule."""
    from ...store import signing
    from ...store.settings import StoreSettings, environment_settings
    settings = StoreSettings().with_settings(environment_settings())  # nix.conf, NIX_CONFIG
    if args.trusted_public_keys is not None:
        settings = settings.with_settings([("trusted-public-keys", args.trusted_public_keys)])
    return signing.trusted_keys(settings)


def cmd_copy(store: Store, args: argparse.Namespace) -> int:
    from ...cache import open_cache
    from ...cache.copy import copy_from_cache, copy_to_cache
    from ...cache.gc import copy_with_lease
    from ..progress import Progress
    bar = Progress("copying")
    log = None if args.json or args.quiet else bar.log

    def progress(done: int, total: int, nar_bytes: int) -> None:
        bar.label = f"copying ({nar_bytes / 2**20:.1f} MiB)"
        bar.update(done, total)
    if args.from_ and (args.root or args.root_ttl or args.keep):
        raise UsageError("--root, --root-ttl and --keep go with --to")
    if args.logs and not args.to:
        raise UsageError("--logs goes with --to")
    logs: list[StorePath] = []
    cache = open_cache(args.to or args.from_)
    try:
        if args.to:
            paths: list[StorePath] = [valid(store, p) for p in args.paths]
            jobs = args.jobs if args.jobs else (min(4, os.cpu_count() or 1) if is_local(store) else 1)
            if not is_local(store):
                jobs = 1  # one daemon connection: NARs come one after the other
            # a lease while uploading (the cache may be collected meanwhile: docs/CACHE-GC.md)
            if args.no_lease:
                if args.root:
                    raise UsageError("--root needs the lease (drop --no-lease)")
                result = copy_to_cache(store, cache, paths, jobs=jobs, log=log, progress=progress)
            else:
                result = copy_with_lease(store, cache, paths, root=args.root,
                                         root_ttl=args.root_ttl, keep=args.keep, jobs=jobs,
                                         log=log, progress=progress)
            if args.logs:
                logs = _copy_logs(store, cache, result.copied + result.skipped, log)
        else:
            paths = [_store_path(store, p) for p in args.paths]
            local = is_local(store)
            # require-sigs = false (nix.conf, NIX_CONFIG) lets unsigned paths in, as in Nix;
            # a daemon decides by its own require-sigs
            check = not args.no_check_sigs and _require_sigs()
            result = copy_from_cache(cache, store, paths, trusted_keys(args), check_sigs=check,
                                     store_checks_sigs=not local and not args.no_check_sigs,
                                     log=log, progress=progress,
                                     jobs=args.jobs or (16 if local else 1))
    finally:
        bar.close()
        cache.close()
    if args.json:
        out = result.to_json(store.print_path)
        if args.logs:
            out["logs"] = [store.print_path(d) for d in logs]
        print(json.dumps(out))
    return 0


def _copy_logs(store: Store, cache: BinaryCache, paths: list[StorePath],
               log: Callable[[str], None] | None) -> list[StorePath]:
    """Upload the build log of each path's deriver that this local store has."""
    from ...build.logs import read_build_log
    from ...cache.logs import add_build_log
    local = local_of(store)
    if local is None:
        raise UsageError("copy --logs reads the build logs of a local store (a daemon does not "
                         "send them)")
    done: list[StorePath] = []
    drvs = {p if p.is_derivation else store.path_info(p).deriver for p in paths}
    for drv in sorted(d for d in drvs if d is not None):
        data = read_build_log(local.layout.log_dir, drv.base)
        if data is None:
            continue
        add_build_log(cache, drv, data)
        done.append(drv)
        if log:
            log(f"copied build log of '{store.print_path(drv)}' to '{cache.url}'")
    return done


def _require_sigs() -> bool:
    from ...build import SubstituteSettings
    from ...store.settings import environment_settings
    return SubstituteSettings().with_settings(environment_settings()).require_sigs


def _store_path(store: Store, arg: str) -> StorePath:
    if arg.startswith(store.store_dir.path + "/"):
        return store.store_dir.parse(arg)
    return resolve_path(store, arg)


def cmd_cache_log(store: None, args: argparse.Namespace) -> int:
    """``nix log --store URL PATH…``: each log on stdout, Nix's words on stderr."""
    from ...cache import CacheError, open_cache
    from ...cache.logs import build_log
    from ...errors import InvalidPath
    from ...formats.storepath import StoreDir
    cache = open_cache(args.url)
    try:
        info = cache.info()
        if info is None:
            raise CacheError(f"'{cache.url}' does not appear to be a binary cache")
        sd = StoreDir(info.store_dir)
        for arg in args.paths:
            sp = sd.parse(arg if arg.startswith("/") else f"{sd.path}/{arg}")
            found = build_log(cache, sd, sp)
            if found is None:
                raise InvalidPath(f"build log of '{sd.print(sp)}' is not available")
            print(f"got build log for '{sd.print(sp)}' from '{cache.url}'", file=sys.stderr)
            sys.stdout.buffer.write(found[1])
            sys.stdout.flush()
    finally:
        cache.close()
    return 0


def cmd_cache_info(store: None, args: argparse.Namespace) -> int:
    from ...cache import CacheError, open_cache
    cache = open_cache(args.url)
    try:
        info = cache.info()
        if info is None:
            raise CacheError(f"'{cache.url}' does not appear to be a binary cache")
        out = {"url": cache.url, "storeDir": info.store_dir,
               "wantMassQuery": cache.want_mass_query, "priority": cache.priority}
    finally:
        cache.close()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"URL: {out['url']}\nStoreDir: {out['storeDir']}\n"
              f"WantMassQuery: {int(bool(out['wantMassQuery']))}\nPriority: {out['priority']}")
    return 0
