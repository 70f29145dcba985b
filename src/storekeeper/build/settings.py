"""What builds obey (:class:`BuildSettings`), and whether a store can run builders
at all (:func:`build_refusal`).

Builds on a store whose store dir is not real (a chroot store: logical
``/nix/store``, files elsewhere) run in the sandbox (:mod:`.sandbox`), whose bind
mounts make that store dir exist; where the kernel allows no sandbox they are
refused with a clear error.  Paths that are already valid are realised on any
store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from ..config import settings as settings_table
from ..store.settings import apply_settings, environment_settings
from . import confine, sandbox

_d = settings_table.default_of


@dataclass(frozen=True)
class BuildSettings:
    """What builds obey (nix.conf names with '-' for '_'); defaults, parsing and
    meaning are in :mod:`storekeeper.config.settings`."""

    #: None: Nix's default, ``nixbld`` when the daemon runs as root, else none
    build_users_group: str | None = None
    max_jobs: int = field(default_factory=_d("max-jobs"))
    cores: int = field(default_factory=_d("cores"))
    timeout: int = field(default_factory=_d("timeout"))                  # seconds, 0: none
    max_silent_time: int = field(default_factory=_d("max-silent-time"))  # seconds, 0: none
    keep_failed: bool = field(default_factory=_d("keep-failed"))
    keep_going: bool = field(default_factory=_d("keep-going"))
    #: "true", "false" or "relaxed" (:mod:`.sandbox` says what each means)
    sandbox: str = field(default_factory=_d("sandbox"))
    sandbox_fallback: bool = field(default_factory=_d("sandbox-fallback"))
    sandbox_paths: tuple[str, ...] = field(default_factory=_d("sandbox-paths"))
    sandbox_build_dir: str = field(default_factory=_d("sandbox-build-dir"))
    sandbox_dev_shm_size: str = field(default_factory=_d("sandbox-dev-shm-size"))
    allowed_impure_host_deps: tuple[str, ...] = field(default_factory=_d("allowed-impure-host-deps"))
    compress_build_log: bool = field(default_factory=_d("compress-build-log"))
    keep_build_log: bool = field(default_factory=_d("keep-build-log"))
    log_lines: int = field(default_factory=_d("log-lines"))
    max_build_log_size: int = field(default_factory=_d("max-build-log-size"))  # bytes, 0: none
    system: str = field(default_factory=_d("system"))
    extra_platforms: tuple[str, ...] = field(default_factory=_d("extra-platforms"))
    system_features: tuple[str, ...] = field(default_factory=_d("system-features"))
    #: run as the daemon after each successful build ("": none)
    post_build_hook: str = field(default_factory=_d("post-build-hook"))
    #: run as the builder's user on an output ``--check`` found different, with run_diff_hook
    diff_hook: str = field(default_factory=_d("diff-hook"))
    run_diff_hook: bool = field(default_factory=_d("run-diff-hook"))
    #: where build dirs are made; None: ``$TMPDIR`` or ``/tmp``, as Nix 2.8
    build_dir: str | None = field(default_factory=_d("build-dir"))
    #: NO_NEW_PRIVS and a seccomp filter (no setuid/setgid files, no xattrs) for every
    #: builder (:mod:`~storekeeper.build.confine`); false: neither, as Nix 2.8
    filter_syscalls: bool = field(default_factory=_d("filter-syscalls"))
    #: (name, value): what a fixed-output build's ``impureEnvVars`` get instead of the
    #: building process's environment (:mod:`.environment` says why that one)
    impure_env: tuple[tuple[str, str], ...] = field(default_factory=_d("impure-env"))
    #: not a nix.conf setting: whether this client may have a builder run as the daemon's
    #: own user (no build users).  The daemon sets it per connection (trusted, or the
    #: daemon's own uid); the local CLI on its own store keeps the default.
    client_may_build_as_daemon: bool = True

    @property
    def group(self) -> str:
        """The effective build users group ("" = build as the daemon's own user)."""
        if self.build_users_group is None:
            return "nixbld" if os.geteuid() == 0 else ""
        return self.build_users_group or ""

    def _replace(self, **changes: Any) -> BuildSettings:
        """``dataclasses.replace``: what :func:`~storekeeper.store.settings.apply_settings` calls."""
        return replace(self, **changes)

    def with_settings(self, pairs: Iterable[tuple[str, str]]) -> "BuildSettings":
        """Apply nix.conf-style settings in order; names builds do not use are ignored."""
        return apply_settings(self, settings_table.BUILD, pairs)

    @classmethod
    def from_nix_conf(cls, env: Mapping[str, str] | None = None) -> "BuildSettings":
        return cls().with_settings(environment_settings(env))


def build_refusal(store, settings: BuildSettings) -> str | None:
    """Why ``store`` cannot run builders at all (None if it can)."""
    if sandbox.diverted(store) and sandbox.unavailable():
        return (f"builds need a store whose store dir is real on this machine, or the sandbox "
                f"(this store's '{store.store_dir.path}' is kept in '{store.real_store_dir}', "
                f"and {sandbox.unavailable()})")
    if store.read_only:
        return "the store is read-only"
    if settings.filter_syscalls and confine.native_arch() is None:
        return (f"storekeeper has no seccomp filter for '{os.uname().machine}' "
                "(set 'filter-syscalls = false' to build without one)")
    # Without build users the builder runs as the daemon's own uid (confine.py says
    # what that allows): only for clients that could change the store anyway --
    # unless every build is sandboxed: then it is uid 1000 of a user namespace that
    # sees its inputs, its build dir and nothing of the daemon's (sandbox.py).  Not
    # for root: uid 1000 would be host root, which owns files even a sandbox shows
    # (its /proc).
    if os.geteuid() != 0 and (settings.sandbox == "true" or sandbox.diverted(store)) \
            and not sandbox.unavailable():
        return None
    as_daemon = not (settings.group and os.geteuid() == 0)
    return confine.self_build_refusal(as_daemon, settings.client_may_build_as_daemon)
