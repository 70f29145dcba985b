"""Adding to the store: AddToStore, AddTextToStore, AddToStoreNar, AddMultipleToStore,
AddSignatures."""

from __future__ import annotations

from ...formats.contentaddress import FLAT, RECURSIVE, TEXT
from ...formats.hashes import ALGO_SIZES
from ...formats.wire import (
    MAX_PATH_LEN,
    Op,
    WireReader,
    read_path_info,
    write_path_info,
)
from ..errors import OpError
from ..registry import op
from ..session import Session

# --- adding to the store ---------------------------------------------------------

def _no_untrusted_repair(s: Session, repair: bool) -> None:
    if repair and not s.trusted:
        raise OpError("you are not privileged to repair paths")


def _parse_ca_method(cam: str) -> tuple[str, str]:
    """``text:sha256`` / ``fixed:r:ALGO`` / ``fixed:ALGO`` -> (method, algo)."""
    if cam == "text:sha256":
        return TEXT, "sha256"
    if cam.startswith("fixed:r:"):
        method, algo = RECURSIVE, cam[len("fixed:r:"):]
    elif cam.startswith("fixed:"):
        method, algo = FLAT, cam[len("fixed:"):]
    else:
        raise OpError(f"content-address method '{cam}' is not supported "
                      "(expected text:sha256, fixed:ALGO or fixed:r:ALGO)")
    if algo not in ALGO_SIZES:
        raise OpError(f"unknown hash algorithm '{algo}' in content-address method '{cam}'")
    return method, algo


@op(Op.AddToStore)
def add_to_store(s: Session) -> None:
    r = s.r
    name = r.string("name", MAX_PATH_LEN)
    cam = r.string("content-address method", 64)
    refs = r.store_paths(s.sd, "references", lax=True)
    repair = r.boolean("repair")
    payload = s.framed_payload()
    s.start_work()
    _no_untrusted_repair(s, repair)
    method, algo = _parse_ca_method(cam)
    info = s.store.add_dump(payload, name, method, algo, refs, repair)
    payload.drain()
    s.stop_work()
    write_path_info(s.w, s.sd, info, with_path=True)


@op(Op.AddTextToStore)
def add_text_to_store(s: Session) -> None:
    name = s.r.string("name", MAX_PATH_LEN)
    text = s.r.bytes("text")
    refs = s.r.store_paths(s.sd, "references", lax=True)
    s.start_work()
    info = s.store.add_text(name, text, refs)
    s.stop_work()
    s.w.store_path(s.sd, info.path)


def _check_sigs(s: Session, dont_check_sigs: bool) -> bool:
    # Only a trusted client may waive signature checks (spec §11).
    if not s.config.require_sigs:
        return False
    return not (dont_check_sigs and s.trusted)


@op(Op.AddToStoreNar)
def add_to_store_nar(s: Session) -> None:
    r = s.r
    sp = r.store_path(s.sd, "path")
    info = read_path_info(r, s.sd, path=sp)
    repair = r.boolean("repair")
    dont_check_sigs = r.boolean("dontCheckSigs")
    payload = s.framed_payload()
    s.start_work()
    _no_untrusted_repair(s, repair)
    if not s.trusted:
        info = info.with_(ultimate=False)
    s.store.add_nar(info, payload, repair=repair, check_sigs=_check_sigs(s, dont_check_sigs))
    payload.drain()
    s.stop_work()


@op(Op.AddMultipleToStore)
def add_multiple_to_store(s: Session) -> None:
    repair = s.r.boolean("repair")
    dont_check_sigs = s.r.boolean("dontCheckSigs")
    payload = s.framed_payload()
    s.start_work()
    _no_untrusted_repair(s, repair)
    check_sigs = _check_sigs(s, dont_check_sigs)
    inner = WireReader(payload)
    for _ in range(inner.count("paths")):
        info = read_path_info(inner, s.sd).with_(ultimate=False)
        s.store.add_nar(info, payload, repair=repair, check_sigs=check_sigs)
    payload.drain()
    s.stop_work()


@op(Op.AddSignatures)
def add_signatures(s: Session) -> None:
    sp = s.read_path()
    sigs = s.r.strings("signatures", limit=1 << 16, item_limit=4096)
    s.start_work()
    s.require_trusted("add signatures")
    s.store.add_signatures(sp, sigs)
    s.stop_work()
    s.w.u64(1)
