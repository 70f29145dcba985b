"""What realising some targets would take, on a store without substituters
(QueryMissing): a question only, so nothing is pinned and nothing is locked."""

from __future__ import annotations

from collections import deque
from typing import Iterable

from ..formats.storepath import StorePath
from ..formats.wire import DerivedPath


def query_missing(store, targets: Iterable[DerivedPath]) -> tuple[set[StorePath], set[StorePath]]:
    """(will build, unknown) for realising ``targets`` on a store without substituters.

    An invalid opaque path or ``.drv`` is unknown.  A derivation with a wanted
    output that is not valid will be built, and so will (recursively) the
    input derivations whose used outputs are not valid; invalid input sources
    are unknown.  Nothing is pinned: this only answers a question.
    """
    will_build: set[StorePath] = set()
    unknown: set[StorePath] = set()
    seen: set[tuple[StorePath, frozenset[str] | None]] = set()
    queue = deque(targets)
    sd = store.store_dir
    while queue:
        dp = queue.popleft()
        wanted = None if dp.all_outputs or not dp.is_built else dp.outputs
        key = (dp.path, wanted if dp.is_built else frozenset({"<opaque>"}))
        if key in seen:
            continue
        seen.add(key)
        if not store.is_valid(dp.path):
            unknown.add(dp.path)
            continue
        if not dp.is_built or not dp.path.is_derivation:
            continue
        drv = store._read_drv_file(dp.path)
        paths = store.query_derivation_outputs(dp.path)
        paths.update({n: sd.parse(o.path, lax=True) for n, o in drv.outputs.items() if o.path})
        names = drv.outputs.keys() if wanted is None else wanted
        if all(n in paths and store.is_valid(paths[n]) for n in names):
            continue
        will_build.add(dp.path)
        for path, outs in drv.input_drvs.items():
            queue.append(DerivedPath(sd.parse(path, lax=True), frozenset(outs)))
        for path in drv.input_srcs:
            queue.append(DerivedPath(sd.parse(path, lax=True)))
    return will_build, unknown
