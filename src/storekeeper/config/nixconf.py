"""nix.conf syntax, as Nix reads it.

nix.conf is read from ``$NIX_CONF_DIR/nix.conf`` (default ``/etc/nix``):
``name = value`` lines, ``#`` comments, ``include`` / ``!include`` (relative
to the including file; ``!include`` of a missing file is skipped), nested at
most :data:`MAX_INCLUDE_DEPTH` deep.  This module only turns text into
``(name, value)`` pairs in file order; what a name means (and ``extra-NAME``)
is the settings table's business (:mod:`.settings`).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Mapping

MAX_INCLUDE_DEPTH = 8


#: what ``shlex.quote`` leaves unquoted (shlex imports ``re``: spelt out for the cold start)
_SHELL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-")


def _shell_quote(s: str) -> str:
    """``shlex.quote``: ``s`` as one shell word."""
    if not s:
        return "''"
    if _SHELL_SAFE.issuperset(s):
        return s
    return "'" + s.replace("'", "'\"'\"'") + "'"


class SettingError(ValueError):
    """A nix.conf file or a setting's value is malformed (the message names it)."""


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
                raise SettingError(f"{origin}:{lineno}: syntax error in include line")
            if depth >= MAX_INCLUDE_DEPTH:
                raise SettingError(f"{origin}:{lineno}: includes nested too deeply")
            path = os.path.join(base_dir or ".", tokens[1])
            try:
                with open(path, encoding="utf-8") as f:
                    inner = f.read()
            except FileNotFoundError:
                if tokens[0] == "!include":
                    continue
                raise SettingError(f"{origin}:{lineno}: file '{path}' included from here does not exist") \
                    from None
            parse_nix_conf(inner, path, os.path.dirname(path), settings, depth + 1)
            continue
        if len(tokens) < 2 or tokens[1] != "=":
            raise SettingError(f"{origin}:{lineno}: expected 'name = value', got {_shell_quote(raw.strip())}")
        settings.append((tokens[0], " ".join(tokens[2:])))
    return settings


def read_nix_conf(path: str) -> list[tuple[str, str]]:
    """The pairs of the file at ``path``; a missing file has none."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return parse_nix_conf(text, path, os.path.dirname(path))


def nix_conf_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return os.path.join(env.get("NIX_CONF_DIR") or "/etc/nix", "nix.conf")


def environment_settings(env: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """nix.conf, then ``NIX_CONFIG`` (as Nix reads them)."""
    env = os.environ if env is None else env
    path = nix_conf_path(env)
    pairs = read_nix_conf(path)
    if env.get("NIX_CONFIG"):
        pairs += parse_nix_conf(env["NIX_CONFIG"], "NIX_CONFIG", os.path.dirname(path))
    return pairs
