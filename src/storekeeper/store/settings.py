"""Settings: nix.conf syntax, and the store's own settings (GC, optimise).

nix.conf is read from ``$NIX_CONF_DIR/nix.conf`` (default ``/etc/nix``), as
Nix reads it: ``name = value`` lines, ``#`` comments, ``include`` /
``!include``, ``extra-NAME`` appending to list settings.  Unknown names are
kept and reported, never fatal.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Mapping

from ..errors import StoreError

_MAX_INCLUDE_DEPTH = 8


def parse_nix_conf(text: str, origin: str = "<nix.conf>", base_dir: str | None = None,
                   settings: list[tuple[str, str]] | None = None,
                   depth: int = 0) -> list[tuple[str, str]]:
    """Parse nix.conf syntax into ``(name, value)`` pairs, in file order."""
    settings = [] if settings is None else settings
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0]
        tokens = line.split()
        if not tokens:
            continue
        if tokens[0] in ("include", "!include"):
            if len(tokens) != 2:
                raise StoreError(f"{origin}:{lineno}: syntax error in include line")
            if depth >= _MAX_INCLUDE_DEPTH:
                raise StoreError(f"{origin}:{lineno}: includes nested too deeply")
            path = os.path.join(base_dir or ".", tokens[1])
            try:
                with open(path, encoding="utf-8") as f:
                    inner = f.read()
            except FileNotFoundError:
                if tokens[0] == "!include":
                    continue
                raise StoreError(f"{origin}:{lineno}: file '{path}' included from here does not exist")
            parse_nix_conf(inner, path, os.path.dirname(path), settings, depth + 1)
            continue
        if len(tokens) < 2 or tokens[1] != "=":
            raise StoreError(f"{origin}:{lineno}: expected 'name = value', got {shlex.quote(raw.strip())}")
        settings.append((tokens[0], " ".join(tokens[2:])))
    return settings


def read_nix_conf(path: str) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return parse_nix_conf(text, path, os.path.dirname(path))


def nix_conf_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return os.path.join(env.get("NIX_CONF_DIR") or "/etc/nix", "nix.conf")


def parse_bool(name: str, value: str) -> bool:
    v = value.strip()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise StoreError(f"setting '{name}': '{value}' is not a Boolean")


def parse_size(name: str, value: str) -> int:
    v = value.strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(v[-1:].upper(), 1)
    try:
        return int(v[:-1] if mult != 1 else v) * mult
    except ValueError:
        raise StoreError(f"setting '{name}': '{value}' is not a size") from None


@dataclass(frozen=True)
class StoreSettings:
    """What the local store itself obeys (nix.conf names with '-' for '_')."""

    keep_outputs: bool = False
    keep_derivations: bool = True
    min_free: int = 0                   # 0: auto-GC off
    max_free: int = 2**64 - 1
    min_free_check_interval: int = 5    # seconds
    auto_optimise_store: bool = False
    # storekeeper's own: how long an unreadable indirect root (NFS home, other
    # host) keeps what it last pointed at (seconds)
    indirect_root_grace: int = 14 * 86400
    # Runtime roots: scanned in /proc by the GC ("proc", as Nix), reported by
    # clients and held for runtime-root-lease seconds ("client"), or both.
    runtime_roots: str = "both"
    runtime_root_lease: int = 3600
    unknown: tuple[str, ...] = field(default=(), compare=False)

    def with_settings(self, pairs: Iterable[tuple[str, str]]) -> "StoreSettings":
        changes: dict[str, object] = {}
        unknown = list(self.unknown)
        for name, value in pairs:
            attr = name.replace("-", "_")
            if attr not in _FIELDS or attr == "unknown":
                unknown.append(name)
            elif attr == "runtime_roots":
                if value.strip() not in ("proc", "client", "both"):
                    raise StoreError(f"setting '{name}': '{value}' is not one of proc, client, both")
                changes[attr] = value.strip()
            elif isinstance(getattr(self, attr), bool):
                changes[attr] = parse_bool(name, value)
            else:
                changes[attr] = parse_size(name, value)
        return replace(self, unknown=tuple(unknown), **changes)  # type: ignore[arg-type]

    @classmethod
    def from_nix_conf(cls, env: Mapping[str, str] | None = None) -> "StoreSettings":
        return cls().with_settings(read_nix_conf(nix_conf_path(env)))


_FIELDS = {f.name for f in fields(StoreSettings)}
