"""The builder's environment: Nix 2.8's variables and build-dir files for one derivation.

:func:`builder_environment` is a function of its arguments only: it writes
nothing (the caller writes :attr:`BuildEnv.files` into the fresh build dir)
and reads the store only through the ``graphs`` callback, called only when
the derivation exports references.

What a builder gets, in this order (later entries win):
``PATH=/path-not-set``, ``HOME=/homeless-shelter``, ``NIX_STORE``,
``NIX_BUILD_CORES``; then, for plain derivations, the .drv's variables (or
``<name>Path`` for those in ``passAsFile``, :mod:`.attrs`) and the
``exportReferencesGraph`` files (:mod:`.refgraph`); ``NIX_BUILD_TOP``,
``TMPDIR``, ``TEMPDIR``, ``TMP``, ``TEMP``, ``PWD`` (the build dir); for
structured derivations ``.attrs.json``/``.attrs.sh`` and
``NIX_ATTRS_JSON_FILE``/``NIX_ATTRS_SH_FILE`` (and none of the .drv's
variables); for fixed outputs ``NIX_OUTPUT_CHECKED=1`` and each
``impureEnvVars`` entry (:func:`impure_sources`; empty when unset);
``NIX_LOG_FD=2``, ``TERM=xterm-256color``.

Where ``impureEnvVars`` come from (only for fixed-output derivations, as in
Nix; the others never see them): the ``impure-env`` setting when it names the
variable, else **the environment of the process that runs the build**.  For
the daemon that is the daemon's own environment, which is what nix-daemon 2.8
does (``tests/test_sandbox_env.py`` checks it against the real one): the worker
protocol carries no client environment, only settings, so "the client's
environment" (issue 15's words) cannot be had through a daemon; a client that
wants a value sent uses ``impure-env`` (newer Nix's setting; like Nix, only a
trusted client may set it: an untrusted one could otherwise feed any fixed-output
build, e.g. a fetcher's proxy variables).  For a local build (``storekeeper
build``, in the invoking process) the building process *is* the client, so its
environment is the invoking user's, as with Nix's ``nix-build`` on a local store.

Invariants: every ``name=value``, and every file written, is rewritten with
the output rewrites (:func:`.rewrite.input_rewrites`: placeholders to the paths
the builder writes to, real hash parts to scratch ones), names included; no
variable the builder gets contains a NUL (or ``=`` in its name).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..formats.pathinfo import ValidPathInfo
from ..formats.storepath import StoreDir, StorePath
from . import refgraph
from .attrs import (
    AttrError,
    DrvAttrs,
    attr_file_name,
    placeholder,
    render_sh,
    structured_document,
    tokens,
)
from .nljson import render_json
from .rewrite import rewrite_str


@dataclass
class BuildEnv:
    env: dict[str, str]
    #: build-dir file name -> contents, written before the builder starts
    files: dict[str, bytes] = field(default_factory=dict)
    #: those of them the build user gets to own (all but exportReferencesGraph's,
    #: which Nix leaves to the daemon: the builder may read them, not change them)
    owned: set[str] = field(default_factory=set)


@dataclass
class GraphSource:
    """What ``exportReferencesGraph`` needs from the store."""

    inputs: set[StorePath]
    info_of: refgraph.InfoOf
    outputs_of: refgraph.OutputsOf


def _memo(src: GraphSource) -> GraphSource:
    """The same source, each path's info read once (closure sizes walk closures often)."""
    infos: dict[StorePath, ValidPathInfo] = {}

    def info_of(p: StorePath) -> ValidPathInfo:
        if p not in infos:
            infos[p] = src.info_of(p)
        return infos[p]
    return GraphSource(src.inputs, info_of, src.outputs_of)


def impure_sources(impure_env: Iterable[tuple[str, str]],
                   environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where fixed-output builds' ``impureEnvVars`` come from (module docstring):
    ``environ`` (this process's environment) overridden by ``impure-env``."""
    return {**(os.environ if environ is None else environ), **dict(impure_env)}


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def builder_environment(sd: StoreDir, attrs: DrvAttrs, tmpdir: str, cores: int,
                        scratch: Mapping[str, StorePath], rewrites: Mapping[str, str],
                        fixed: bool, impure: Mapping[str, str],
                        graphs: Callable[[], GraphSource]) -> BuildEnv:
    """``attrs``: the derivation's; ``scratch``: output name -> path written to;
    ``impure``: where ``impureEnvVars`` come from (:func:`impure_sources`);
    ``graphs``: called only when the derivation exports references."""
    env: dict[str, str] = {
        "PATH": "/path-not-set",
        "HOME": "/homeless-shelter",
        "NIX_STORE": sd.path,
        "NIX_BUILD_CORES": str(cores),
    }
    out = BuildEnv(env)
    if attrs.structured is None:
        pass_as_file = set(tokens(attrs.env.get("passAsFile", "")))
        for key, value in attrs.env.items():
            if key in pass_as_file:
                fn = attr_file_name(key)
                out.files[fn] = _encode(rewrite_str(value, rewrites))
                out.owned.add(fn)
                env[key + "Path"] = f"{tmpdir}/{fn}"
            else:
                env[key] = value
        if "exportReferencesGraph" in attrs.env:
            pairs = refgraph.plain_specs(attrs.env["exportReferencesGraph"], sd)
            if pairs:
                src = _memo(graphs())
                for name, path in pairs:
                    found = refgraph.export_references([path], src.inputs, sd, src.info_of,
                                                       src.outputs_of)
                    out.files[name] = _encode(refgraph.registration_text(found, sd, src.info_of))
    for var in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
        env[var] = tmpdir
    if attrs.structured is not None:
        outputs = {o: rewrite_str(placeholder(o), rewrites) for o in scratch}
        exported = {}
        specs = refgraph.structured_specs(attrs.structured.get("exportReferencesGraph"), sd)
        if specs:
            src = _memo(graphs())
            for name, paths in specs:
                chosen = refgraph.export_references(paths, src.inputs, sd, src.info_of, src.outputs_of)
                exported[name] = refgraph.info_json(chosen, sd, src.info_of)
        doc = structured_document(attrs.structured, outputs, exported)
        out.files[".attrs.sh"] = _encode(rewrite_str(render_sh(doc), rewrites))
        out.files[".attrs.json"] = _encode(rewrite_str(render_json(doc), rewrites))
        out.owned |= {".attrs.sh", ".attrs.json"}
        env["NIX_ATTRS_SH_FILE"] = f"{tmpdir}/.attrs.sh"
        env["NIX_ATTRS_JSON_FILE"] = f"{tmpdir}/.attrs.json"
    if fixed:
        env["NIX_OUTPUT_CHECKED"] = "1"
        for var in attrs.get_strings("impureEnvVars") or ():
            env[var] = impure.get(var, "")
    env["NIX_LOG_FD"] = "2"
    env["TERM"] = "xterm-256color"
    final: dict[str, str] = {}
    for key, value in env.items():
        if "=" in key:
            raise AttrError(f"environment variable '{key}' cannot be passed to the builder")
        k, _, v = rewrite_str(f"{key}={value}", rewrites).partition("=")
        if "\0" in k or "\0" in v:
            raise AttrError(f"environment variable '{key}' cannot be passed to the builder")
        final[k] = v
    out.env = final
    return out
