"""Store derivations: the ATerm ``.drv`` format, hashDerivationModulo, output paths.

Spec §3.  Pure: files are never read here; whoever needs an input derivation
passes ``read_drv(drv_path) -> Derivation``.

String representation
    A ``.drv`` is a byte string and its strings may hold any byte (Nix strings
    are byte strings; env values are often not UTF-8).  Every string in the
    model is the *unescaped* byte string decoded as UTF-8 with
    ``surrogateescape``, and is encoded back the same way when printed.  That
    mapping is a bijection between all byte strings and the strs it produces,
    so ``print_derivation(parse_derivation(b)) == b`` holds for every ``b`` the
    parser accepts.  Strs holding surrogates outside U+DC80..U+DCFF cannot be
    printed (FormatError).

Canonical form
    The parser accepts exactly the texts that Nix 2.8's printer produces, so
    that parse → print is the identity.  Nix's own parser is laxer; every text
    it also accepts but we reject is one Nix would print differently, so no
    ``.drv`` written by Nix is affected.  Rejected here, accepted by Nix 2.8:
    trailing bytes after ``)``; env/outputs/input lists out of order or with
    duplicates (Nix keeps the first output, the last env entry); escapes other
    than ``\\" \\\\ \\n \\r \\t`` and raw LF/CR/TAB in escaped strings; any
    backslash in the fields Nix writes unescaped (output tuples, input paths and
    output names, input sources, platform); a fixed-output hash that is not
    lower-case base16; a hash field given without an algorithm (Nix ignores it).
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, NamedTuple, TypeVar

from .errors import FormatError
from .hashes import ALGO_SIZES, Hash
from .storepath import DRV_EXT, StoreDir, StorePath, StorePathError, output_path_name

__all__ = [
    "DerivationParseError",
    "OutputKind",
    "DerivationType",
    "DerivationOutput",
    "Derivation",
    "parse_derivation",
    "print_derivation",
    "derivation_type",
    "hash_derivation_modulo",
    "derivation_output_paths",
    "fill_output_paths",
    "fixed_output",
    "derivation_store_path",
    "check_derivation_outputs",
]

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


# --- parsing --------------------------------------------------------------------

# Escapes Nix's printer emits, and their meaning.
_UNESCAPE = {b'"': b'"', b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}
_MUST_ESCAPE = (b"\n", b"\r", b"\t")
# A whole quoted string: a backslash always takes the next byte with it, as in
# Nix's reader, so an escaped quote never ends the string.
_STRING = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)"', re.DOTALL)
_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)


class _Parser:
    __slots__ = ("data", "pos", "store_dir")

    def __init__(self, data: bytes, store_dir: StoreDir | None) -> None:
        self.data = data
        self.pos = 0
        self.store_dir = store_dir

    def fail(self, message: str, offset: int | None = None) -> DerivationParseError:
        return DerivationParseError(message, self.pos if offset is None else offset)

    def expect(self, lit: bytes) -> None:
        if not self.data.startswith(lit, self.pos):
            got = self.data[self.pos : self.pos + len(lit)]
            raise self.fail(f"expected {lit.decode()!r}, found {got!r}")
        self.pos += len(lit)

    def peek(self, lit: bytes) -> bool:
        return self.data.startswith(lit, self.pos)

    def string(self, escaped: bool) -> str:
        m = _STRING.match(self.data, self.pos)
        if m is None:
            if self.peek(b'"'):
                raise self.fail("unterminated string")
            raise self.fail("expected a string")
        body, at = m.group(1), m.start(1)
        self.pos = m.end()
        if escaped:
            for ch in _MUST_ESCAPE:
                k = body.find(ch)
                if k >= 0:
                    raise self.fail(f"unescaped {ch!r} in string", at + k)
        if b"\\" in body:
            if not escaped:
                raise self.fail("backslash in a string Nix writes unescaped", at + body.index(b"\\"))

            def unescape(e: re.Match[bytes]) -> bytes:
                repl = _UNESCAPE.get(e.group(1))
                if repl is None:
                    raise self.fail("non-canonical escape sequence", at + e.start())
                return repl

            body = _ESCAPE.sub(unescape, body)
        return _decode(body)

    def list_of(self, item: Callable[[], _T]) -> list[_T]:
        """``[item,item,...]``; the items are returned in file order."""
        self.expect(b"[")
        items: list[_T] = []
        if self.peek(b"]"):
            self.pos += 1
            return items
        while True:
            items.append(item())
            if self.peek(b"]"):
                self.pos += 1
                return items
            self.expect(b",")

    def sorted_keys(self, keys: list[tuple[str, int]], what: str) -> None:
        """Nix writes ``std::map``/``std::set`` contents: strictly ascending bytes."""
        prev: bytes | None = None
        for key, offset in keys:
            cur = _sort_key(key)
            if prev is not None and cur <= prev:
                kind = "duplicate" if cur == prev else "out-of-order"
                raise self.fail(f"{kind} {what} {key!r}", offset)
            prev = cur

    def path(self, what: str) -> str:
        offset = self.pos
        return self.check_path(self.string(escaped=False), offset, what)

    def check_path(self, p: str, offset: int, what: str) -> str:
        if not p.startswith("/"):
            raise self.fail(f"bad path '{p}' in derivation ({what})", offset)
        if self.store_dir is not None:
            try:
                # 2.8 parses store paths laxly (spec §1.1); mirror its acceptance.
                self.store_dir.parse(p, lax=True)
            except StorePathError as e:
                raise self.fail(f"{what}: {e}", offset) from None
        return p

    def output(self) -> tuple[str, DerivationOutput, int]:
        offset = self.pos
        self.expect(b"(")
        name = self.string(escaped=False)
        self.expect(b",")
        path_at = self.pos
        path = self.string(escaped=False)
        self.expect(b",")
        algo_at = self.pos
        hash_algo = self.string(escaped=False)
        self.expect(b",")
        hash_at = self.pos
        hash_ = self.string(escaped=False)
        self.expect(b")")

        needs_path = False
        if hash_algo:
            algo = hash_algo[2:] if hash_algo.startswith("r:") else hash_algo
            if algo not in ALGO_SIZES:
                raise self.fail(f"unknown hash algorithm '{algo}'", algo_at)
            if hash_ in ("", "impure"):
                # Nix asserts the path is empty here (it would crash otherwise).
                if path:
                    raise self.fail("floating or impure output with a path", path_at)
            else:
                try:
                    _parse_output_hash(algo, hash_)
                except FormatError as e:
                    raise self.fail(str(e), hash_at) from None
                needs_path = True
        elif hash_:
            raise self.fail("output hash without a hash algorithm", hash_at)
        else:
            needs_path = bool(path)
        if needs_path:
            self.check_path(path, path_at, f"output '{name}'")
        return name, DerivationOutput(path, hash_algo, hash_), offset

    def input_drv(self) -> tuple[str, frozenset[str], int]:
        offset = self.pos
        self.expect(b"(")
        p = self.path("input derivation")
        self.expect(b",")
        names = self._positioned(lambda: self.string(escaped=False))
        self.sorted_keys(names, "output name")
        self.expect(b")")
        return p, frozenset(n for n, _ in names), offset

    def env_entry(self) -> tuple[str, str, int]:
        offset = self.pos
        self.expect(b"(")
        key = self.string(escaped=True)
        self.expect(b",")
        value = self.string(escaped=True)
        self.expect(b")")
        return key, value, offset

    def _positioned(self, item: Callable[[], str]) -> list[tuple[str, int]]:
        def wrapped() -> tuple[str, int]:
            at = self.pos
            return item(), at

        return self.list_of(wrapped)

    def derivation(self) -> Derivation:
        self.expect(b"Derive(")
        outs = self.list_of(self.output)
        self.sorted_keys([(n, at) for n, _, at in outs], "output")
        self.expect(b",")
        drvs = self.list_of(self.input_drv)
        self.sorted_keys([(p, at) for p, _, at in drvs], "input derivation")
        self.expect(b",")
        srcs = self._positioned(lambda: self.path("input source"))
        self.sorted_keys(srcs, "input source")
        self.expect(b",")
        platform = self.string(escaped=False)
        self.expect(b",")
        builder = self.string(escaped=True)
        self.expect(b",")
        args = self.list_of(lambda: self.string(escaped=True))
        self.expect(b",")
        env = self.list_of(self.env_entry)
        self.sorted_keys([(k, at) for k, _, at in env], "environment variable")
        self.expect(b")")
        if self.pos != len(self.data):
            raise self.fail("trailing bytes after the derivation")
        return Derivation(
            outputs={n: o for n, o, _ in outs},
            input_drvs={p: names for p, names, _ in drvs},
            input_srcs=frozenset(p for p, _ in srcs),
            platform=platform,
            builder=builder,
            args=args,
            env={k: v for k, v, _ in env},
        )


def parse_derivation(data: bytes, store_dir: StoreDir | None = None) -> Derivation:
    """Parse a ``.drv`` file's bytes.

    Only canonical text (what Nix 2.8 writes) is accepted, so
    ``print_derivation(parse_derivation(data)) == data`` whenever this returns.
    All paths must be absolute; with ``store_dir`` the output paths, input
    derivations and input sources must also be store paths of that store dir.
    Raises DerivationParseError (a FormatError) with the byte offset otherwise.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("parse_derivation takes bytes")
    return _Parser(bytes(data), store_dir).derivation()


