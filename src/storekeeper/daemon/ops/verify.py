"""VerifyStore, and the operations storekeeper does not implement yet (read in full so
the connection stays usable)."""

from __future__ import annotations

from ...formats.wire import (
    MAX_PATH_LEN,
    Op,
    Verbosity,
)
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


@op(Op.AddBuildLog)
def add_build_log(s: Session) -> None:
    s.r.string("derivation", MAX_PATH_LEN)
    s.framed_payload()
    s.start_work()
    not_supported(Op.AddBuildLog)


@op(Op.ImportPaths)
def import_paths(s: Session) -> None:
    # The export stream would be pulled with STDERR_READ; 2.8 clients use
    # AddToStoreNar instead.
    s.start_work()
    not_supported(Op.ImportPaths, "use a client that sends AddToStoreNar (Nix 2.4 or newer)")
