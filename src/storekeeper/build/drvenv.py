"""The builder's environment and build-dir files, computed without touching anything.

What Nix 2.8 gives a builder, in this order (later entries win):
``PATH=/path-not-set``, ``HOME=/homeless-shelter``, ``NIX_STORE``,
``NIX_BUILD_CORES``; then, for plain derivations, the .drv's variables (or
``<name>Path`` for those in ``passAsFile``); ``NIX_BUILD_TOP``, ``TMPDIR``,
``TEMPDIR``, ``TMP``, ``TEMP``, ``PWD`` (the build dir); for structured ones
``NIX_ATTRS_JSON_FILE`` and ``NIX_ATTRS_SH_FILE``; for fixed outputs
``NIX_OUTPUT_CHECKED=1`` and each ``impureEnvVars`` entry from the daemon's
environment (empty when unset); ``NIX_LOG_FD=2``, ``TERM=xterm-256color``.
Every ``name=value`` is then rewritten (placeholders and, when rebuilding,
final output hashes to the scratch ones), names included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..formats.storepath import StoreDir, StorePath
from . import refgraph
from .attrs import DrvAttrs, attr_file_name, placeholder, render_json, render_sh, rewrite, tokens
from .attrs import structured_document as _doc


@dataclass
class BuildEnv:
    env: dict[str, str]
    #: build-dir file name -> contents, written before the builder starts
    files: dict[str, bytes] = field(default_factory=dict)


def output_rewrites(sd: StoreDir, outputs: Mapping[str, StorePath],
                    scratch: Mapping[str, StorePath]) -> dict[str, str]:
    """Placeholders to the paths the builder writes to, and (when those are
    scratch paths) the final hash parts to the scratch ones."""
    rw = {placeholder(o): sd.print(p) for o, p in scratch.items()}
    rw.update({outputs[o].hash_part: p.hash_part for o, p in scratch.items() if p != outputs[o]})
    return rw


@dataclass
class GraphSource:
    """What ``exportReferencesGraph`` needs from the store."""

    inputs: set[StorePath]
    info_of: refgraph.InfoOf
    outputs_of: refgraph.OutputsOf


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def builder_env(sd: StoreDir, attrs: DrvAttrs, tmpdir: str, cores: int,
                scratch: Mapping[str, StorePath], rewrites: Mapping[str, str], fixed: bool,
                daemon_env: Mapping[str, str], graphs: Callable[[], GraphSource]) -> BuildEnv:
    """``attrs``: the derivation's; ``scratch``: output name -> path written to;
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
                out.files[fn] = _encode(rewrite(value, rewrites))
                env[key + "Path"] = f"{tmpdir}/{fn}"
            else:
                env[key] = value
        if "exportReferencesGraph" in attrs.env:
            pairs = refgraph.plain_specs(attrs.env["exportReferencesGraph"], sd)
            if pairs:
                src = graphs()
                for name, path in pairs:
                    found = refgraph.export_references([path], src.inputs, sd, src.info_of,
                                                       src.outputs_of)
                    out.files[name] = _encode(refgraph.registration_text(found, sd, src.info_of))
    for var in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
        env[var] = tmpdir
    if attrs.structured is not None:
        outputs = {o: rewrite(placeholder(o), rewrites) for o in scratch}
        exported = {}
        specs = refgraph.structured_specs(attrs.structured.get("exportReferencesGraph"), sd)
        if specs:
            src = graphs()
            for name, paths in specs:
                chosen = refgraph.export_references(paths, src.inputs, sd, src.info_of, src.outputs_of)
                exported[name] = refgraph.info_json(chosen, sd, src.info_of)
        doc = _doc(attrs.structured, outputs, exported)
        out.files[".attrs.sh"] = _encode(rewrite(render_sh(doc), rewrites))
        out.files[".attrs.json"] = _encode(rewrite(render_json(doc), rewrites))
        env["NIX_ATTRS_SH_FILE"] = f"{tmpdir}/.attrs.sh"
        env["NIX_ATTRS_JSON_FILE"] = f"{tmpdir}/.attrs.json"
    if fixed:
        env["NIX_OUTPUT_CHECKED"] = "1"
        for var in attrs.get_strings("impureEnvVars") or ():
            env[var] = daemon_env.get(var, "")
    env["NIX_LOG_FD"] = "2"
    env["TERM"] = "xterm-256color"
    final: dict[str, str] = {}
    for key, value in env.items():
        k, _, v = rewrite(f"{key}={value}", rewrites).partition("=")
        final[k] = v
    out.env = final
    return out
