"""The table of worker operations: ``OPS`` (opcode -> handler), filled by the modules of
:mod:`storekeeper.daemon.ops` as they are imported (the server imports them all once,
before it forks), and the small helpers every handler uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import InvalidPath
from ..formats.hashes import NIX32_ALPHABET
from ..formats.storepath import StorePath
from ..formats.wire import ExtOp, Op
from .errors import NotSupported

if TYPE_CHECKING:
    from .session import Session

U32 = 0xFFFFFFFF  # fields the real daemon reads with readInt
NIX32_CHARS = frozenset(NIX32_ALPHABET)


@dataclass(frozen=True)
class OpEntry:
    name: str
    handler: Callable[[Session], None]


OPS: dict[int, OpEntry] = {}


def op(code: Op | ExtOp):
    """Register the decorated function as the handler of ``code``."""
    def register(fn: Callable[[Session], None]) -> Callable[[Session], None]:
        OPS[int(code)] = OpEntry(code.name, fn)
        return fn
    return register


def not_supported(code: Op, detail: str = "") -> None:
    raise NotSupported(f"operation {int(code)} ({code.name}) is not supported yet"
                       + (f": {detail}" if detail else ""))


def invalid(s: Session, sp: StorePath) -> InvalidPath:
    return InvalidPath(f"path '{s.sd.print(sp)}' is not valid")


def info_or_fail(s: Session, sp: StorePath):
    info = s.store.query_path_info(sp)
    if info is None:
        raise invalid(s, sp)
    return info
