"""The store's own settings (GC, optimise, roots): a typed view of the settings table.

nix.conf syntax lives in :mod:`storekeeper.config.nixconf`, what each name
means in :mod:`storekeeper.config.settings`; both are re-exported here for
the store's callers.  A malformed value raises :class:`SettingsError` (a
``StoreError``).  Unknown names are kept in ``unknown`` and reported, never
fatal.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Mapping

from ..config import nixconf
from ..config import settings as table
from ..config.nixconf import SettingError, nix_conf_path
from ..errors import StoreError

__all__ = ["SettingsError", "StoreSettings", "apply_settings", "nix_conf_path", "parse_bool",
           "parse_nix_conf", "parse_size", "read_nix_conf"]


class SettingsError(StoreError):
    """A nix.conf file or a setting is malformed."""


@contextmanager
def as_store_error() -> Iterator[None]:
    """Turn the settings table's :class:`SettingError` into a :class:`StoreError`."""
    try:
        yield
    except SettingError as e:
        raise SettingsError(str(e)) from None


def parse_nix_conf(*args, **kwargs) -> list[tuple[str, str]]:
    with as_store_error():
        return nixconf.parse_nix_conf(*args, **kwargs)


def read_nix_conf(path: str) -> list[tuple[str, str]]:
    with as_store_error():
        return nixconf.read_nix_conf(path)


def environment_settings(env: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    with as_store_error():
        return nixconf.environment_settings(env)


def parse_bool(name: str, value: str) -> bool:
    with as_store_error():
        return table.parse_bool(name, value)


def parse_size(name: str, value: str) -> int:
    with as_store_error():
        return table.parse_size(name, value)


def apply_settings(view, component: str, pairs: Iterable[tuple[str, str]] | Mapping[str, str]):
    """``view`` with ``pairs`` applied through the settings table (component ``component``);
    a view with an ``unknown`` field collects the names nobody knows."""
    pairs = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    unknown = list(getattr(view, "unknown", ())) if hasattr(view, "unknown") else None
    with as_store_error():
        changes = table.apply(view, component, pairs, unknown)
    if unknown is not None:
        changes["unknown"] = tuple(unknown)
    return replace(view, **changes)


_d = table.default_of


@dataclass(frozen=True)
class StoreSettings:
    """What the local store itself obeys (nix.conf names with '-' for '_'; defaults,
    parsing and meaning in :mod:`storekeeper.config.settings`)."""

    keep_outputs: bool = field(default_factory=_d("keep-outputs"))
    keep_derivations: bool = field(default_factory=_d("keep-derivations"))
    min_free: int = field(default_factory=_d("min-free"))                # 0: auto-GC off
    max_free: int = field(default_factory=_d("max-free"))
    min_free_check_interval: int = field(default_factory=_d("min-free-check-interval"))
    auto_optimise_store: bool = field(default_factory=_d("auto-optimise-store"))
    indirect_root_grace: int = field(default_factory=_d("indirect-root-grace"))
    runtime_roots: str = field(default_factory=_d("runtime-roots"))
    runtime_root_lease: int = field(default_factory=_d("runtime-root-lease"))
    max_root_registrations: int = field(default_factory=_d("max-root-registrations"))
    keep_generations: int = field(default_factory=_d("keep-generations"))
    delete_generations_older_than: int = field(default_factory=_d("delete-generations-older-than"))
    root_ttl: tuple[tuple[str, int], ...] = field(default_factory=_d("root-ttl"))
    user_quota: int = field(default_factory=_d("user-quota"))
    keep_recently_used: int = field(default_factory=_d("keep-recently-used"))
    unknown: tuple[str, ...] = field(default=(), compare=False)

    def with_settings(self, pairs: Iterable[tuple[str, str]]) -> "StoreSettings":
        return apply_settings(self, table.STORE, pairs)

    @classmethod
    def from_nix_conf(cls, env: Mapping[str, str] | None = None) -> "StoreSettings":
        return cls().with_settings(read_nix_conf(nix_conf_path(env)))
