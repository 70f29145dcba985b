"""The substitution operations (spec binary-cache.md §9.3): HasSubstitutes (3),
QuerySubstitutablePathInfo (21), QuerySubstitutablePathInfos (30),
QuerySubstitutablePaths (32); and :func:`substituters`, the caches a request of this
client may use, for EnsurePath, BuildPaths, QueryMissing and QueryValidPaths.

The caches are the daemon's ``substituters`` with the client's SetOptions: its
``substituters`` override (an untrusted client's is already cut down to
``trusted-substituters`` by the settings table), ``useSubstitutes``, ``tryFallback``.
Signature keys and ``require-sigs`` are the daemon's unless the client is trusted.
"""

from __future__ import annotations

from dataclasses import replace

from ...build import Substituters, SubstituteSettings
from ...errors import StoreError
from ...formats.wire import MAX_PATH_LEN, Op
from ..errors import OpError
from ..registry import op
from ..session import Session


def substituters(s: Session) -> Substituters:
    store_settings = getattr(s.store, "settings", None)
    base = SubstituteSettings(
        substituters=s.config.substituters, require_sigs=s.config.require_sigs,
        max_substitution_jobs=s.config.max_substitution_jobs,
        trusted_public_keys=getattr(store_settings, "trusted_public_keys",
                                    SubstituteSettings().trusted_public_keys),
        secret_key_files=getattr(store_settings, "secret_key_files", ()),
        )
    try:
        settings = base.with_settings(s.options.overrides.items())
    except StoreError as e:
        raise OpError(str(e)) from None
    # SetOptions' fixed fields win over the overrides, as in Nix
    settings = replace(settings, substitute=s.options.use_substitutes,
                       fallback=s.options.try_fallback)
    return Substituters(s.store, settings, s)


def _infos(s: Session, paths):
    subs = substituters(s)
    try:
        return subs.query_many(p for p in paths if not s.store.is_valid(p))
    except StoreError as e:
        raise OpError(str(e)) from None
    finally:
        subs.close()


def _write_info(s: Session, ni) -> None:
    s.w.string(s.sd.print(ni.deriver) if ni.deriver else "")
    s.w.store_paths(s.sd, ni.references)
    s.w.u64(ni.file_size or 0).u64(ni.nar_size)


@op(Op.HasSubstitutes)
def has_substitutes(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    subs = substituters(s)
    try:
        have = subs.mass_query([sp])
    finally:
        subs.close()
    s.stop_work()
    s.w.boolean(sp in have)


@op(Op.QuerySubstitutablePaths)
def query_substitutable_paths(s: Session) -> None:
    paths = s.r.store_paths(s.sd, "paths", lax=True)
    s.start_work()
    subs = substituters(s)
    try:
        have = subs.mass_query(paths)
    finally:
        subs.close()
    s.stop_work()
    s.w.store_paths(s.sd, have)


@op(Op.QuerySubstitutablePathInfo)
def query_substitutable_path_info(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    found = _infos(s, [sp])
    s.stop_work()
    s.w.u64(1 if sp in found else 0)
    if sp in found:
        _write_info(s, found[sp])


@op(Op.QuerySubstitutablePathInfos)
def query_substitutable_path_infos(s: Session) -> None:
    # the optional CA per path lets a cache of another store dir answer for a CA
    # path; storekeeper only consults caches of its own store dir
    paths = [s.sd.parse(text, lax=True)
             for text in s.r.string_map("paths", item_limit=MAX_PATH_LEN)]
    s.start_work()
    found = _infos(s, paths)
    s.stop_work()
    s.w.u64(len(found))
    for p in sorted(found):
        s.w.store_path(s.sd, p)
        _write_info(s, found[p])


__all__ = ["substituters"]
