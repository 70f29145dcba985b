"""What a builtin builder prints, as Nix 2.8's builtins print it into the build log.

An error is one ``error:`` line (coloured as Nix colours it, continuation lines
indented under the message) on stderr, then exit status 1; the builder that ran
us reports "builder for '…' failed with exit code 1" with the log's last lines.
A warning is an ``@nix`` JSON log line (``{"action":"msg","level":1,…}``), which
the builder forwards to the client as a message rather than as a log line.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

RED = "\x1b[31;1m"
MAGENTA = "\x1b[35;1m"
NORMAL = "\x1b[0m"
#: width of "error: ": where Nix indents the lines after the first
_INDENT = " " * 7


class BuiltinError(Exception):
    """A failure to report as the build's error (``str(e)`` is the message, already
    formatted: arguments coloured where Nix colours them)."""


def shown(value: object) -> str:
    """An argument of a message, highlighted as Nix's formatter highlights it."""
    return f"{MAGENTA}{value}{NORMAL}"


def error_text(message: str) -> str:
    lines = message.split("\n")
    rest = [(_INDENT + line) if line else line for line in lines[1:]]
    return "\n".join([f"{RED}error:{NORMAL} {lines[0]}", *rest])


def emit(record: dict) -> None:
    """One ``@nix`` line (keys sorted and no spaces, as Nix's JSON logger writes them)."""
    line = "@nix " + json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def warn(message: str) -> None:
    emit({"action": "msg", "level": 1, "msg": f"{MAGENTA}warning:{NORMAL} {message}"})


class Activity:
    r"""An activity the builder reports (a download): ``start`` now, ``result``\s,
    ``stop`` on leaving the ``with``.  Ids are unique per process, as Nix's are."""

    _next = 0

    def __init__(self, level: int, act_type: int, text: str, fields: list[int | str]) -> None:
        Activity._next += 1
        self.id = (os.getpid() << 32) + Activity._next
        emit({"action": "start", "id": self.id, "level": level, "type": act_type, "text": text,
              "fields": fields})

    def result(self, result_type: int, fields: list[int | str]) -> None:
        emit({"action": "result", "id": self.id, "type": result_type, "fields": fields})

    def __enter__(self) -> "Activity":
        return self

    def __exit__(self, *exc: object) -> None:
        emit({"action": "stop", "id": self.id})


class Attrs:
    """The derivation's attributes as a builtin sees them (Nix hands its builtins the
    derivation's own variables): a missing one is Nix's error; one passed as a file
    (``passAsFile``) is read back from that file."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def get(self, name: str) -> str:
        if name in self.env:
            return self.env[name]
        if name in self.env.get("passAsFile", "").split() and name + "Path" in self.env:
            with open(self.env[name + "Path"], encoding="utf-8", errors="surrogateescape") as f:
                return f.read()
        raise BuiltinError(f"attribute '{shown(name)}' missing")

    def flag(self, name: str) -> bool:
        """A boolean attribute: Nix writes true as "1" and false as ""."""
        return self.env.get(name, "") == "1"
