"""What a build request answers: the status of each target (Nix's ``BuildResult``
on the wire, spec §2), and the errors that fail a request or one goal.

A :class:`BuildResult` is final once set on a goal: the scheduler never changes
it again, and only the statuses in ``_SUCCESS`` count as the target realised.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..errors import StoreError
from ..formats.storepath import StorePath


class BuildStatus(enum.IntEnum):
    """BuildResult.Status on the wire (spec §2)."""

    BUILT = 0
    SUBSTITUTED = 1
    ALREADY_VALID = 2
    PERMANENT_FAILURE = 3
    INPUT_REJECTED = 4
    OUTPUT_REJECTED = 5
    TRANSIENT_FAILURE = 6
    CACHED_FAILURE = 7
    TIMED_OUT = 8
    MISC_FAILURE = 9
    DEPENDENCY_FAILED = 10
    LOG_LIMIT_EXCEEDED = 11
    NOT_DETERMINISTIC = 12
    RESOLVES_TO_ALREADY_VALID = 13
    NO_SUBSTITUTERS = 14


class BuildMode(enum.IntEnum):
    NORMAL = 0
    REPAIR = 1
    CHECK = 2


_SUCCESS = {BuildStatus.BUILT, BuildStatus.SUBSTITUTED, BuildStatus.ALREADY_VALID,
            BuildStatus.RESOLVES_TO_ALREADY_VALID}


@dataclass
class BuildResult:
    """The outcome for one target.

    ``built_outputs`` maps each wanted output of a derivation target to its
    (now valid) path; ``output_hashes`` holds the derivation's hashModulo per
    output, which names those outputs on the wire (``sha256:<hex>!out``).
    """

    status: BuildStatus
    error_msg: str = ""
    times_built: int = 0
    is_non_deterministic: bool = False
    start_time: int = 0
    stop_time: int = 0
    #: CPU time of the build in microseconds (None: not measured; protocol 1.37)
    cpu_user: int | None = None
    cpu_system: int | None = None
    built_outputs: dict[str, StorePath] = field(default_factory=dict)
    output_hashes: dict[str, bytes] = field(default_factory=dict)
    #: False for failures that are only a consequence (cancelled, nothing to
    #: substitute from): Nix reports them as "build of … failed", not by message
    own_error: bool = True

    @property
    def success(self) -> bool:
        return self.status in _SUCCESS


class BuildError(StoreError):
    """A build request failed as a whole (the message is Nix's)."""


class Failure(Exception):
    """One goal failed with ``status`` (the message is Nix's); the scheduler turns
    it into that goal's :class:`BuildResult`, the other goals go on."""

    def __init__(self, status: BuildStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