# --- printing -------------------------------------------------------------------


def _quoted(s: str, what: str) -> bytes:
    b = _encode(s, what)
    if b"\\" in b:
        b = b.replace(b"\\", b"\\\\")
    if b'"' in b:
        b = b.replace(b'"', b'\\"')
    if b"\n" in b:
        b = b.replace(b"\n", b"\\n")
    if b"\r" in b:
        b = b.replace(b"\r", b"\\r")
    if b"\t" in b:
        b = b.replace(b"\t", b"\\t")
    return b'"' + b + b'"'


def _raw(s: str, what: str) -> bytes:
    # Nix 2.8 writes these fields without escaping; a quote or backslash would
    # make a file that does not parse back to the same value (Nix itself then
    # fails to register it), so refuse instead of writing it.
    b = _encode(s, what)
    if b'"' in b or b"\\" in b:
        raise FormatError(f"{what} {s!r} contains a quote or backslash, which Nix writes unescaped")
    return b'"' + b + b'"'


def _sorted_strs(items: Iterable[str]) -> list[str]:
    return sorted(items, key=_sort_key)


def print_derivation(
    drv: Derivation,
    mask_outputs: bool = False,
    input_drvs_override: Mapping[str, Iterable[str]] | None = None,
) -> bytes:
    """Nix 2.8's ATerm text of ``drv``.

    ``mask_outputs`` writes every output path, and every env var named like an
    output, as ``""`` (hashDerivationModulo's step 5).  ``input_drvs_override``
    replaces the inputDrvs slot (its keys are written like drv paths).
    """
    parts: list[bytes] = [b"Derive(["]
    outs = []
    for name in _sorted_strs(drv.outputs):
        o = drv.outputs[name]
        outs.append(
            b"("
            + _raw(name, "output name")
            + b","
            + _raw("" if mask_outputs else o.path, "output path")
            + b","
            + _raw(o.hash_algo, "output hash algorithm")
            + b","
            + _raw(o.hash, "output hash")
            + b")"
        )
    parts.append(b",".join(outs))
    parts.append(b"],[")
    inputs = drv.input_drvs if input_drvs_override is None else input_drvs_override
    ins = []
    for path in _sorted_strs(inputs):
        names = b",".join(_raw(n, "input output name") for n in _sorted_strs(set(inputs[path])))
        ins.append(b"(" + _raw(path, "input derivation") + b",[" + names + b"])")
    parts.append(b",".join(ins))
    parts.append(b"],[")
    parts.append(b",".join(_raw(p, "input source") for p in _sorted_strs(drv.input_srcs)))
    parts.append(b"],")
    parts.append(_raw(drv.platform, "platform"))
    parts.append(b",")
    parts.append(_quoted(drv.builder, "builder"))
    parts.append(b",[")
    parts.append(b",".join(_quoted(a, "argument") for a in drv.args))
    parts.append(b"],[")
    env = []
    for key in _sorted_strs(drv.env):
        value = "" if mask_outputs and key in drv.outputs else drv.env[key]
        env.append(b"(" + _quoted(key, "environment variable") + b"," + _quoted(value, "value")
                   + b")")
    parts.append(b",".join(env))
    parts.append(b"])")
    return b"".join(parts)


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


