"""The ``.drv`` text: the strict parser and the printer (the package docstring says
which texts are accepted)."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

from ..errors import FormatError
from ..hashes import ALGO_SIZES
from ..storepath import StoreDir, StorePathError
from .model import (
    _T,
    Derivation,
    DerivationOutput,
    DerivationParseError,
    _decode,
    _encode,
    _parse_output_hash,
    _sort_key,
)

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
