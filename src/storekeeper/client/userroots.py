"""Per-user roots as a client asks for them: over storekeeper's daemon (its own
operations, :class:`~storekeeper.formats.wire.ExtOp`); on a local store
:class:`storekeeper.store.roots.registrations.LocalUserRoots` answers the same.

Both answer the same four requests for the calling user: register roots,
unregister them, report runtime roots (held for the daemon's lease), list the
roots.  The real nix-daemon knows none of them: it answers ``invalid operation
N`` and closes the connection, which becomes :class:`NotStorekeeperDaemon`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterable, Iterator

from ..errors import StoreError
from ..formats.storepath import StorePath
from ..formats.wire import ExtOp, WireReader, WireWriter
from .errors import DaemonError
from .remote import RemoteStore


class NotStorekeeperDaemon(StoreError):
    """The daemon does not know storekeeper's operations (it is the real nix-daemon)."""


class RemoteUserRoots:
    def __init__(self, store: RemoteStore) -> None:
        self.store = store

    @contextmanager
    def _exchange(self, request: WireWriter, op: ExtOp) -> Iterator[WireReader]:
        try:
            with self.store._exchange(request) as r:
                yield r
        except DaemonError as e:
            if f"invalid operation {int(op)}" not in str(e):
                raise
            self.store._drop()  # it closes the connection after that error
            raise NotStorekeeperDaemon(
                f"the daemon at '{self.store.url}' does not know storekeeper's per-user roots "
                f"(operation {int(op)}, {op.name}): it is not storekeeper's daemon (the real "
                "nix-daemon?); make roots it reads itself with 'nix-store --add-root LINK "
                "--indirect -r PATH'") from None

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
        with self._exchange(WireWriter().u64(ExtOp.ListRoots), ExtOp.ListRoots) as r:
            return json.loads(r.string("roots", 1 << 30))
