"""SetOptions: what a client may set (the settings table decides), and the daemon's
build settings for a session."""

from __future__ import annotations

from dataclasses import replace

from ...build import BuildSettings
from ...config.nixconf import SettingError
from ...config.settings import client_may_set, lookup
from ...errors import StoreError
from ...formats.wire import (
    Op,
    Verbosity,
)
from ..errors import OpError
from ..registry import U32, op
from ..session import Session

# --- options ------------------------------------------------------------------

@op(Op.SetOptions)
def set_options(s: Session) -> None:
    """The fixed fields and the overrides go through one rule, the settings table's
    (``config.settings.client_may_set``): a trusted client may set anything; an
    untrusted one only what the table allows, e.g. ``timeout`` only lower than the
    daemon's.  What is refused is ignored, as by the real daemon (which only logs it at
    debug level), with a warning when the client asked for a real change."""
    r = s.r
    keep_failed = r.u64("keepFailed", U32)
    keep_going = r.u64("keepGoing", U32)
    try_fallback = r.u64("tryFallback", U32)
    verbosity = r.u64("verbosity", U32)
    max_build_jobs = r.u64("maxBuildJobs", U32)
    max_silent_time = r.u64("maxSilentTime", U32)
    r.u64("useBuildHook", U32)  # obsolete
    verbose_build = r.u64("verboseBuild", U32)
    r.u64("logType", U32)  # obsolete
    r.u64("printBuildTrace", U32)  # obsolete
    build_cores = r.u64("buildCores", U32)
    use_substitutes = r.u64("useSubstitutes", U32)
    overrides = r.string_map("overrides", limit=1 << 16)
    s.start_work()
    o = s.options
    o.try_fallback = bool(try_fallback)
    o.verbosity = min(verbosity, Verbosity.VOMIT)
    o.verbose_build = verbose_build == Verbosity.ERROR  # 0 means "verbose"
    o.use_substitutes = bool(use_substitutes)
    fixed = [("keep-failed", "true" if keep_failed else "false"),
             ("keep-going", "true" if keep_going else "false"),
             ("max-jobs", str(max_build_jobs)), ("max-silent-time", str(max_silent_time)),
             ("cores", str(build_cores))]
    base = build_base(s)
    o.overrides = {}
    for name, value in [*fixed, *overrides.items()]:
        setting, _ = lookup(name)
        accepted = client_may_set(name, value, s.trusted, lambda n: s.config.value_of(n, base),
                                  s.warn)
        if accepted is None:
            if setting is not None and name not in _FIXED_DEFAULTS_QUIET \
                    and _differs(setting, value, s.config.value_of(setting.name, base)):
                s.warn(f"ignoring setting '{name}': only trusted users may set it "
                       f"(to this value) on this daemon")
            continue
        o.overrides[name] = accepted
    try:
        applied = base.with_settings(o.overrides.items())
    except StoreError as e:
        o.overrides = {}
        raise OpError(str(e)) from None
    o.keep_failed, o.keep_going = applied.keep_failed, applied.keep_going
    o.max_build_jobs, o.max_silent_time = applied.max_jobs, applied.max_silent_time
    o.build_cores = applied.cores
    s.stop_work()


#: fixed fields every Nix client sends with its own defaults: no warning when refused
_FIXED_DEFAULTS_QUIET = {"max-jobs", "max-silent-time", "cores", "keep-going"}


def _differs(setting, value: str, current) -> bool:
    try:
        return setting.parse(setting.name, value) != current
    except SettingError:
        return True


def build_base(s: Session) -> BuildSettings:
    """The daemon's own build settings: given at start, else nix.conf (read once per
    connection), with the daemon's build-users-group."""
    base = s.build_base
    if base is None:
        base = BuildSettings.from_nix_conf()
        if s.config.build_users_group is not None:
            base = replace(base, build_users_group=s.config.build_users_group)
        s.build_base = base
    return base
