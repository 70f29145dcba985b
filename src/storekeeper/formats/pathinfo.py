"""ValidPathInfo: what the store knows about a valid path, and its text forms."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from .hashes import Hash
from .storepath import StoreDir, StorePath


@dataclass(frozen=True, slots=True)
class ValidPathInfo:
    path: StorePath
    nar_hash: Hash
    nar_size: int
    references: frozenset[StorePath] = frozenset()
    deriver: StorePath | None = None
    registration_time: int = 0
    ultimate: bool = False
    sigs: frozenset[str] = frozenset()
    ca: str | None = None

    def with_(self, **changes: Any) -> "ValidPathInfo":
        return replace(self, **changes)

    def to_json(self, store_dir: StoreDir, closure_size: int | None = None) -> dict[str, Any]:
        """The object ``nix path-info --json`` prints for this path (2.8 field names)."""
        out: dict[str, Any] = {
            "path": store_dir.print(self.path),
            "narHash": self.nar_hash.typed("nix32"),
            "narSize": self.nar_size,
            "references": sorted(store_dir.print(r) for r in self.references),
        }
        if closure_size is not None:
            out["closureSize"] = closure_size
        if self.deriver is not None:
            out["deriver"] = store_dir.print(self.deriver)
        if self.registration_time:
            out["registrationTime"] = self.registration_time
        if self.ultimate:
            out["ultimate"] = True
        if self.sigs:
            out["signatures"] = sorted(self.sigs)
        if self.ca:
            out["ca"] = self.ca
        return out


@dataclass(slots=True)
class RegistrationRecord:
    """One entry of the ``--dump-db`` / ``--load-db`` text format (spec §4.5)."""

    path: str
    nar_hash_base16: str
    nar_size: int
    deriver: str = ""
    references: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [self.path, self.nar_hash_base16, str(self.nar_size), self.deriver,
                 str(len(self.references)), *self.references]
        return "".join(line + "\n" for line in lines)


def render_registrations(records: Iterable[RegistrationRecord]) -> str:
    return "".join(r.render() for r in records)
