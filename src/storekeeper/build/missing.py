"""What realising some targets would take (QueryMissing): a question only, so
nothing is pinned, nothing is locked and nothing is downloaded.

With substituters, a path some cache has a narinfo for "will be substituted"
(with its references that are not valid), with no signature check, as Nix 2.8
(``nix-store -r --dry-run`` says "will be fetched" for an unsigned path).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from ..formats.storepath import StorePath
from ..formats.wire import DerivedPath


@dataclass
class Missing:
    will_build: set[StorePath] = field(default_factory=set)
    will_substitute: set[StorePath] = field(default_factory=set)
    unknown: set[StorePath] = field(default_factory=set)
    download_size: int = 0
    nar_size: int = 0


def query_missing(store, targets: Iterable[DerivedPath]) -> tuple[set[StorePath], set[StorePath]]:
    """(will build, unknown) for realising ``targets`` on a store without substituters."""
    m = what_is_missing(store, targets)
    return m.will_build, m.unknown


def what_is_missing(store, targets: Iterable[DerivedPath], subs=None) -> Missing:
    """What realising ``targets`` takes; ``subs``: a
    :class:`~storekeeper.build.substitute.Substituters` (None: build only).

    An invalid opaque path no cache has, or an invalid ``.drv``, is unknown.  A
    derivation with a wanted output that is not valid will be substituted when
    caches have all such outputs (and it allows substitutes), else built, and so
    will (recursively) the input derivations whose used outputs are not valid.
    """
    m = Missing()
    seen: set[tuple[StorePath, frozenset[str] | None]] = set()
    queue = deque(targets)
    sd = store.store_dir

    def substitutable(paths: list[StorePath]) -> bool:
        """Record ``paths`` (and their invalid references) as fetched if caches have all."""
        if subs is None:
            return False
        subs.prefetch(paths)  # (each cache looks them up in parallel)
        level = []
        for p in paths:
            hit = subs.query(p)
            if hit is None:
                return False
            level.append(hit[1])
        while level:
            refs: set[StorePath] = set()
            for ni in level:
                if ni.path in m.will_substitute:
                    continue
                m.will_substitute.add(ni.path)
                m.download_size += ni.file_size or 0
                m.nar_size += ni.nar_size
                refs |= ni.references - {ni.path}
            todo = sorted(r for r in refs if r not in m.will_substitute and not store.is_valid(r))
            subs.prefetch(todo)
            level = []
            for r in todo:
                hit = subs.query(r)
                if hit is None:
                    m.unknown.add(r)
                else:
                    level.append(hit[1])
        return True

    while queue:
        dp = queue.popleft()
        wanted = None if dp.all_outputs or not dp.is_built else dp.outputs
        key = (dp.path, wanted if dp.is_built else frozenset({"<opaque>"}))
        if key in seen:
            continue
        seen.add(key)
        if not store.is_valid(dp.path):
            if dp.is_built or not substitutable([dp.path]):
                m.unknown.add(dp.path)
            continue
        if not dp.is_built or not dp.path.is_derivation:
            continue
        drv = store._read_drv_file(dp.path)
        paths = store.query_derivation_outputs(dp.path)
        paths.update({n: sd.parse(o.path, lax=True) for n, o in drv.outputs.items() if o.path})
        names = drv.outputs.keys() if wanted is None else wanted
        invalid = [paths.get(n) for n in names if not (n in paths and store.is_valid(paths[n]))]
        if not invalid:
            continue
        if None not in invalid and drv.env.get("allowSubstitutes", "1") != "" \
                and substitutable([p for p in invalid if p is not None]):
            continue
        m.will_build.add(dp.path)
        for path, outs in drv.input_drvs.items():
            queue.append(DerivedPath(sd.parse(path, lax=True), frozenset(outs)))
        for path in drv.input_srcs:
            queue.append(DerivedPath(sd.parse(path, lax=True)))
    return m
