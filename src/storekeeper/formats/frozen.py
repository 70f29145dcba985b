"""Frozen value classes without :mod:`dataclasses`.

Importing dataclasses (and :mod:`inspect`, which it needs) and generating each class's
methods cost ~10 ms of every command's start, more than Nix's whole ``nix-store -q``
(bench/startup.py, issue 12).  The values every command meets (store URLs and layouts,
path infos, settings) are :class:`Frozen` subclasses instead: what ``@dataclass(frozen=True)``
gave them, written once.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from typing import Any, Self


class Frozen:
    """A value whose fields (``_fields``, in order; each subclass lists its own fields in
    ``__slots__`` and sets them in ``__init__`` with :meth:`_init`) cannot be assigned
    after ``__init__``.  Instances are equal when of the same class with equal fields,
    hash by their fields, and show as ``Class(field=value, …)``, as a frozen dataclass."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def _init(self, **values: Any) -> None:
        for name in self._fields:
            object.__setattr__(self, name, values[name])

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, f) for f in self._fields])

    def _key(self) -> tuple[Any, ...]:
        """What equality and the hash compare: every field (a subclass may leave some out)."""
        return self._values()

    def _replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` made, through ``__init__`` (``dataclasses.replace``)."""
        unknown = set(changes) - set(self._fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field '{sorted(unknown)[0]}'")
        return self.__class__(**{f: changes[f] if f in changes else getattr(self, f)
                                 for f in self._fields})

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field '{name}' of a {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field '{name}' of a {type(self).__name__}")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Frozen) and other.__class__ is self.__class__:
            return self._key() == other._key()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.__class__, dict(zip(self._fields, self._values()))))


def _rebuild(cls: type[Frozen], values: dict[str, Any]) -> Frozen:
    return cls(**values)
