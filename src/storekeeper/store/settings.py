"""The store's own settings (GC, optimise, roots): a typed view of the settings table.

nix.conf syntax lives in :mod:`storekeeper.config.nixconf`, what each name
means in :mod:`storekeeper.config.settings`; both are re-exported here for
the store's callers.  A malformed value raises :class:`SettingsError` (a
``StoreError``).  Unknown names are kept in ``unknown`` and reported, never
fatal.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

from ..config import nixconf
from ..config import settings as table
from ..config.nixconf import SettingError, nix_conf_path
from ..errors import StoreError
from ..formats.frozen import Frozen

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Any

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


def settings_changes(view: Any, component: str,
                     pairs: Iterable[tuple[str, str]] | Mapping[str, str]) -> dict[str, Any]:
    """The fields ``pairs`` change in ``view`` through the settings table (component
    ``component``); for a view with an ``unknown`` field, also the names nobody knows."""
    pairs = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    unknown = list(getattr(view, "unknown", ())) if hasattr(view, "unknown") else None
    with as_store_error():
        changes = table.apply(view, component, pairs, unknown)
    if unknown is not None:
        changes["unknown"] = tuple(unknown)
    return changes


def apply_settings(view: Any, component: str,
                   pairs: Iterable[tuple[str, str]] | Mapping[str, str]) -> Any:
    """``view`` with ``pairs`` applied through the settings table (component ``component``):
    a new view, made by the view's ``_replace`` (``dataclasses.replace`` for a dataclass)."""
    return view._replace(**settings_changes(view, component, pairs))


class StoreSettings(Frozen):
    """What the local store itself obeys (nix.conf names with '-' for '_'; defaults,
    parsing and meaning in :mod:`storekeeper.config.settings`).  A frozen value
    (:class:`~storekeeper.formats.frozen.Frozen`); ``unknown`` takes no part in equality."""

    __slots__ = ("keep_outputs", "keep_derivations", "min_free", "max_free",
                 "min_free_check_interval", "gc_reserved_space", "fsync_store_paths",
                 "auto_optimise_store", "indirect_root_grace", "runtime_roots", "runtime_root_lease",
                 "max_root_registrations", "trusted_public_keys", "secret_key_files",
                 "keep_generations", "delete_generations_older_than", "root_ttl", "user_quota",
                 "keep_recently_used", "unknown")
    _fields = __slots__
    keep_outputs: bool
    keep_derivations: bool
    min_free: int                # 0: auto-GC off
    max_free: int
    min_free_check_interval: int
    gc_reserved_space: int
    fsync_store_paths: bool
    auto_optimise_store: bool
    indirect_root_grace: int
    runtime_roots: str
    runtime_root_lease: int
    max_root_registrations: int
    trusted_public_keys: tuple[str, ...]
    secret_key_files: tuple[str, ...]
    keep_generations: int                   # retention policies (storekeeper.store.policy)
    delete_generations_older_than: int
    root_ttl: tuple[tuple[str, int], ...]
    user_quota: int
    keep_recently_used: int
    unknown: tuple[str, ...]

    def __init__(self, **values: Any) -> None:
        """Every field by name (``keep_outputs=True``); a field not given has the
        settings table's default."""
        bad = set(values) - set(self._fields)
        if bad:
            raise TypeError(f"StoreSettings has no field '{sorted(bad)[0]}'")
        for name in self._fields[:-1]:
            if name not in values:
                values[name] = table.SETTINGS[name.replace("_", "-")].default_value()
        values.setdefault("unknown", ())
        self._init(**values)

    def _key(self) -> tuple[Any, ...]:
        return self._values()[:-1]  # not ``unknown`` (compare=False in the dataclass)

    def policies_active(self) -> bool:
        """Is any retention policy (:mod:`storekeeper.store.policy`) on?"""
        return bool(self.keep_generations or self.delete_generations_older_than or self.root_ttl
                    or self.user_quota or self.keep_recently_used)

    def with_settings(self, pairs: Iterable[tuple[str, str]]) -> "StoreSettings":
        return apply_settings(self, table.STORE, pairs)

    @classmethod
    def from_nix_conf(cls, env: Mapping[str, str] | None = None) -> "StoreSettings":
        return cls().with_settings(read_nix_conf(nix_conf_path(env)))
