"""Store paths: ``<storeDir>/<hashPart>-<name>`` and how Nix computes them.

Parsing is strict by default (what we ever write); ``lax=True`` also accepts
the names ``.`` and ``..`` (and names starting ``.-``/``..-``), as 2.8 does.
Unlike 2.8, the ``-`` after the hash part is required in both modes: 2.8
takes any character there (``<hash>/x`` or ``<hash>Xfoo`` parse), which lets
a name that is no store path's be taken for one.  See spec §1.
"""

from __future__ import annotations

import posixpath

from .errors import FormatError
from .hashes import NIX32_ALPHABET, Hash, compress_hash, new_hasher, nix32_encode

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Iterable

HASH_LEN = 32
MAX_NAME_LEN = 211
DRV_EXT = ".drv"
DEFAULT_STORE_DIR = "/nix/store"

#: the characters of a store path name (a set, not a regex: no ``re`` at import, cold start)
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-._?=")
_HASH_CHARS = frozenset(NIX32_ALPHABET)


class StorePathError(FormatError):
    """A string is not a store path of the expected store dir."""


def check_name(name: str, lax: bool = False) -> str:
    if not name:
        raise StorePathError("store path name is empty")
    if len(name) > MAX_NAME_LEN:
        raise StorePathError(f"store path name {name[:40]!r}… is longer than {MAX_NAME_LEN} characters")
    if not _NAME_CHARS.issuperset(name):
        bad = next(c for c in name if c not in _NAME_CHARS)
        raise StorePathError(f"store path name {name!r} contains the forbidden character {bad!r}")
    if not lax and (name in (".", "..") or name.startswith((".-", "..-"))):
        raise StorePathError(f"store path name {name!r} is not allowed")
    return name


class StorePath:
    """The base name of a store path; ordered as Nix orders StorePathSet.  A frozen
    value (a plain class, not a dataclass: cold start, see :class:`~.hashes.Hash`)."""

    __slots__ = ("base",)
    base: str

    def __init__(self, base: str) -> None:
        object.__setattr__(self, "base", base)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field '{name}' of a StorePath")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field '{name}' of a StorePath")

    def __repr__(self) -> str:
        return f"StorePath(base={self.base!r})"

    def __reduce__(self) -> tuple[type[StorePath], tuple[str]]:
        return (self.__class__, (self.base,))

    def __hash__(self) -> int:
        return hash((self.base,))

    # same class only, as the dataclass compared (a str is never equal to a StorePath)
    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self.base == other.base
        return NotImplemented

    def __lt__(self, other: StorePath) -> bool:
        if other.__class__ is self.__class__:
            return self.base < other.base
        return NotImplemented

    def __le__(self, other: StorePath) -> bool:
        if other.__class__ is self.__class__:
            return self.base <= other.base
        return NotImplemented

    def __gt__(self, other: StorePath) -> bool:
        if other.__class__ is self.__class__:
            return self.base > other.base
        return NotImplemented

    def __ge__(self, other: StorePath) -> bool:
        if other.__class__ is self.__class__:
            return self.base >= other.base
        return NotImplemented

    @classmethod
    def from_base(cls, base: str, lax: bool = False) -> "StorePath":
        if len(base) < HASH_LEN + 2:
            raise StorePathError(f"{base!r} is too short to be a store path")
        hash_part = base[:HASH_LEN]
        if not _HASH_CHARS.issuperset(hash_part):
            raise StorePathError(f"{base!r} does not start with a nix32 hash")
        if base[HASH_LEN] != "-":
            raise StorePathError(f"{base!r} has no '-' after its hash part")
        check_name(base[HASH_LEN + 1 :], lax=lax)
        return cls(base)

    @classmethod
    def make(cls, hash_part: str, name: str) -> "StorePath":
        return cls.from_base(f"{hash_part}-{name}")

    @property
    def hash_part(self) -> str:
        return self.base[:HASH_LEN]

    @property
    def name(self) -> str:
        return self.base[HASH_LEN + 1 :]

    @property
    def is_derivation(self) -> bool:
        return self.base.endswith(DRV_EXT)

    def __str__(self) -> str:
        return self.base


