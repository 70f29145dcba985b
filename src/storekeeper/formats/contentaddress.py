"""Content addresses as stored in the DB ``ca`` column and sent on the wire.

Forms: ``text:sha256:<nix32>`` and ``fixed:<r:?><algo>:<nix32>`` (nix32 even for md5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .errors import FormatError
from .hashes import Hash
from .storepath import StoreDir, StorePath

TEXT = "text"
FLAT = "flat"
RECURSIVE = "recursive"


@dataclass(frozen=True, slots=True)
class ContentAddress:
    method: str  # TEXT, FLAT or RECURSIVE
    hash: Hash

    def __post_init__(self) -> None:
        if self.method not in (TEXT, FLAT, RECURSIVE):
            raise FormatError(f"unknown content-address method {self.method!r}")
        if self.method == TEXT and self.hash.algo != "sha256":
            raise FormatError("text content addresses are SHA-256")

    def render(self) -> str:
        if self.method == TEXT:
            return f"text:{self.hash.typed('nix32')}"
        r = "r:" if self.method == RECURSIVE else ""
        return f"fixed:{r}{self.hash.typed('nix32')}"

    def __str__(self) -> str:
        return self.render()

    @classmethod
    def parse(cls, text: str) -> "ContentAddress":
        prefix, sep, rest = text.partition(":")
        if not sep:
            raise FormatError(f"content address {text!r} has no method")
        if prefix == "text":
            return cls(TEXT, Hash.parse(rest))
        if prefix == "fixed":
            if rest.startswith("r:"):
                return cls(RECURSIVE, Hash.parse(rest[2:]))
            return cls(FLAT, Hash.parse(rest))
        raise FormatError(f"content address {text!r} has unknown method {prefix!r}")

    def store_path(self, store_dir: StoreDir, name: str, refs: Iterable[StorePath] = (),
                   self_ref: bool = False) -> StorePath:
        if self.method == TEXT:
            if self_ref:
                raise FormatError("text paths cannot refer to themselves")
            return store_dir.make_text_path(name, self.hash, refs)
        return store_dir.make_fixed_output_path(name, self.method == RECURSIVE, self.hash, refs, self_ref)
