"""hashDerivationModulo, output paths, and the ``.drv`` file as a store object."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import NamedTuple

from ..errors import FormatError
from ..hashes import ALGO_SIZES, Hash
from ..storepath import DRV_EXT, StoreDir, StorePath, output_path_name
from .aterm import print_derivation
from .model import (
    Derivation,
    DerivationOutput,
    DerivationType,
    OutputKind,
    ReadDrv,
    derivation_type,
)

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
