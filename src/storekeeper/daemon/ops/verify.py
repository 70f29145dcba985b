"""VerifyStore, AddBuildLog, and the operations storekeeper does not implement yet (read
in full so the connection stays usable)."""

from __future__ import annotations

from ...build.logs import add_build_log as add_log
from ...formats.errors import FormatError
from ...formats.wire import (
    MAX_PATH_LEN,
    Op,
    Verbosity,
)
from ..errors import OpError
from ..registry import not_supported, op
from ..session import Session

# --- verification ---------------------------------------------------------------------

@op(Op.VerifyStore)
def verify_store(s: Session) -> None:
    check_contents = s.r.boolean("checkContents")
    repair = s.r.boolean("repair")
    s.start_work()
    if repair:
        s.require_trusted("repair paths")
    s.log(Verbosity.INFO, "reading the Nix store...")
    s.log(Verbosity.INFO, "checking path existence...")
    if check_contents:
        s.log(Verbosity.INFO, "checking link hashes...")
        s.log(Verbosity.INFO, "checking store hashes...")
    report = s.store.verify(check_contents=check_contents, repair=repair)
    for message in report.repaired:
        s.log(Verbosity.ERROR, message)
    for message in report.errors:
        s.log(Verbosity.ERROR, message)
    s.stop_work()
    s.w.boolean(not report.ok)


# --- builds: see ops.build (BuildPaths, BuildPathsWithResults, BuildDerivation, QueryMissing)

@op(Op.RegisterDrvOutput)
def register_drv_output(s: Session) -> None:
    s.r.string("realisation")
    s.start_work()
    not_supported(Op.RegisterDrvOutput, "content-addressed derivations are not supported")


#: the largest build log a client may send (it is held in memory to be compressed)
MAX_BUILD_LOG = 256 << 20


@op(Op.AddBuildLog)
def add_build_log(s: Session) -> None:
    """``nix store copy-log --to`` this store: trusted clients only; an existing log is
    kept (Nix's rule)."""
    # the client sends the basename (``<hash>-<name>.drv``), not the full path
    base = s.r.string("derivation", MAX_PATH_LEN)
    payload = s.framed_payload()
    s.start_work()  # (a bad name is an answer: the payload is read past, the connection kept)
    s.require_trusted("add logs")
    try:
        drv = s.sd.parse(f"{s.sd.path}/{base}") if "/" not in base else None
    except FormatError:
        drv = None
    if drv is None or not drv.is_derivation:
        raise OpError(f"'{base}' is not the name of a derivation in the store")
    layout = getattr(s.store, "layout", None)
    if layout is None:
        raise OpError("this store keeps no build logs")
    chunks, size = [], 0
    while chunk := payload.read(1 << 20):
        size += len(chunk)
        if size > MAX_BUILD_LOG:
            raise OpError(f"build log of '{s.sd.print(drv)}' is larger than {MAX_BUILD_LOG} bytes")
        chunks.append(chunk)
    payload.drain()
    add_log(layout.log_dir, drv.base, b"".join(chunks))
    s.stop_work()
    s.w.u64(1)


@op(Op.ImportPaths)
def import_paths(s: Session) -> None:
    # The export stream would be pulled with STDERR_READ; 2.8 clients use
    # AddToStoreNar instead.
    s.start_work()
    not_supported(Op.ImportPaths, "use a client that sends AddToStoreNar (Nix 2.4 or newer)")
