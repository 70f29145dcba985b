"""Queries, and reading store contents (NarFromPath, ExportPath)."""

from __future__ import annotations

from ...errors import StoreError
from ...formats.wire import (
    EXPORT_MAGIC,
    MAX_PATH_LEN,
    Op,
    WireWriter,
    write_path_info,
)
from ...store.policy import note_use
from ..errors import OpError
from ..registry import NIX32_CHARS, info_or_fail, op
from ..session import Session
from .substitute import substituters

# --- queries -------------------------------------------------------------------

@op(Op.IsValidPath)
def is_valid_path(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    valid = s.store.is_valid(sp)
    s.stop_work()
    s.w.boolean(valid)


@op(Op.QueryValidPaths)
def query_valid_paths(s: Session) -> None:
    paths = s.r.store_paths(s.sd, "paths", lax=True)
    substitute = s.r.u64("substitute")
    s.start_work()
    if substitute:
        _substitute_missing(s, paths)
    valid = s.store.query_valid_paths(paths)
    s.stop_work()
    s.w.store_paths(s.sd, valid)


def _substitute_missing(s: Session, paths) -> None:
    """QueryValidPaths with ``substitute`` (``nix copy -s``): fetch what caches have
    first; failures are only warnings, the answer says what is valid."""
    subs = substituters(s)
    try:
        for p in sorted(set(paths) - s.store.query_valid_paths(paths)):
            try:
                subs.realise(p)
            except StoreError as e:
                s.warn(str(e))
    finally:
        subs.close()


@op(Op.QueryPathInfo)
def query_path_info(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    info = s.store.query_path_info(sp)
    s.stop_work()
    # Unknown is an answer (valid = 0), not an error: clients rely on that.
    s.w.boolean(info is not None)
    if info is not None:
        write_path_info(s.w, s.sd, info, with_path=False)


@op(Op.QueryReferrers)
def query_referrers(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    # An invalid path has no referrers (not an error), as in Nix.
    referrers = s.store.query_referrers(sp) if s.store.is_valid(sp) else set()
    s.stop_work()
    s.w.store_paths(s.sd, referrers)


@op(Op.QueryReferences)
def query_references(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    refs = info_or_fail(s, sp).references
    s.stop_work()
    s.w.store_paths(s.sd, refs)


@op(Op.QueryPathHash)
def query_path_hash(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    h = info_or_fail(s, sp).nar_hash
    s.stop_work()
    s.w.string(h.base16)


@op(Op.QueryDeriver)
def query_deriver(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    deriver = info_or_fail(s, sp).deriver
    s.stop_work()
    s.w.opt_store_path(s.sd, deriver)


@op(Op.QueryValidDerivers)
def query_valid_derivers(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    derivers = s.store.query_valid_derivers(sp)
    s.stop_work()
    s.w.store_paths(s.sd, derivers)


@op(Op.QueryDerivationOutputMap)
def query_derivation_output_map(s: Session) -> None:
    drv = s.read_path("derivation path")
    s.start_work()
    outputs = s.store.query_derivation_outputs(drv)
    s.stop_work()
    s.w.string_map({name: s.sd.print(p) for name, p in sorted(outputs.items())})


@op(Op.QueryDerivationOutputs)
def query_derivation_outputs(s: Session) -> None:
    drv = s.read_path("derivation path")
    s.start_work()
    outputs = s.store.query_derivation_outputs(drv)
    s.stop_work()
    s.w.store_paths(s.sd, outputs.values())


@op(Op.QueryDerivationOutputNames)
def query_derivation_output_names(s: Session) -> None:
    drv = s.read_path("derivation path")
    s.start_work()
    outputs = s.store.query_derivation_outputs(drv)
    s.stop_work()
    s.w.strings(sorted(outputs))


@op(Op.QueryAllValidPaths)
def query_all_valid_paths(s: Session) -> None:
    s.start_work()
    paths = s.store.query_all_valid_paths()
    s.stop_work()
    s.w.store_paths(s.sd, paths)


@op(Op.QueryPathFromHashPart)
def query_path_from_hash_part(s: Session) -> None:
    hash_part = s.r.string("hash part", MAX_PATH_LEN)
    s.start_work()
    if len(hash_part) != 32 or not NIX32_CHARS.issuperset(hash_part):
        raise OpError(f"invalid hash part '{hash_part}'")
    sp = s.store.query_path_from_hash_part(hash_part)
    s.stop_work()
    s.w.opt_store_path(s.sd, sp)


@op(Op.QueryRealisation)
def query_realisation(s: Session) -> None:
    s.r.string("DrvOutput", MAX_PATH_LEN)
    s.start_work()
    s.stop_work()
    s.w.strings([])  # no realisations are recorded (no ca-derivations)


# --- reading store contents -----------------------------------------------------

@op(Op.NarFromPath)
def nar_from_path(s: Session) -> None:
    sp = s.read_path()
    s.start_work()
    chunks = iter(s.store.dump_path(sp))
    # The first chunk is taken before STDERR_LAST so that a path whose files
    # are gone is reported as an error, not as a broken NAR.
    first = next(chunks, b"")
    note_use(s.store, [s.sd.print(sp)])
    s.stop_work()
    s.send(first)
    for chunk in chunks:
        s.send(chunk)


@op(Op.ExportPath)
def export_path(s: Session) -> None:
    sp = s.read_path()
    s.r.u64("sign")  # obsolete: signing exports was removed
    s.start_work()
    info = info_or_fail(s, sp)
    note_use(s.store, [s.sd.print(sp)])
    for chunk in s.store.dump_path(sp):
        s.write_data(chunk)
    trailer = WireWriter()
    trailer.u64(EXPORT_MAGIC).store_path(s.sd, sp).store_paths(s.sd, info.references)
    trailer.opt_store_path(s.sd, info.deriver).u64(0)
    s.write_data(trailer.take())
    s.stop_work()
    s.w.u64(1)