# --- hashDerivationModulo ---------------------------------------------------------


class _DrvHash(NamedTuple):
    hashes: dict[str, bytes]
    # True when some (transitive) input is floating CA: output paths cannot be
    # known at instantiation and stay deferred.
    deferred: bool


#: hashDerivationModulo results by ``.drv`` path, shared between calls by a caller
#: that evaluates many derivations (start with an empty dict)
DrvHashCache = dict[str, _DrvHash]


def _name_from_drv_path(drv_path: str) -> str:
    # Nix names a derivation read from the store after its file, not env["name"].
    base = drv_path.rsplit("/", 1)[-1]
    if not base.endswith(DRV_EXT) or len(base) <= 33 + len(DRV_EXT):
        raise FormatError(f"'{drv_path}' is not a derivation path")
    return base[33 : -len(DRV_EXT)]


def _fixed_path(store_dir: StoreDir, drv_name: str, output: str, o: DerivationOutput) -> StorePath:
    name = output_path_name(drv_name, output)
    return store_dir.make_fixed_output_path(name, o.recursive, o.fixed_hash())


def _hash_one(
    drv: Derivation,
    drv_name: str,
    store_dir: StoreDir,
    mask_outputs: bool,
    cache: DrvHashCache,
) -> _DrvHash:
    """hashDerivationModulo of ``drv`` once every input's hash is in ``cache``."""
    kind = derivation_type(drv)
    if kind is DerivationType.CA_FIXED:
        ((name, o),) = drv.outputs.items()
        # Nix prints the path it computes from the hash, not the stored field.
        path = store_dir.print(_fixed_path(store_dir, drv_name, name, o))
        text = f"fixed:out:{o.hash_algo}:{o.fixed_hash().base16}:{path}"
        return _DrvHash({name: hashlib.sha256(text.encode()).digest()}, False)
    if kind is DerivationType.IMPURE:
        raise FormatError("impure derivations (experimental) are not supported")
    deferred = kind is DerivationType.CA_FLOATING
    replacement: dict[str, set[str]] = {}
    for path, wanted in drv.input_drvs.items():
        sub: _DrvHash = cache[path]
        deferred |= sub.deferred
        for output in wanted:
            h = sub.hashes.get(output)
            if h is None:
                raise FormatError(f"derivation '{path}' does not have an output named '{output}'")
            # Two inputs can hash alike (fixed outputs with equal path), so merge.
            replacement.setdefault(h.hex(), set()).add(output)
    digest = hashlib.sha256(print_derivation(drv, mask_outputs, replacement)).digest()
    return _DrvHash({name: digest for name in drv.outputs}, deferred)


