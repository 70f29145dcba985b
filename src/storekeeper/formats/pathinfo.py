"""ValidPathInfo: what the store knows about a valid path, and its text forms."""

from __future__ import annotations

from .frozen import Frozen
from .hashes import Hash
from .storepath import StoreDir, StorePath

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any


class ValidPathInfo(Frozen):
    """A frozen value, equal and hashed by all its fields (:class:`~.frozen.Frozen`)."""

    __slots__ = ("path", "nar_hash", "nar_size", "references", "deriver", "registration_time",
                 "ultimate", "sigs", "ca")
    _fields = __slots__
    path: StorePath
    nar_hash: Hash
    nar_size: int
    references: frozenset[StorePath]
    deriver: StorePath | None
    registration_time: int
    ultimate: bool
    sigs: frozenset[str]
    ca: str | None

    def __init__(self, path: StorePath, nar_hash: Hash, nar_size: int,
                 references: frozenset[StorePath] = frozenset(), deriver: StorePath | None = None,
                 registration_time: int = 0, ultimate: bool = False,
                 sigs: frozenset[str] = frozenset(), ca: str | None = None) -> None:
        self._init(path=path, nar_hash=nar_hash, nar_size=nar_size, references=references,
                   deriver=deriver, registration_time=registration_time, ultimate=ultimate,
                   sigs=sigs, ca=ca)

    def with_(self, **changes: Any) -> ValidPathInfo:
        """A copy with ``changes`` (field names) made."""
        return self._replace(**changes)

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


class RegistrationRecord:
    """One entry of the ``--dump-db`` / ``--load-db`` text format (spec §4.5)."""

    __slots__ = ("path", "nar_hash_base16", "nar_size", "deriver", "references")

    def __init__(self, path: str, nar_hash_base16: str, nar_size: int, deriver: str = "",
                 references: list[str] | None = None) -> None:
        self.path = path
        self.nar_hash_base16 = nar_hash_base16
        self.nar_size = nar_size
        self.deriver = deriver
        self.references = [] if references is None else references

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RegistrationRecord) and other.__class__ is self.__class__:
            return all(getattr(self, f) == getattr(other, f) for f in self.__slots__)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"RegistrationRecord({fields})"

    def render(self) -> str:
        lines = [self.path, self.nar_hash_base16, str(self.nar_size), self.deriver,
                 str(len(self.references)), *self.references]
        return "".join(line + "\n" for line in lines)


def render_registrations(records: Iterable[RegistrationRecord]) -> str:
    return "".join(r.render() for r in records)
