"""The data model of a store derivation, and its type (input-addressed, fixed,
floating, deferred, impure)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from ..errors import FormatError
from ..hashes import ALGO_SIZES, Hash

ReadDrv = Callable[[str], "Derivation"]
_T = TypeVar("_T")

class DerivationParseError(FormatError):
    """A ``.drv`` text is malformed; ``offset`` is the byte where parsing stopped."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at byte {offset}")
        self.offset = offset


def _encode(s: str, what: str) -> bytes:
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise FormatError(f"{what} {s!r} cannot be encoded as bytes") from None


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


# --- data model ---------------------------------------------------------------


class OutputKind(enum.Enum):
    """The five output tuples of spec §3.1."""

    INPUT_ADDRESSED = "input-addressed"
    FIXED = "fixed"
    FLOATING = "floating"
    DEFERRED = "deferred"
    IMPURE = "impure"


class DerivationType(enum.Enum):
    """What ``derivation_type`` says a whole derivation is."""

    INPUT_ADDRESSED = "input-addressed"
    DEFERRED = "deferred"  # input-addressed, paths not known yet (CA inputs)
    CA_FIXED = "fixed"
    CA_FLOATING = "floating"
    IMPURE = "impure"


@dataclass(frozen=True, slots=True)
class DerivationOutput:
    """One ``(name, path, hashAlgo, hash)`` tuple, minus the name.

    ``hash_algo`` is ``[r:]<algo>`` (``r:`` = recursive/NAR) or ``""``.  The kind
    follows from which fields are empty (spec §3.1); a fixed output whose path
    is still ``""`` is what ``fill_output_paths`` takes as input.
    """

    path: str = ""
    hash_algo: str = ""
    hash: str = ""

    @property
    def kind(self) -> OutputKind:
        if self.hash_algo:
            if self.hash == "impure":
                return OutputKind.IMPURE
            return OutputKind.FIXED if self.hash else OutputKind.FLOATING
        if self.hash:
            raise FormatError(f"output hash {self.hash!r} has no hash algorithm")
        return OutputKind.INPUT_ADDRESSED if self.path else OutputKind.DEFERRED

    @property
    def is_input_addressed(self) -> bool:
        return self.kind is OutputKind.INPUT_ADDRESSED

    @property
    def is_fixed(self) -> bool:
        return self.kind is OutputKind.FIXED

    @property
    def is_floating(self) -> bool:
        return self.kind is OutputKind.FLOATING

    @property
    def is_deferred(self) -> bool:
        return self.kind is OutputKind.DEFERRED

    @property
    def is_impure(self) -> bool:
        return self.kind is OutputKind.IMPURE

    @property
    def recursive(self) -> bool:
        """NAR (``r:``) rather than flat hashing."""
        return self.hash_algo.startswith("r:")

    @property
    def algo(self) -> str:
        """The hash algorithm without the ``r:`` method prefix (``""`` if none)."""
        return self.hash_algo[2:] if self.recursive else self.hash_algo

    def fixed_hash(self) -> Hash:
        """The expected content hash of a fixed output."""
        if not self.is_fixed:
            raise FormatError("not a fixed output")
        return _parse_output_hash(self.algo, self.hash)


@dataclass(slots=True)
class Derivation:
    """A store derivation.

    Keys of ``input_drvs`` and members of ``input_srcs`` are full printed store
    paths.  Collections are unordered here; the printer sorts them byte-wise,
    as Nix's ``std::map``/``std::set`` do.  ``args`` keeps its order.
    """

    outputs: dict[str, DerivationOutput] = field(default_factory=dict)
    input_drvs: dict[str, frozenset[str]] = field(default_factory=dict)
    input_srcs: frozenset[str] = frozenset()
    platform: str = ""
    builder: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.outputs = dict(self.outputs)
        self.input_drvs = {p: frozenset(o) for p, o in self.input_drvs.items()}
        self.input_srcs = frozenset(self.input_srcs)
        self.args = list(self.args)
        self.env = dict(self.env)

    @property
    def name(self) -> str:
        """``env["name"]``: the name the derivation was instantiated with."""
        try:
            return self.env["name"]
        except KeyError:
            raise FormatError("derivation has no 'name' environment variable") from None

    @property
    def output_names(self) -> list[str]:
        return sorted(self.outputs, key=_sort_key)

    @property
    def references(self) -> frozenset[str]:
        """What the ``.drv`` file refers to: sources and input derivations."""
        return self.input_srcs | frozenset(self.input_drvs)


def _sort_key(s: str) -> bytes:
    # Nix orders std::string byte-wise; surrogate-escaped bytes must sort as
    # the bytes they stand for, which str ordering would not do.
    return s.encode("utf-8", "surrogateescape")


def _parse_output_hash(algo: str, text: str) -> Hash:
    """The canonical (lower-case base16) hash field of a fixed output."""
    size = ALGO_SIZES.get(algo)
    if size is None:
        raise FormatError(f"unknown hash algorithm '{algo}'")
    if len(text) != 2 * size or text.strip("0123456789abcdef"):
        raise FormatError(f"output hash '{text}' is not a lower-case base16 {algo} digest")
    return Hash(algo, bytes.fromhex(text))



# --- derivation type --------------------------------------------------------------


def derivation_type(drv: Derivation) -> DerivationType:
    """Classify ``drv`` as Nix's ``BasicDerivation::type()`` does.

    A fixed output must be the only output and be named ``out``; floating
    outputs must share one hash algorithm; kinds cannot be mixed.  Messages are
    Nix's.
    """
    if not drv.outputs:
        raise FormatError("must have at least one output")
    kinds = {o.kind for o in drv.outputs.values()}
    if len(kinds) > 1:
        raise FormatError("can't mix derivation output types")
    (kind,) = kinds
    if kind is OutputKind.FIXED:
        if len(drv.outputs) > 1:
            raise FormatError("only one fixed output is allowed for now")
        if "out" not in drv.outputs:
            raise FormatError('single fixed output must be named "out"')
        return DerivationType.CA_FIXED
    if kind is OutputKind.FLOATING:
        if len({o.algo for o in drv.outputs.values()}) > 1:
            raise FormatError("all floating outputs must use the same hash type")
        return DerivationType.CA_FLOATING
    return {
        OutputKind.INPUT_ADDRESSED: DerivationType.INPUT_ADDRESSED,
        OutputKind.DEFERRED: DerivationType.DEFERRED,
        OutputKind.IMPURE: DerivationType.IMPURE,
    }[kind]
