"""storekeeper's own operations as :class:`~storekeeper.client.remote.RemoteStore` methods
(:class:`~storekeeper.formats.wire.ExtOp`): read-only inspection (``stats``, ``gc
--dry-run``, ``why-alive``, ``roots`` with sizes) that a local store answers from its
files and storekeeper's daemon answers the same way.

The real nix-daemon knows none of them: it answers ``invalid operation N`` and
closes the connection, which becomes :class:`NotStorekeeperDaemon` (one line,
saying which operation and why).
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from ..api import GCDryRun, PoolStats
from ..errors import StoreError
from ..formats.storepath import StoreDir, StorePath
from ..formats.wire import ExtOp, WireReader, WireWriter
from .errors import DaemonError

#: each operation group: what it is, and what to do instead when the daemon is not storekeeper's
_GROUPS = {
    "roots": ("per-user roots",
              "make roots it reads itself with 'nix-store --add-root LINK --indirect -r PATH'"),
    "inspect": ("read-only inspection",
                "run this against the store itself (--store ROOT) on the daemon's host, or ask "
                "nix-store (--gc --print-dead, --gc --print-roots, -q --roots)"),
}


class NotStorekeeperDaemon(StoreError):
    """The daemon does not know storekeeper's operations (it is the real nix-daemon)."""


class StorekeeperOps:
    """The methods (mixed into :class:`RemoteStore`) that only storekeeper's daemon answers."""

    if TYPE_CHECKING:
        store_dir: StoreDir

        @property
        def url(self) -> str: ...

        def _exchange(self, request: WireWriter, payload: None = None,
                      on_line: Callable[[str], None] | None = None
                      ) -> AbstractContextManager[WireReader]: ...
        def _drop(self) -> None: ...
        def print_path(self, sp: StorePath) -> str: ...

    @contextmanager
    def ext_exchange(self, request: WireWriter, op: ExtOp, group: str = "inspect",
                     log: Callable[[str], None] | None = None) -> Iterator[WireReader]:
        """One of storekeeper's operations; :class:`NotStorekeeperDaemon` from another daemon.
        The daemon's log lines go to ``log`` (default: the store's)."""
        try:
            with self._exchange(request, on_line=log) as r:
                yield r
        except DaemonError as e:
            if f"invalid operation {int(op)}" not in str(e):
                raise
            self._drop()  # it closes the connection after that error
            what, instead = _GROUPS[group]
            raise NotStorekeeperDaemon(
                f"the daemon at '{self.url}' does not know storekeeper's {what} (operation "
                f"{int(op)}, {op.name}): it is not storekeeper's daemon (the real nix-daemon?); "
                f"{instead}") from None

    def store_stats(self) -> PoolStats:
        """The daemon's ``.links`` pool figures (``storekeeper stats``)."""
        with self.ext_exchange(WireWriter().u64(ExtOp.StoreStats), ExtOp.StoreStats) as r:
            return PoolStats.from_json(json.loads(r.string("stats", 1 << 20)))

    def gc_dry_run(self, log: Callable[[str], None] | None = None) -> GCDryRun:
        """What the daemon's GC would delete now, and the bytes that frees (read-only); its
        progress lines go to ``log``."""
        with self.ext_exchange(WireWriter().u64(ExtOp.GCDryRun), ExtOp.GCDryRun, log=log) as r:
            paths = r.strings("dead paths")
            return GCDryRun(paths, r.u64("bytes freed"), r.u64("apparent bytes freed"))

    def why_alive(self, sp: StorePath) -> list[tuple[str, str]] | None:
        """The shortest chain from a root to ``sp`` (see ``store.gc.inspect.why_alive``);
        None when no root reaches it.  Roots the daemon does not show us are ``{censored}``."""
        request = WireWriter().u64(ExtOp.WhyAlive).string(self.print_path(sp))
        with self.ext_exchange(request, ExtOp.WhyAlive) as r:
            chain = [(r.string("label"), r.string("path")) for _ in range(r.count("chain"))]
        return chain or None

    def space_report(self, nar: bool = False, top: int = 10) -> dict:
        """``du``'s report computed by the daemon on its store (SpaceReport), as
        ``SpaceReport.to_wire`` gives it; links of roots we may not see are ``{censored}``."""
        request = WireWriter().u64(ExtOp.SpaceReport).u64(int(nar)).u64(top)
        with self.ext_exchange(request, ExtOp.SpaceReport) as r:
            return json.loads(r.string("report", 1 << 30))

    def list_roots(self) -> dict:
        """Every root with its kind, owner, age and closure size, and the settings that
        decide them (ListRoots); links we may not see are ``{censored}``."""
        with self.ext_exchange(WireWriter().u64(ExtOp.ListRoots), ExtOp.ListRoots, "roots") as r:
            return json.loads(r.string("roots", 1 << 30))