def _fill_cache(drv: Derivation, store_dir: StoreDir, read_drv: ReadDrv, cache: DrvHashCache) -> None:
    """Put the unmasked hash of every input derivation ``drv`` needs into ``cache``.

    Iterative post-order walk: real derivation graphs are deeper than Python's
    recursion limit allows.  Inputs of fixed-output derivations are never read
    (their hash does not depend on them).
    """
    if derivation_type(drv) is DerivationType.CA_FIXED:
        return
    stack: list[tuple[str, Derivation | None]] = [
        (p, None) for p in drv.input_drvs if p not in cache
    ]
    # Expanded entries still on the stack are exactly the current DFS path.
    expanding: set[str] = set()
    while stack:
        path, sub = stack[-1]
        if path in cache:
            stack.pop()
            continue
        if sub is None:
            sub = read_drv(path)
            stack[-1] = (path, sub)
            expanding.add(path)
            if derivation_type(sub) is not DerivationType.CA_FIXED:
                missing = [p for p in sub.input_drvs if p not in cache]
                for p in missing:
                    if p in expanding:
                        # Only a broken read_drv can produce a cycle, but it would loop forever.
                        raise FormatError(f"derivation '{p}' depends on itself")
                    stack.append((p, None))
                if missing:
                    continue
        cache[path] = _hash_one(sub, _name_from_drv_path(path), store_dir, False, cache)
        expanding.discard(path)
        stack.pop()


