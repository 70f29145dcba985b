"""Binary-cache metadata as text: ``<hash>.narinfo``, ``nix-cache-info``, NAR file names.

Rendering is byte-exact with Nix 2.8 (spec binary-cache.md §3.1): fields in its
order, ``References: `` always written (with its trailing space when empty),
signatures sorted, ``CA`` last, ``System`` never written unless set.

Parsing is strict where Nix 2.8 would misread (a line must be ``Name: value``;
the file must end with a newline; a repeated single-valued field is an error)
and lenient exactly where the spec says Nix is (§3.2): unknown names are
ignored, a missing ``Compression`` means ``bzip2``, ``FileHash``/``FileSize``
are optional, hashes may be in any typed or SRI form, a missing
``References`` means none, ``Deriver: unknown-deriver`` means no deriver.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .errors import FormatError
from .hashes import Hash
from .pathinfo import ValidPathInfo
from .storepath import StoreDir, StorePath

#: compression method -> NAR file extension (spec §4.1; gzip really has none)
EXTENSIONS = {"xz": ".xz", "bzip2": ".bz2", "zstd": ".zst", "br": ".br", "none": "",
              "gzip": "", "lzip": ".lzip", "lz4": ".lz4"}
#: what storekeeper writes and reads (the others are libarchive's alone)
WRITABLE = ("xz", "bzip2", "zstd", "br", "none", "gzip")
DEFAULT_COMPRESSION = "xz"
#: Nix's default when a narinfo has no Compression line
MISSING_COMPRESSION = "bzip2"
UNKNOWN_DERIVER = "unknown-deriver"


class NarInfoError(FormatError):
    """A narinfo or nix-cache-info text is malformed (the message names the file)."""


def nar_url(file_hash: Hash, compression: str) -> str:
    """``nar/<nix32 FileHash>.nar<ext>``: the key of a NAR file in a cache."""
    if compression not in EXTENSIONS:
        raise FormatError(f"unknown compression method '{compression}'")
    return f"nar/{file_hash.nix32}.nar{EXTENSIONS[compression]}"


def narinfo_key(sp: StorePath) -> str:
    return f"{sp.hash_part}.narinfo"


def listing_key(sp: StorePath) -> str:
    return f"{sp.hash_part}.ls"


@dataclass(frozen=True, slots=True)
class NarInfo:
    """One ``.narinfo``: a path's metadata plus where its (compressed) NAR is."""

    store_dir: StoreDir
    path: StorePath
    url: str
    nar_hash: Hash
    nar_size: int
    compression: str = DEFAULT_COMPRESSION
    file_hash: Hash | None = None
    file_size: int | None = None
    references: frozenset[StorePath] = frozenset()
    deriver: StorePath | None = None
    system: str = ""
    sigs: frozenset[str] = frozenset()
    ca: str | None = None

    def with_(self, **changes: Any) -> "NarInfo":
        return replace(self, **changes)

    # --- text ------------------------------------------------------------------

    def render(self) -> str:
        sd = self.store_dir
        lines = [f"StorePath: {sd.print(self.path)}", f"URL: {self.url}",
                 f"Compression: {self.compression}"]
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash.typed('nix32')}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines.append(f"NarHash: {self.nar_hash.typed('nix32')}")
        lines.append(f"NarSize: {self.nar_size}")
        lines.append("References: " + " ".join(sorted(r.base for r in self.references)))
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver.base}")
        if self.system:
            lines.append(f"System: {self.system}")
        lines.extend(f"Sig: {s}" for s in sorted(self.sigs))
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str | bytes, store_dir: StoreDir, where: str = "narinfo") -> "NarInfo":
        """Parse a narinfo; ``where`` names it in errors (e.g. ``<hash>.narinfo``)."""
        return _parse(text, store_dir, where)

    # --- the store's view ---------------------------------------------------------

    def path_info(self) -> ValidPathInfo:
        return ValidPathInfo(self.path, self.nar_hash, self.nar_size, self.references,
                             self.deriver, sigs=self.sigs, ca=self.ca)

    @classmethod
    def from_path_info(cls, store_dir: StoreDir, info: ValidPathInfo, url: str,
                       compression: str, file_hash: Hash | None, file_size: int | None) -> "NarInfo":
        return cls(store_dir, info.path, url, info.nar_hash, info.nar_size, compression,
                   file_hash, file_size, info.references, info.deriver, "", info.sigs, info.ca)


_SINGLE = {"StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
           "Deriver", "System", "CA"}


