"""``exportReferencesGraph``: closures of input paths handed to the builder.

Plain derivations list pairs ``name path name path …``; each ``name`` becomes a
file in the build directory in the ``--register-validity`` text format without
hashes (path, empty deriver line, reference count, references), one record per
path of the closure.  Structured
derivations give an object ``{name: path or [paths]}``; each name becomes a
top-level attribute of ``.attrs.json`` holding a list of path infos
(``path``, ``narHash``, ``narSize``, ``references``, ``closureSize``, and
``ca`` when content-addressed).

The closure of a ``.drv`` also takes in the closures of that derivation's
outputs.  Every exported path must be in the derivation's input closure.
Records are in store-path order, as are the references of each.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from ..formats.pathinfo import ValidPathInfo
from ..formats.storepath import StoreDir, StorePath, StorePathError
from .attrs import AttrError, elements, json_type, tokens

_FILE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

InfoOf = Callable[[StorePath], ValidPathInfo]
OutputsOf = Callable[[StorePath], Iterable[StorePath]]


class InputRejected(AttrError):
    """The derivation asks for something Nix refuses before building (BuildError)."""


def _store_path(sd: StoreDir, text: str) -> StorePath:
    try:
        return sd.split(text, lax=True)[0]
    except StorePathError:
        raise InputRejected(f"'exportReferencesGraph' contains a non-store path '{text}'") from None


def plain_specs(value: str, sd: StoreDir) -> list[tuple[str, StorePath]]:
    """The (file name, store path) pairs of a plain ``exportReferencesGraph``."""
    items = tokens(value)
    if len(items) % 2:
        raise InputRejected(f"odd number of tokens in 'exportReferencesGraph': '{value}'")
    pairs = []
    for name, path in zip(items[::2], items[1::2]):
        if not _FILE_NAME.fullmatch(name):
            raise AttrError(f"invalid file name '{name}' in 'exportReferencesGraph'")
        pairs.append((name, _store_path(sd, path)))
    return pairs


def structured_specs(value: Any, sd: StoreDir) -> list[tuple[str, list[StorePath]]]:
    """The (attribute name, store paths) pairs of a structured ``exportReferencesGraph``
    (anything but an object is ignored, as Nix does)."""
    if not isinstance(value, dict):
        return []
    out = []
    for name in sorted(value):
        v = value[name]
        items = elements(v)
        paths = []
        for item in items:
            if not isinstance(item, str):
                raise AttrError("[json.exception.type_error.302] type must be string, "
                                f"but is {json_type(item)}")
            try:
                paths.append(sd.split(item, lax=True)[0])
            except StorePathError:
                raise AttrError(f"path '{item}' is not in the Nix store") from None
        out.append((name, paths))
    return out


def closure(starts: Iterable[StorePath], info_of: InfoOf) -> set[StorePath]:
    seen: set[StorePath] = set()
    todo = list(starts)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(info_of(p).references)
    return seen


def export_references(roots: Iterable[StorePath], inputs: set[StorePath], sd: StoreDir,
                      info_of: InfoOf, outputs_of: OutputsOf) -> set[StorePath]:
    """The paths to export for ``roots``: their closure, plus the closures of the
    outputs of every derivation in it."""
    paths: set[StorePath] = set()
    for root in roots:
        if root not in inputs:
            raise InputRejected(f"cannot export references of path '{sd.print(root)}' because "
                                "it is not in the input closure of the derivation")
        paths |= closure([root], info_of)
    for drv in sorted(p for p in paths if p.is_derivation):
        paths |= closure(outputs_of(drv), info_of)
    return paths


def _ordered(paths: Iterable[StorePath]) -> list[StorePath]:
    return sorted(paths, key=lambda p: p.base)


def registration_text(paths: Iterable[StorePath], sd: StoreDir, info_of: InfoOf) -> str:
    """The plain form: path, empty deriver, count, references; no hashes."""
    out = []
    for p in _ordered(paths):
        refs = _ordered(info_of(p).references)
        out.append(f"{sd.print(p)}\n\n{len(refs)}\n" + "".join(sd.print(r) + "\n" for r in refs))
    return "".join(out)


def info_json(paths: Iterable[StorePath], sd: StoreDir, info_of: InfoOf) -> list[dict[str, Any]]:
    """The structured form: one object per path, with its closure size."""
    out = []
    for p in _ordered(paths):
        info = info_of(p)
        item: dict[str, Any] = {
            "path": sd.print(p),
            "narHash": info.nar_hash.typed("nix32"),
            "narSize": info.nar_size,
            "references": [sd.print(r) for r in _ordered(info.references)],
            "closureSize": sum(info_of(q).nar_size for q in closure([p], info_of)),
        }
        if info.ca:
            item["ca"] = info.ca
        out.append(item)
    return out
