"""Per-user roots as a client asks for them: over storekeeper's daemon (its own
operations, :class:`~storekeeper.formats.wire.ExtOp`); on a local store
:class:`storekeeper.store.roots.registrations.LocalUserRoots` answers the same.

Both answer the same four requests for the calling user: register roots,
unregister them, report runtime roots (held for the daemon's lease), list the
roots.  The real nix-daemon knows none of them: it answers ``invalid operation
N`` and closes the connection, which becomes :class:`NotStorekeeperDaemon`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Iterable

from ..formats.storepath import StorePath
from ..formats.wire import ExtOp, WireReader, WireWriter
from .extops import NotStorekeeperDaemon
from .remote import RemoteStore

__all__ = ["NotStorekeeperDaemon", "RemoteUserRoots"]


class RemoteUserRoots:
    def __init__(self, store: RemoteStore) -> None:
        self.store = store

    def _exchange(self, request: WireWriter, op: ExtOp) -> AbstractContextManager[WireReader]:
        return self.store.ext_exchange(request, op, "roots")

    def register(self, entries: Iterable[tuple[str, StorePath]]) -> list[str]:
        entries = list(entries)
        w = WireWriter().u64(ExtOp.RegisterRoots).u64(len(entries))
        for name, sp in entries:
            w.string(name).string(self.store.print_path(sp))
        with self._exchange(w, ExtOp.RegisterRoots) as r:
            return r.strings("refused roots")

    def unregister(self, names: Iterable[str]) -> list[str]:
        w = WireWriter().u64(ExtOp.UnregisterRoots).strings(list(names))
        with self._exchange(w, ExtOp.UnregisterRoots) as r:
            return r.strings("removed roots")

    def report_runtime(self, lease_name: str, paths: Iterable[str]) -> tuple[int, int]:
        w = WireWriter().u64(ExtOp.ReportRuntimeRoots).string(lease_name).strings(sorted(paths))
        with self._exchange(w, ExtOp.ReportRuntimeRoots) as r:
            return r.u64("lease seconds"), r.u64("held")

    def overview(self) -> dict:
        return self.store.list_roots()
