"""``@nix {json}`` lines in a builder's log: structured messages from the builder.

A builder (our builtins, or any program that knows Nix's convention) may write
lines ``@nix {"action": …}`` to its log.  As Nix 2.8 does, such a line is
consumed here instead of being a build log line: it is not sent to the client
as a log line and is not among the "last N log lines" of a failure, but it stays
in the stored log file, byte for byte.  Actions: ``msg`` (a message at
``level``), ``start``/``stop``/``result`` (activities, children of the build's
activity, their ids mapped to ours).  A line that does not parse is reported
("bad JSON log message from builder: …") and is then a log line like any other.
"""

from __future__ import annotations

import json
from typing import Protocol, Sequence

PREFIX = b"@nix "
_ERROR = 0  # Verbosity.ERROR


class _Logger(Protocol):
    def log(self, level: int, message: str) -> None: ...

    def start_activity(self, level: int, act_type: int, text: str,
                       fields: Sequence[int | str] = (), parent: int = 0) -> int: ...

    def stop_activity(self, act_id: int) -> None: ...

    def result(self, act_id: int, result_type: int, fields: Sequence[int | str]) -> None: ...


def _fields(value: object) -> list[int | str]:
    if not isinstance(value, list):
        return []
    return [v if isinstance(v, (int, str)) and not isinstance(v, bool) else str(v) for v in value]


class BuilderJSONLog:
    """The ``@nix`` lines of one build, whose activity is ``parent``."""

    def __init__(self, logger: _Logger, parent: int) -> None:
        self.logger = logger
        self.parent = parent
        self.activities: dict[int, int] = {}  # the builder's id -> ours

    def handle(self, line: bytes) -> bool:
        """True if ``line`` was an ``@nix`` line (consumed), False for a log line."""
        if not line.startswith(PREFIX):
            return False
        try:
            msg = json.loads(line[len(PREFIX):].decode("utf-8", "surrogateescape"))
            if not isinstance(msg, dict):
                raise ValueError("not an object")
            self._act(msg)
        except (ValueError, KeyError, TypeError) as e:
            # (as Nix: reported, and then it is an ordinary log line after all)
            self.logger.log(_ERROR, f"bad JSON log message from builder: {e}")
            return False
        return True

    def _act(self, msg: dict) -> None:
        action = msg["action"]
        if action == "msg":
            self.logger.log(int(msg["level"]), str(msg["msg"]))
        elif action == "start":
            ours = self.logger.start_activity(int(msg.get("level", 0)), int(msg["type"]),
                                              str(msg.get("text", "")), _fields(msg.get("fields")),
                                              self.parent)
            self.activities[int(msg["id"])] = ours
        elif action == "stop":
            if (key := int(msg["id"])) in self.activities:
                self.logger.stop_activity(self.activities.pop(key))
        elif action == "result":
            found = self.activities.get(int(msg["id"]))
            if found is not None:
                self.logger.result(found, int(msg["type"]), _fields(msg.get("fields")))

    def close(self) -> None:
        """The build ended: activities it left open end with it."""
        for ours in self.activities.values():
            self.logger.stop_activity(ours)
        self.activities.clear()