def _hash_modulo(
    drv: Derivation,
    store_dir: StoreDir,
    read_drv: ReadDrv,
    mask_outputs: bool,
    cache: DrvHashCache | None,
    drv_name: str | None,
) -> _DrvHash:
    cache = {} if cache is None else cache
    _fill_cache(drv, store_dir, read_drv, cache)
    name = drv.name if drv_name is None else drv_name
    return _hash_one(drv, name, store_dir, mask_outputs, cache)


def hash_derivation_modulo(
    drv: Derivation,
    store_dir: StoreDir,
    read_drv: ReadDrv,
    mask_outputs: bool,
    cache: DrvHashCache | None = None,
    drv_name: str | None = None,
) -> dict[str, bytes]:
    """Spec §3.3: output name → 32-byte SHA-256 digest.

    A fixed-output derivation hashes to its ``fixed:out:…`` string (one entry);
    any other derivation maps all its outputs to the SHA-256 of its text with
    each input derivation replaced by the base16 hash of the outputs used.
    Inputs are read with ``read_drv(drv_path)`` and hashed unmasked, each once:
    ``cache`` (drv path → internal record) may be shared between calls on the
    same store dir.  Impure derivations raise FormatError.  ``drv_name``
    (default ``drv.name``) names a fixed output's path; Nix takes it from the
    ``.drv`` file name.
    """
    return dict(_hash_modulo(drv, store_dir, read_drv, mask_outputs, cache, drv_name).hashes)


# --- output paths -----------------------------------------------------------------


def derivation_output_paths(
    drv: Derivation,
    store_dir: StoreDir,
    read_drv: ReadDrv,
    cache: DrvHashCache | None = None,
    drv_name: str | None = None,
) -> dict[str, StorePath | None]:
    """The output paths ``drv`` must have (None where not statically known).

    Input-addressed (or not yet filled-in, i.e. deferred) outputs come from
    hashDerivationModulo with masked outputs, fixed outputs from their hash.
    The masked text includes env vars named like outputs, so for a derivation
    under construction they must already exist (``fill_output_paths`` does that).
    ``drv_name`` defaults to ``drv.name``.
    """
    name = drv.name if drv_name is None else drv_name
    kind = derivation_type(drv)
    if kind is DerivationType.CA_FIXED:
        ((out, o),) = drv.outputs.items()
        return {out: _fixed_path(store_dir, name, out, o)}
    if kind in (DerivationType.INPUT_ADDRESSED, DerivationType.DEFERRED):
        dh = _hash_modulo(drv, store_dir, read_drv, True, cache, name)
        if dh.deferred:
            return dict.fromkeys(drv.outputs)
        return {o: store_dir.make_output_path(o, h, name) for o, h in dh.hashes.items()}
    return dict.fromkeys(drv.outputs)


def fill_output_paths(
    drv: Derivation,
    store_dir: StoreDir,
    read_drv: ReadDrv,
    cache: DrvHashCache | None = None,
) -> Derivation:
    """What ``derivationStrict`` does once it knows the inputs (spec §3.4).

    ``drv`` has its outputs declared but (typically) no paths: deferred outputs
    for an input-addressed derivation, or the single ``out`` with hash and no
    path for a fixed-output one (see ``fixed_output``).  Returns a new
    Derivation whose output paths and ``env[output]`` are set, i.e. exactly
    what nix-instantiate writes.  Existing paths are recomputed.  Outputs stay
    deferred (with ``env[output] == ""``) if an input is floating CA.
    """
    kind = derivation_type(drv)
    env = dict(drv.env)
    if kind is DerivationType.CA_FIXED:
        ((out, o),) = drv.outputs.items()
        path = store_dir.print(_fixed_path(store_dir, drv.name, out, o))
        env[out] = path
        return replace(drv, outputs={out: replace(o, path=path)}, env=env)
    if kind not in (DerivationType.INPUT_ADDRESSED, DerivationType.DEFERRED):
        raise FormatError(
            f"cannot compute output paths of a {kind.value} derivation (experimental)"
        )
    for out in drv.outputs:
        env[out] = ""
    staged = replace(drv, outputs={o: DerivationOutput() for o in drv.outputs}, env=env)
    paths = derivation_output_paths(staged, store_dir, read_drv, cache)
    known = {out: sp for out, sp in paths.items() if sp is not None}
    if len(known) != len(paths):
        return staged
    outputs: dict[str, DerivationOutput] = {}
    for out, sp in known.items():
        printed = store_dir.print(sp)
        outputs[out] = DerivationOutput(printed)
        env[out] = printed
    return replace(staged, outputs=outputs, env=env)


