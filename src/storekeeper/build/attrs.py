"""A derivation's attributes as Nix 2.8's builder hands them over.

Two modes, chosen by the derivation itself:

* plain: every environment entry of the .drv becomes a variable, except those
  named in ``passAsFile``, which go to ``$NIX_BUILD_TOP/.attr-<nix32(sha256(name))>``
  with ``<name>Path`` pointing there;
* structured (``__structuredAttrs = true``, the .drv holds ``__json``): no
  .drv variable reaches the builder.  It gets ``.attrs.json`` (the attributes
  re-serialised, ``outputs`` mapped to paths, ``exportReferencesGraph`` results
  added) and ``.attrs.sh`` (the bash-representable part as ``declare`` lines).

Output placeholders (``/`` + nix32 of ``sha256("nix-output:<name>")``) in
names, values, files and both renderings become the path the builder must
write to (:mod:`.rewrite`, :mod:`.environment`).

Invariant kept here: ``render_sh`` writes the lines Nix writes from the
document that ``.attrs.json`` holds (:mod:`.nljson` writes that one); both
are asserted against real nix-daemon builds in tests/test_drv_env.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..formats.hashes import nix32_encode
from .nljson import key_bytes

_SH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN_SEP = re.compile(r"[ \t\n\r]+")


class AttrError(Exception):
    """A derivation whose attributes Nix refuses; the message is Nix's."""


# --- names ------------------------------------------------------------------------------------

def placeholder(output: str) -> str:
    """What ``builtins.placeholder output`` evaluates to."""
    return "/" + nix32_encode(hashlib.sha256(b"nix-output:" + output.encode()).digest())


def attr_file_name(name: str) -> str:
    """The build-dir file a ``passAsFile`` attribute is written to."""
    return ".attr-" + nix32_encode(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest())


def tokens(value: str) -> list[str]:
    """Nix's whitespace tokenising (space, tab, CR, LF only)."""
    return [t for t in _TOKEN_SEP.split(value) if t]


# --- the parsed derivation ---------------------------------------------------------------------

_INT_MIN, _UINT_MAX = -(1 << 63), (1 << 64) - 1


def _parse_int(text: str) -> int | float:
    n = int(text)
    return n if _INT_MIN <= n <= _UINT_MAX else float(text)  # beyond 64 bits: a double


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid literal '{name}'")


def parse_json(text: str) -> Any:
    return json.loads(text, parse_int=_parse_int, parse_constant=_no_constant)


class DrvAttrs:
    """Typed access to a derivation's attributes: from ``__json`` when it has
    one, else from its environment (lists split on whitespace, Booleans ``"1"``)."""

    def __init__(self, env: Mapping[str, str], drv_printed: str) -> None:
        self.env = env
        self.drv_printed = drv_printed
        self.structured: dict[str, Any] | None = None
        if "__json" in env:
            try:
                value = parse_json(env["__json"])
            except ValueError as e:
                raise AttrError(f"cannot process __json attribute of '{drv_printed}': {e}") from None
            if not isinstance(value, dict):
                raise AttrError(f"cannot process __json attribute of '{drv_printed}': not an object")
            self.structured = value

    def _bad(self, name: str, what: str) -> AttrError:
        return AttrError(f"attribute '{name}' of derivation '{self.drv_printed}' must be {what}")

    def get_string(self, name: str) -> str | None:
        if self.structured is None:
            return self.env.get(name)
        if name not in self.structured:
            return None
        v = self.structured[name]
        if not isinstance(v, str):
            raise self._bad(name, "a string")
        return v

    def get_strings(self, name: str) -> list[str] | None:
        if self.structured is None:
            return tokens(self.env[name]) if name in self.env else None
        if name not in self.structured:
            return None
        v = self.structured[name]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise self._bad(name, "a list of strings")
        return v

    def get_bool(self, name: str, default: bool = False) -> bool:
        if self.structured is None:
            return self.env[name] == "1" if name in self.env else default
        if name not in self.structured:
            return default
        v = self.structured[name]
        if not isinstance(v, bool):
            raise self._bad(name, "a Boolean")
        return v


# --- .attrs.sh --------------------------------------------------------------------------------

def sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _float32(x: float) -> float:
    try:
        return float(struct.unpack("f", struct.pack("f", x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


def _int32(n: int) -> int:
    n &= 0xFFFFFFFF
    return n - (1 << 32) if n >= 1 << 31 else n


def _sh_scalar(v: Any) -> str | None:
    """A value bash can hold as a word, or None.  Numbers: kept when whole as
    single-precision floats, printed as 32-bit ints (wrapping), as Nix does."""
    if isinstance(v, str):
        return sh_quote(v)
    if isinstance(v, bool):
        return "1" if v else ""
    if v is None:
        return "''"
    if isinstance(v, int):
        return str(_int32(v))
    if isinstance(v, float):
        f = _float32(v)
        if math.isinf(f) or math.ceil(f) == f:
            whole = math.trunc(v) if math.isfinite(v) else None
            return str(whole if whole is not None and -(1 << 31) <= whole < 1 << 31 else -(1 << 31))
    return None


def render_sh(doc: Mapping[str, Any]) -> str:
    """``declare`` lines for the attributes bash can represent."""
    lines = []
    for key in sorted(doc, key=key_bytes):
        if not _SH_NAME.fullmatch(key):
            continue
        value = doc[key]
        s = _sh_scalar(value)
        if s is not None:
            lines.append(f"declare {key}={s}\n")
        elif isinstance(value, list):
            items = [_sh_scalar(v) for v in value]
            if all(i is not None for i in items):
                lines.append(f"declare -a {key}=({''.join(f'{i} ' for i in items)})\n")
        elif isinstance(value, dict):
            pairs = [(k, _sh_scalar(value[k])) for k in sorted(value, key=key_bytes)]
            if all(s2 is not None for _k, s2 in pairs):
                lines.append(f"declare -A {key}=({''.join(f'[{sh_quote(k)}]={s2} ' for k, s2 in pairs)})\n")
    return "".join(lines)


def structured_document(attrs: Mapping[str, Any], outputs: Mapping[str, str],
                        graphs: Mapping[str, Any]) -> dict[str, Any]:
    """The document behind both files: the attributes, ``outputs`` as a map from
    name to path, and each ``exportReferencesGraph`` entry's path infos."""
    doc = dict(attrs)
    doc["outputs"] = dict(outputs)
    doc.update(graphs)
    return doc


# --- output checks ----------------------------------------------------------------------------

@dataclass
class OutputChecks:
    max_size: int | None = None
    max_closure_size: int | None = None
    allowed_references: list[str] | None = None
    allowed_requisites: list[str] | None = None
    disallowed_references: list[str] | None = None
    disallowed_requisites: list[str] | None = None
    #: plain derivations: a path's own closure does not count against its requisites
    ignore_self_refs: bool = False


_JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "number"), (float, "number"),
               (str, "string"), (list, "array"), (dict, "object"))


def json_type(v: Any) -> str:
    return next(n for t, n in _JSON_TYPES if isinstance(v, t))


def _uint64(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise AttrError(f"[json.exception.type_error.302] type must be number, but is {json_type(v)}")
    return int(v) & _UINT_MAX


def elements(v: Any) -> list[Any]:
    # iterating a JSON value: an array's items, an object's values, nothing for
    # null, the value itself for any other scalar
    if isinstance(v, list):
        return v
    if isinstance(v, dict):
        return [v[k] for k in sorted(v, key=key_bytes)]
    return [] if v is None else [v]


def output_checks(attrs: DrvAttrs, output: str) -> OutputChecks | None:
    """The checks for one output: ``outputChecks.<output>`` when structured, else
    the derivation-wide ``allowedReferences`` & co."""
    if attrs.structured is None:
        return OutputChecks(
            allowed_references=attrs.get_strings("allowedReferences"),
            allowed_requisites=attrs.get_strings("allowedRequisites"),
            disallowed_references=attrs.get_strings("disallowedReferences"),
            disallowed_requisites=attrs.get_strings("disallowedRequisites"),
            ignore_self_refs=True)
    every = attrs.structured.get("outputChecks")
    if not isinstance(every, dict) or output not in every:
        return None
    spec = every[output]
    if not isinstance(spec, dict):
        return OutputChecks()
    checks = OutputChecks()
    if "maxSize" in spec:
        checks.max_size = _uint64(spec["maxSize"])
    if "maxClosureSize" in spec:
        checks.max_closure_size = _uint64(spec["maxClosureSize"])
    for name in ("allowedReferences", "allowedRequisites", "disallowedReferences",
                 "disallowedRequisites"):
        if name in spec:
            items = elements(spec[name])
            if not all(isinstance(s, str) for s in items):
                raise attrs._bad(name, "a list of strings")
            setattr(checks, _snake(name), items)
    return checks


def _snake(name: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), name)


def apply_checks(checks: OutputChecks, path: str, nar_size: int, references: Iterable[str],
                 closure: Callable[[], tuple[set[str], int]],
                 resolve: Callable[[str], str | None]) -> None:
    """Raise AttrError with Nix's message for the first check ``path`` fails.
    ``closure()`` gives (closure paths including ``path``, their total NAR size);
    ``resolve`` turns a specifier (store path or output name) into a path, or None."""
    if checks.max_size is not None and nar_size > checks.max_size:
        raise AttrError(f"path '{path}' is too large at {nar_size} bytes; "
                        f"limit is {checks.max_size} bytes")
    if checks.max_closure_size is not None:
        size = closure()[1]
        if size > checks.max_closure_size:
            raise AttrError(f"closure of path '{path}' is too large at {size} bytes; "
                            f"limit is {checks.max_closure_size} bytes")
    rules = ((checks.allowed_references, True, False), (checks.allowed_requisites, True, True),
             (checks.disallowed_references, False, False), (checks.disallowed_requisites, False, True))
    for value, allowed, recursive in rules:
        if value is None:
            continue
        spec = set()
        for item in value:
            p = resolve(item)
            if p is None:
                raise AttrError(f"derivation contains an illegal reference specifier '{item}'")
            spec.add(p)
        used = set(closure()[0]) if recursive else set(references)
        if recursive and checks.ignore_self_refs:
            used.discard(path)
        bad = used - spec if allowed else used & spec
        if bad:
            raise AttrError(f"output '{path}' is not allowed to refer to the following paths:"
                            + "".join(f"\n  {p}" for p in sorted(bad)))