def _lines(text: str | bytes, where: str) -> list[tuple[int, str, str]]:
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise NarInfoError(f"{where} is not valid UTF-8") from None
    if text and not text.endswith("\n"):
        raise NarInfoError(f"{where} is corrupt: its last line has no newline")
    out = []
    for n, line in enumerate(text.split("\n")[:-1], 1):
        name, sep, value = line.partition(": ")
        if not sep or not name or ":" in name:
            raise NarInfoError(f"{where} line {n}: expected 'Name: value', got {line[:80]!r}")
        out.append((n, name, value))
    return out


def _parse(text: str | bytes, sd: StoreDir, where: str) -> NarInfo:
    fields: dict[str, str] = {}
    refs: list[StorePath] = []
    sigs: set[str] = set()
    seen_refs = False
    for n, name, value in _lines(text, where):
        def bad(problem: str, n: int = n, name: str = name) -> NarInfoError:
            return NarInfoError(f"{where} line {n} ({name}): {problem}")
        if name == "References":
            if seen_refs and refs:
                raise bad("a second References line")
            seen_refs = True
            try:
                refs.extend(StorePath.from_base(b) for b in value.split(" ") if b)
            except FormatError as e:
                raise bad(str(e)) from None
        elif name == "Sig":
            if not value or " " in value:
                raise bad(f"signature {value!r} is empty or contains a space")
            sigs.add(value)
        elif name in _SINGLE:
            if name in fields:
                raise bad("field given twice")
            fields[name] = value
    try:
        return _build(fields, refs, sigs, sd)
    except NarInfoError as e:
        raise NarInfoError(f"{where}: {e}") from None
    except FormatError as e:
        raise NarInfoError(f"{where} is corrupt: {e}") from None


def _size(fields: dict[str, str], name: str) -> int | None:
    v = fields.get(name)
    if v is None:
        return None
    if not v.isdigit() or not v.isascii() or len(v) > 20:
        raise NarInfoError(f"{name} {v!r} is not a decimal number")
    return int(v)


def _hash(fields: dict[str, str], name: str) -> Hash | None:
    v = fields.get(name)
    if v is None:
        return None
    try:
        return Hash.parse(v)
    except FormatError as e:
        raise NarInfoError(f"{name}: {e}") from None


def _build(fields: dict[str, str], refs: list[StorePath], sigs: set[str], sd: StoreDir) -> NarInfo:
    for required in ("StorePath", "NarHash", "URL", "NarSize"):
        if not fields.get(required):
            raise NarInfoError(f"is corrupt: no {required}")
    nar_size = _size(fields, "NarSize")
    if not nar_size:
        raise NarInfoError("is corrupt: NarSize is 0")
    nar_hash = _hash(fields, "NarHash")
    assert nar_hash is not None
    deriver = fields.get("Deriver")
    ca = fields.get("CA")
    if ca is not None and not ca:
        raise NarInfoError("CA is empty")
    return NarInfo(
        store_dir=sd,
        path=sd.parse(fields["StorePath"]),
        url=fields["URL"],
        nar_hash=nar_hash,
        nar_size=nar_size,
        compression=fields.get("Compression", MISSING_COMPRESSION),
        file_hash=_hash(fields, "FileHash"),
        file_size=_size(fields, "FileSize"),
        references=frozenset(refs),
        deriver=None if deriver in (None, "", UNKNOWN_DERIVER) else StorePath.from_base(deriver),
        system=fields.get("System", ""),
        sigs=frozenset(sigs),
        ca=ca,
    )


# --- nix-cache-info -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CacheInfo:
    """``nix-cache-info``: the store dir a cache is for, and its defaults (spec §2)."""

    store_dir: str
    want_mass_query: bool = False
    priority: int = 0
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def render(self) -> str:
        out = f"StoreDir: {self.store_dir}\n"
        if self.want_mass_query:
            out += "WantMassQuery: 1\n"
        if self.priority:
            out += f"Priority: {self.priority}\n"
        return out

    @classmethod
    def parse(cls, text: str | bytes, where: str = "nix-cache-info") -> "CacheInfo":
        """Nix's lenient reading: lines without ``:`` skipped, values trimmed, unknown
        names kept aside; but ``StoreDir`` must be there and ``Priority`` a number."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        values: dict[str, str] = {}
        for line in text.split("\n"):
            name, sep, value = line.partition(":")
            if sep:
                values[name] = value.strip()
        store_dir = values.pop("StoreDir", "")
        if not store_dir:
            raise NarInfoError(f"{where} has no StoreDir")
        prio = values.pop("Priority", "0")
        try:
            priority = int(prio)
        except ValueError:
            raise NarInfoError(f"{where}: Priority {prio!r} is not a number") from None
        wmq = values.pop("WantMassQuery", "") == "1"
        return cls(store_dir, wmq, priority, values)