def fixed_output(
    output_hash: str,
    output_hash_algo: str | None = None,
    output_hash_mode: str = "flat",
) -> DerivationOutput:
    """The (path-less) output ``derivationStrict`` makes from the ``outputHash*`` attributes.

    ``output_hash`` may be base16, nix32, base64, ``algo:…`` or SRI;
    ``output_hash_algo`` may be empty when the hash names its algorithm.  An
    empty hash means all-zero bytes, as Nix assumes (with a warning).
    """
    if output_hash_mode not in ("flat", "recursive"):
        raise FormatError(f"invalid value '{output_hash_mode}' for 'outputHashMode' attribute")
    algo = output_hash_algo or None
    if output_hash == "":
        if algo is None:
            raise FormatError(
                "hash '' does not include a type, nor is the type otherwise known from context"
            )
        if algo not in ALGO_SIZES:
            raise FormatError(f"unknown hash algorithm '{algo}'")
        h = Hash(algo, bytes(ALGO_SIZES[algo]))
    else:
        h = Hash.parse(output_hash, algo)
    prefix = "r:" if output_hash_mode == "recursive" else ""
    return DerivationOutput("", prefix + h.algo, h.base16)


# --- the .drv file as a store object ---------------------------------------------


def derivation_store_path(drv: Derivation, store_dir: StoreDir) -> StorePath:
    """The text path of ``drv``'s ``.drv`` (spec §3.2).

    Name ``<env name>.drv``, content the printed ATerm, references the input
    sources and input derivations (never the outputs).
    """
    refs = [store_dir.parse(p, lax=True) for p in drv.references]
    return store_dir.make_text_path_for(drv.name + DRV_EXT, print_derivation(drv), refs)


def check_derivation_outputs(
    drv_path: str,
    drv: Derivation,
    store_dir: StoreDir,
    read_drv: ReadDrv,
    cache: DrvHashCache | None = None,
) -> None:
    """Re-verify output paths as LocalStore does when registering a ``.drv``.

    The derivation name is taken from ``drv_path`` (as Nix does).  Input-
    addressed and fixed outputs must have the recomputed path, and
    ``env[output]`` must equal it.  Stricter than Nix 2.8, which ignores the
    path field of a fixed output (it prints the recomputed one).  Raises
    FormatError with Nix's messages.
    """
    store_dir.parse(drv_path, lax=True)
    drv_name = _name_from_drv_path(drv_path)
    derivation_type(drv)
    ia_hash: bytes | None = None
    for out in drv.output_names:
        o = drv.outputs[out]
        if o.kind is OutputKind.INPUT_ADDRESSED:
            if ia_hash is None:
                # Every output gets the same hash; ask once.  A deferred input
                # does not excuse a stated path, so the flag is ignored.
                dh = _hash_modulo(drv, store_dir, read_drv, True, cache, drv_name)
                ia_hash = dh.hashes[out]
            should = store_dir.print(store_dir.make_output_path(out, ia_hash, drv_name))
        elif o.kind is OutputKind.FIXED:
            should = store_dir.print(_fixed_path(store_dir, drv_name, out, o))
        else:
            continue
        if o.path != should:
            raise FormatError(
                f"derivation '{drv_path}' has incorrect output '{o.path}', should be '{should}'"
            )
        if drv.env.get(out) != should:
            raise FormatError(
                f"derivation '{drv_path}' has incorrect environment variable '{out}', "
                f"should be '{should}'"
            )
