"""What builds obey (:class:`BuildSettings`), and whether a store can run builders
at all (:func:`build_refusal`).

Builds need a store whose store dir is real: a chroot store (logical
``/nix/store``, files elsewhere) would hand builders paths that do not exist on
this machine, and storekeeper has no sandbox to make them exist; such builds
are refused with a clear error.  Paths that are already valid are realised on
any store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from ..config import settings as settings_table
from ..store.settings import apply_settings, environment_settings
from . import confine

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
    sandbox: bool = field(default_factory=_d("sandbox"))
    compress_build_log: bool = field(default_factory=_d("compress-build-log"))
    keep_build_log: bool = field(default_factory=_d("keep-build-log"))
    log_lines: int = field(default_factory=_d("log-lines"))
    max_log_size: int = field(default_factory=_d("max-log-size"))        # bytes, 0: unlimited
    system: str = field(default_factory=_d("system"))
    extra_platforms: tuple[str, ...] = field(default_factory=_d("extra-platforms"))
    system_features: tuple[str, ...] = field(default_factory=_d("system-features"))
    #: where build dirs are made; None: ``$TMPDIR`` or ``/tmp``, as Nix 2.8
    build_dir: str | None = field(default_factory=_d("build-dir"))
    #: NO_NEW_PRIVS and a seccomp filter (no setuid/setgid files, no xattrs) for every
    #: builder (:mod:`~storekeeper.build.confine`); false: neither, as Nix 2.8
    filter_syscalls: bool = field(default_factory=_d("filter-syscalls"))
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
    if settings.sandbox:
        return "storekeeper has no build sandbox (set 'sandbox = false')"
    if store.store_dir.path != os.path.normpath(store.real_store_dir):
        return (f"builds need a store whose store dir is real on this machine, or the sandbox "
                f"(this store's '{store.store_dir.path}' is kept in '{store.real_store_dir}')")
    if store.read_only:
        return "the store is read-only"
    if settings.filter_syscalls and confine.native_arch() is None:
        return (f"storekeeper has no seccomp filter for '{os.uname().machine}' "
                "(set 'filter-syscalls = false' to build without one)")
    # Without build users the builder runs as the daemon's own uid (confine.py says
    # what that allows): only for clients that could change the store anyway.
    as_daemon = not (settings.group and os.geteuid() == 0)
    return confine.self_build_refusal(as_daemon, settings.client_may_build_as_daemon)