class StoreDir:
    """A logical store directory (``/nix/store`` or a custom one) and its path rules.
    A frozen value (a plain class, not a dataclass: cold start, see :class:`~.hashes.Hash`)."""

    __slots__ = ("path",)
    path: str

    def __init__(self, path: str = DEFAULT_STORE_DIR) -> None:
        if not path.startswith("/") or posixpath.normpath(path) != path:
            raise StorePathError(f"store dir {path!r} must be an absolute, canonical path")
        object.__setattr__(self, "path", path)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field '{name}' of a StoreDir")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field '{name}' of a StoreDir")

    def __repr__(self) -> str:
        return f"StoreDir(path={self.path!r})"

    def __reduce__(self) -> tuple[type[StoreDir], tuple[str]]:
        return (self.__class__, (self.path,))

    def __hash__(self) -> int:
        return hash((self.path,))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StoreDir) and other.__class__ is self.__class__:
            return self.path == other.path
        return NotImplemented

    def print(self, sp: StorePath) -> str:
        return f"{self.path}/{sp.base}"

    def parse(self, path: str, lax: bool = False) -> StorePath:
        """Parse a full store path (no sub-path allowed)."""
        canon = posixpath.normpath(path) if path.startswith("/") else path
        parent, base = posixpath.split(canon)
        if parent != self.path:
            raise StorePathError(f"path '{path}' is not in the Nix store")
        return StorePath.from_base(base, lax=lax)

    def is_store_path(self, path: str) -> bool:
        try:
            self.parse(path)
        except StorePathError:
            return False
        return True

    def is_in_store(self, path: str) -> bool:
        return path.startswith(self.path + "/") and len(path) > len(self.path) + 1

    def split(self, path: str, lax: bool = False) -> tuple[StorePath, str]:
        """Split a path inside the store into its store path and the rest (``""`` or ``/…``)."""
        if not self.is_in_store(path):
            raise StorePathError(f"path '{path}' is not in the Nix store")
        rest = path[len(self.path) + 1 :]
        base, sep, sub = rest.partition("/")
        return StorePath.from_base(base, lax=lax), sep + sub

    # --- computing paths (spec §1.4) -----------------------------------------

    def make_path(self, kind: str, inner: Hash, name: str) -> StorePath:
        """makeStorePath: ``kind`` already carries any ``:ref`` suffixes."""
        check_name(name)
        if inner.algo != "sha256":
            raise FormatError("store path inner hashes are SHA-256")
        fingerprint = f"{kind}:sha256:{inner.base16}:{self.path}:{name}"
        h = new_hasher("sha256")
        h.update(fingerprint.encode())
        digest = compress_hash(h.digest(), 20)
        return StorePath(f"{nix32_encode(digest)}-{name}")

    def _kind_with_refs(self, kind: str, refs: Iterable[StorePath], self_ref: bool) -> str:
        parts = [kind]
        parts.extend(self.print(r) for r in sorted(set(refs)))
        if self_ref:
            parts.append("self")
        return ":".join(parts)

    def make_text_path(self, name: str, content_hash: Hash, refs: Iterable[StorePath] = ()) -> StorePath:
        if content_hash.algo != "sha256":
            raise FormatError("text paths require a SHA-256 content hash")
        return self.make_path(self._kind_with_refs("text", refs, False), content_hash, name)

    def make_text_path_for(self, name: str, text: bytes, refs: Iterable[StorePath] = ()) -> StorePath:
        return self.make_text_path(name, Hash.of("sha256", text), refs)

    def make_fixed_output_path(
        self,
        name: str,
        recursive: bool,
        h: Hash,
        refs: Iterable[StorePath] = (),
        self_ref: bool = False,
    ) -> StorePath:
        """Path of a fixed-output (``--add-fixed``) or source (``--add``) addition."""
        refs = list(refs)
        if recursive and h.algo == "sha256":
            return self.make_path(self._kind_with_refs("source", refs, self_ref), h, name)
        if refs or self_ref:
            raise FormatError("fixed-output paths other than recursive SHA-256 cannot have references")
        inner = Hash.of("sha256", fixed_output_inner(recursive, h).encode())
        return self.make_path("output:out", inner, name)

    def make_output_path(self, output: str, drv_hash: bytes, drv_name: str) -> StorePath:
        """Path of an input-addressed derivation output from hashDerivationModulo."""
        return self.make_path(f"output:{output}", Hash("sha256", drv_hash), output_path_name(drv_name, output))


def fixed_output_inner(recursive: bool, h: Hash) -> str:
    return f"fixed:out:{'r:' if recursive else ''}{h.algo}:{h.base16}:"


def output_path_name(drv_name: str, output: str) -> str:
    return drv_name if output == "out" else f"{drv_name}-{output}"
