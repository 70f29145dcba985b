"""Substitution: realising store paths by downloading them from binary caches
(spec binary-cache.md §9) instead of building them.

:class:`Substituters` is the list of caches one request may use (``substituters``
in priority order, stable sort, each URL opened once; one that cannot be opened
or is for another store dir is warned about and skipped), with the checks that
decide whether a cache's copy may be used: a signature by a key in
``trusted-public-keys`` unless the path is content-addressed, ``require-sigs`` is
off, or the cache is ``?trusted=1``.

The signature rule and the import step (download, decode, check while streaming,
``add_nar``) are :mod:`storekeeper.cache.copy`'s, shared with ``copy --from``.

Invariant, **pin, then import, references first**: a path is pinned (temp root)
before its validity is checked and before it is registered, and it is registered
only after every one of its references is valid; so a concurrent GC never sees a
substituted path without its closure, nor deletes a path a client was just given.
A closure is fetched ``max-substitution-jobs`` paths at a time
(:mod:`storekeeper.cache.fetch`, which keeps the rule for batches); what fails there
is retried one by one from the next cache, where the errors are said as before.

Answers of http(s)/s3 caches are kept in the narinfo disk cache
(:mod:`.narinfo_cache`) with Nix's TTLs.

Falling through: a narinfo that is absent, a NAR that is gone (404: Nix's
``SubstituteGone``), a corrupt NAR, a bad signature: the next cache is tried.  A
cache whose narinfo look-up fails for another reason (unreachable, malformed)
stops the substitution unless ``fallback`` is on, as Nix 2.8.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

from ..cache import BinaryCache, NarMissing, open_cache
from ..cache.copy import import_nar, make_room, signed_enough, stage_from
from ..cache.fetch import Job, can_stage, fetch_all, fetch_threads
from ..config import settings as settings_table
from ..errors import StoreError
from ..formats.errors import FormatError
from ..formats.narinfo import NarInfo
from ..formats.signatures import PublicKey
from ..formats.storepath import StorePath
from ..formats.wire import ActivityType, Verbosity
from ..fs.crash import crash_point
from ..queries import references_first
from ..store.settings import apply_settings
from ..store.signing import trusted_keys
from .logger import BuildLogger, NullLogger
from .narinfo_cache import NarInfoDiskCache, disk_cached

_d = settings_table.default_of


@dataclass(frozen=True)
class SubstituteSettings:
    """What substitution obeys (nix.conf names with '-' for '_'; defaults, parsing and
    client rules in :mod:`storekeeper.config.settings`)."""

    substituters: tuple[str, ...] = field(default_factory=_d("substituters"))
    trusted_public_keys: tuple[str, ...] = field(default_factory=_d("trusted-public-keys"))
    secret_key_files: tuple[str, ...] = field(default_factory=_d("secret-key-files"))
    require_sigs: bool = field(default_factory=_d("require-sigs"))
    max_substitution_jobs: int = field(default_factory=_d("max-substitution-jobs"))
    #: SetOptions' ``useSubstitutes``
    substitute: bool = field(default_factory=_d("substitute"))
    #: SetOptions' ``tryFallback``
    fallback: bool = field(default_factory=_d("fallback"))
    narinfo_cache_negative_ttl: int = field(default_factory=_d("narinfo-cache-negative-ttl"))
    narinfo_cache_positive_ttl: int = field(default_factory=_d("narinfo-cache-positive-ttl"))

    def _replace(self, **changes: Any) -> "SubstituteSettings":
        return replace(self, **changes)

    def with_settings(self, pairs: Iterable[tuple[str, str]]) -> "SubstituteSettings":
        return apply_settings(self, settings_table.SUBSTITUTE, pairs)

    def public_keys(self) -> dict[str, PublicKey]:
        """``trusted-public-keys`` plus the public halves of the readable
        ``secret-key-files`` (first key of a name wins, spec §5.3)."""
        return trusted_keys(self)


class Substituters:
    """The caches one request substitutes from (module docstring)."""

    def __init__(self, store, settings: SubstituteSettings,
                 logger: BuildLogger | None = None,
                 opener: Callable[[str], BinaryCache] = open_cache,
                 disk_cache: NarInfoDiskCache | None = None) -> None:
        """``disk_cache``: where http(s)/s3 answers are kept (None: the user's default
        file, opened when first needed)."""
        self.store = store
        self.sd = store.store_dir
        self.settings = settings
        self.logger = logger or NullLogger()
        self._opener = opener
        self._caches: list[BinaryCache] | None = None
        self._keys: Mapping[str, PublicKey] | None = None
        #: path -> True (valid now) / False (no cache could give it), this request
        self._done: dict[StorePath, bool] = {}
        self._disk: NarInfoDiskCache | None = disk_cache
        self._disk_failed = False
        self._own_disk = False
        #: (cache URL, path) -> narinfo or None: this request's answers (in front of the disk cache)
        self._memo: dict[tuple[str, StorePath], NarInfo | None] = {}
        #: (cache URL, path) whose download failed in this request: not tried again
        self._failed: set[tuple[str, StorePath]] = set()

    @property
    def enabled(self) -> bool:
        return self.settings.substitute and bool(self.caches())

    def caches(self) -> list[BinaryCache]:
        if self._caches is None:
            opened: list[BinaryCache] = []
            seen: set[str] = set()
            if self.settings.substitute:
                for url in self.settings.substituters:
                    if url in seen:
                        continue
                    seen.add(url)
                    try:
                        cache = self._opener(url)
                        cache.check_store_dir(self.sd)
                    except (StoreError, FormatError, OSError) as e:
                        self.logger.log(Verbosity.WARN,
                                        f"warning: substituter '{url}' is not used: {e}")
                        continue
                    opened.append(cache)
            opened.sort(key=lambda c: c.priority)  # stable: ties keep the configured order
            self._caches = opened
        return self._caches

    def keys(self) -> Mapping[str, PublicKey]:
        if self._keys is None:
            self._keys = self.settings.public_keys()
        return self._keys

    def close(self) -> None:
        for cache in self._caches or ():
            cache.close()
        if self._own_disk and self._disk is not None:
            self._disk.close()
            self._disk, self._own_disk = None, False

    # --- look-ups (no download, no signature check) --------------------------------

    def _disk_cache(self, cache: BinaryCache) -> NarInfoDiskCache | None:
        if not disk_cached(cache.url) or self._disk_failed:
            return None
        if self._disk is None:
            try:
                self._disk = NarInfoDiskCache()
                self._own_disk = True
            except (OSError, sqlite3.Error) as e:
                self._disk_failed = True
                self.logger.log(Verbosity.WARN, f"warning: the narinfo disk cache cannot be "
                                f"used: {e}")
                return None
        return self._disk

    def _ttls(self) -> tuple[int, int]:
        return (self.settings.narinfo_cache_positive_ttl, self.settings.narinfo_cache_negative_ttl)

    def _lookup(self, cache: BinaryCache, path: StorePath) -> NarInfo | None:
        if (cache.url, path) in self._memo:
            return self._memo[cache.url, path]
        ni = self._lookup_uncached(cache, path)
        self._memo[cache.url, path] = ni
        return ni

    def _lookup_uncached(self, cache: BinaryCache, path: StorePath) -> NarInfo | None:
        disk = self._disk_cache(cache)
        if disk is not None:
            known = disk.lookup(cache.url, self.sd, path.hash_part, *self._ttls())
            if known is not None and (known[1] is None or known[1].path == path):
                return known[1]
        act = self.logger.start_activity(
            Verbosity.TALKATIVE, ActivityType.QUERY_PATH_INFO,
            f"querying info about '{self.sd.print(path)}' on '{cache.url}'",
            [self.sd.print(path), cache.url])
        try:
            ni = cache.narinfo(self.sd, path)
            if disk is not None:
                disk.record(cache.url, self.sd, path.hash_part, ni)
            return ni
        except (StoreError, FormatError, OSError) as e:
            if not self.settings.fallback:
                raise StoreError(str(e)) from None
            self.logger.log(Verbosity.WARN, f"warning: {e}; trying the next substituter")
            return None
        finally:
            self.logger.stop_activity(act)

    def query(self, path: StorePath) -> tuple[BinaryCache, NarInfo] | None:
        """The first cache (priority order) with a narinfo for ``path``."""
        for cache in self.caches():
            ni = self._lookup(cache, path)
            if ni is not None:
                return cache, ni
        return None

    def prefetch(self, paths: Iterable[StorePath]) -> None:
        """Look ``paths`` up in every cache at once (each cache's threads), so that the
        :meth:`query` calls that follow are answered from memory; errors are left
        for those calls to meet."""
        try:
            self.query_many(paths)
        except StoreError:
            pass

    def query_many(self, paths: Iterable[StorePath]) -> dict[StorePath, NarInfo]:
        """First hit per path, every cache in priority order (QuerySubstitutablePathInfos)."""
        found: dict[StorePath, NarInfo] = {}
        left = sorted(set(paths))
        for cache in self.caches():
            if not left:
                break
            for p in [p for p in left if (cache.url, p) in self._memo]:
                ni = self._memo[cache.url, p]
                if ni is not None:
                    found[p] = ni
            left = [p for p in left if p not in found]
            disk = self._disk_cache(cache)
            ask = [p for p in left if (cache.url, p) not in self._memo]
            if disk is not None:
                ask = []
                for p in [p for p in left if (cache.url, p) not in self._memo]:
                    known = disk.lookup(cache.url, self.sd, p.hash_part, *self._ttls())
                    if known is None or (known[1] is not None and known[1].path != p):
                        ask.append(p)
                    elif known[1] is not None:
                        found[p] = known[1]
            try:
                got = cache.narinfos(self.sd, ask)
            except (StoreError, FormatError, OSError) as e:
                if not self.settings.fallback:
                    raise StoreError(str(e)) from None
                continue
            for p in ask:
                self._memo[cache.url, p] = got.get(p)
                if disk is not None:
                    disk.record(cache.url, self.sd, p.hash_part, got.get(p))
            found.update(got)
            left = [p for p in left if p not in found]
        return found

    def mass_query(self, paths: Iterable[StorePath]) -> set[StorePath]:
        """The paths some cache with ``WantMassQuery`` has (QuerySubstitutablePaths)."""
        left = set(paths)
        have: set[StorePath] = set()
        for cache in self.caches():
            if not left or not cache.want_mass_query:
                continue
            try:
                got = cache.has(sorted(left))
            except (StoreError, OSError):
                continue
            have |= got
            left -= got
        return have

    # --- substitution ----------------------------------------------------------------

    def realise(self, path: StorePath) -> bool:
        """Make ``path`` valid from a cache (references first); False if none could.
        Errors of a cache are logged and the next one tried (module docstring)."""
        done = self._done.get(path)
        if done is not None:
            return done
        if self.settings.max_substitution_jobs > 1 and can_stage(self.store) \
                and not self.store.pin_valid(path):
            self._realise_parallel(path)
        self._done[path] = False  # a reference cycle through ``path`` ends here
        ok = self._realise(path)
        self._done[path] = ok
        return ok

    def _realise(self, path: StorePath) -> bool:
        store, sd = self.store, self.sd
        if store.pin_valid(path):
            return True
        printed = sd.print(path)
        for cache in self.caches():
            if (cache.url, path) in self._failed:
                continue  # already failed in this request (and said so)
            ni = self._lookup(cache, path)
            if ni is None:
                continue
            info = ni.path_info()
            if self.settings.require_sigs and not signed_enough(cache, ni, self.keys()):
                self.logger.log(Verbosity.WARN, f"warning: the substitute for '{printed}' from "
                                f"'{cache.url}' is not signed by any of the keys in "
                                "'trusted-public-keys'")
                continue
            refs = sorted(info.references - {path})
            self.prefetch(r for r in refs if r not in self._done and not self.store.is_valid(r))
            failed = [r for r in refs if not self.realise(r)]
            if failed:
                self.logger.log(Verbosity.ERROR, f"error: some references of path '{printed}' "
                                "could not be realised")
                return False
            try:
                self._download(cache, ni)
            except NarMissing as e:
                # SubstituteGone: as if this cache never had the path
                self.logger.log(Verbosity.ERROR, f"error: {e}")
                continue
            except (StoreError, FormatError, OSError) as e:
                self.logger.log(Verbosity.ERROR, f"error: substituting '{printed}' from "
                                f"'{cache.url}' failed: {e}")
                continue
            return True
        return False

    def _acceptable(self, path: StorePath) -> tuple[BinaryCache, NarInfo] | None:
        """The first cache whose narinfo for ``path`` may be used (as :meth:`_realise`
        chooses, without its warnings: the one-by-one pass that follows says them)."""
        for cache in self.caches():
            if (cache.url, path) in self._failed:
                continue
            ni = self._lookup(cache, path)
            if ni is None:
                continue
            if self.settings.require_sigs and not signed_enough(cache, ni, self.keys()):
                continue
            return cache, ni
        return None

    def _plan(self, root: StorePath) -> dict[StorePath, tuple[BinaryCache, NarInfo]]:
        """The invalid paths of ``root``'s closure and where each comes from, references
        first, without those that cannot be had with all of their references (the
        one-by-one pass deals with them)."""
        plan: dict[StorePath, tuple[BinaryCache, NarInfo]] = {}
        seen: set[StorePath] = set()
        frontier = [root]
        while frontier:
            need = [p for p in dict.fromkeys(frontier) if p not in seen and
                    self._done.get(p) is None and not self.store.is_valid(p)]
            seen.update(frontier)
            self.prefetch(need)
            frontier = []
            for p in need:
                hit = self._acceptable(p)
                if hit is not None:
                    plan[p] = hit
                    frontier.extend(hit[1].references - {p})
        refs = {p: ni.references - {p} for p, (_, ni) in plan.items()}
        missing = {r for rs in refs.values() for r in rs if r not in plan
                   and not self._done.get(r) and not self.store.is_valid(r)}
        order = references_first(sorted(plan), lambda p: sorted(refs[p] & plan.keys()), self.sd.print)
        for p in order:  # references first: one pass drops every referrer of a missing path
            if refs[p] & missing:
                missing.add(p)
        return {p: plan[p] for p in order if p not in missing}

    def _realise_parallel(self, root: StorePath) -> None:
        """Substitute ``root``'s closure ``max-substitution-jobs`` paths at a time
        (:mod:`storekeeper.cache.fetch`: fetched in threads, registered here in
        batches, references first, each pinned before it is staged).  What fails is
        left to :meth:`_realise`, which tries the next cache and says why."""
        plan = self._plan(root)
        if len(plan) < 2:
            return
        jobs = {p: Job(p, ni.references & plan.keys() - {p}, stage_from(cache, self.store, ni))
                for p, (cache, ni) in plan.items()}
        acts: dict[StorePath, tuple[int, int]] = {}
        make_room(self.store, [ni for _, ni in plan.values()])

        def start(p: StorePath) -> None:
            cache = plan[p][0]
            printed = self.sd.print(p)
            self.store.pin(p)  # before it becomes valid
            crash_point("substitute.fetched")
            sub = self.logger.start_activity(Verbosity.ERROR, ActivityType.SUBSTITUTE, "",
                                             [printed, cache.url])
            act = self.logger.start_activity(
                Verbosity.INFO, ActivityType.COPY_PATH,
                f"copying path '{printed}' from '{cache.url}'", [printed, cache.url, "local"], sub)
            acts[p] = (sub, act)

        def stop(p: StorePath) -> None:
            sub, act = acts.pop(p)
            self.logger.stop_activity(act)
            self.logger.stop_activity(sub)

        def done(p: StorePath) -> None:
            crash_point("substitute.registered")
            stop(p)
            self._done[p] = True

        def failed(p: StorePath, e: BaseException | None) -> None:
            if p in acts:
                stop(p)
            if e is None:
                return  # a reference failed: the one-by-one pass says so
            cache = plan[p][0]
            self._failed.add((cache.url, p))
            if isinstance(e, NarMissing):
                self.logger.log(Verbosity.ERROR, f"error: {e}")
            else:
                self.logger.log(Verbosity.ERROR, f"error: substituting '{self.sd.print(p)}' "
                                f"from '{cache.url}' failed: {e}")
        fetch_all(self.store, jobs, fetch_threads(self.settings.max_substitution_jobs,
                                                  {cache for cache, _ in plan.values()}),
                  start, done, failed)

    def _download(self, cache: BinaryCache, ni: NarInfo) -> None:
        printed = self.sd.print(ni.path)
        sub = self.logger.start_activity(Verbosity.ERROR, ActivityType.SUBSTITUTE,
                                         "", [printed, cache.url])
        try:
            act = self.logger.start_activity(
                Verbosity.INFO, ActivityType.COPY_PATH,
                f"copying path '{printed}' from '{cache.url}'", [printed, cache.url, "local"], sub)
            try:
                self.store.pin(ni.path)  # before it becomes valid
                crash_point("substitute.fetched")
                # signatures were checked above (or the cache is trusted)
                import_nar(cache, self.store, ni, check_sigs=False)
                crash_point("substitute.registered")
            finally:
                self.logger.stop_activity(act)
        finally:
            self.logger.stop_activity(sub)


__all__ = ["SubstituteSettings", "Substituters"]
