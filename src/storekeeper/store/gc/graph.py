"""The reference graph of a whole store, loaded in one pass, as integer adjacency lists.

Liveness is the forward closure of the roots over references, plus a path's
deriver when ``keep-derivations`` and a derivation's outputs when
``keep-outputs`` (spec §6.8: the same verdicts as Nix's referrer walk).
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

REFERENCE, DERIVER, OUTPUT = "reference", "deriver", "output"


class Graph:
    """The whole reference graph as integer adjacency lists (one DB pass)."""

    def __init__(self, db) -> None:
        conn = db.conn
        rows = conn.execute("select id, path, deriver from ValidPaths").fetchall()
        self.path_of: dict[int, str] = {}
        self.id_of: dict[str, int] = {}
        deriver_of: dict[int, str] = {}
        for i, p, d in rows:
            self.path_of[i] = p
            self.id_of[p] = i
            if d:
                deriver_of[i] = d
        self.refs: dict[int, list[int]] = {}
        refs = self.refs
        for a, b in conn.execute("select referrer, reference from Refs").fetchall():
            if a in refs:
                refs[a].append(b)
            else:
                refs[a] = [b]
        self._referrers: dict[int, list[int]] | None = None
        self.deriver: dict[int, int] = {i: self.id_of[d] for i, d in deriver_of.items() if d in self.id_of}
        self.outputs: dict[int, list[int]] = {}
        for drv, p in conn.execute("select drv, path from DerivationOutputs"):
            o = self.id_of.get(p)
            if o is not None:
                self.outputs.setdefault(drv, []).append(o)

    @property
    def referrers(self) -> dict[int, list[int]]:
        """Reverse edges, built on first use (only deleting named paths needs them)."""
        if self._referrers is None:
            rev: dict[int, list[int]] = {}
            for a, bs in self.refs.items():
                for b in bs:
                    rev.setdefault(b, []).append(a)
            self._referrers = rev
        return self._referrers

    def closure(self, start: Iterable[int], alive: set[int], keep_outputs: bool,
                keep_derivations: bool) -> None:
        queue = deque(i for i in start if i not in alive)
        alive.update(queue)
        while queue:
            i = queue.popleft()
            nxt = list(self.refs.get(i, ()))
            if keep_derivations and i in self.deriver:
                nxt.append(self.deriver[i])
            if keep_outputs:
                nxt.extend(self.outputs.get(i, ()))
            for j in nxt:
                if j not in alive:
                    alive.add(j)
                    queue.append(j)

    def edges(self, i: int, keep_outputs: bool, keep_derivations: bool) -> Iterable[tuple[int, str]]:
        for j in self.refs.get(i, ()):
            yield j, REFERENCE
        if keep_derivations and i in self.deriver:
            yield self.deriver[i], DERIVER
        if keep_outputs:
            for j in self.outputs.get(i, ()):
                yield j, OUTPUT

    def shortest_chain(self, roots: dict[int, str], target: int, keep_outputs: bool,
                       keep_derivations: bool) -> list[tuple[int, str]] | None:
        """Breadth-first from every root: [(root, root link), (next, edge kind), …, (target, kind)]."""
        parent: dict[int, tuple[int | None, str]] = {}
        queue: deque[int] = deque()
        for r, link in sorted(roots.items(), key=lambda kv: kv[1]):
            if r not in parent:
                parent[r] = (None, link)
                queue.append(r)
        while queue and target not in parent:
            i = queue.popleft()
            for j, kind in self.edges(i, keep_outputs, keep_derivations):
                if j not in parent:
                    parent[j] = (i, kind)
                    queue.append(j)
        if target not in parent:
            return None
        chain = []
        node: int | None = target
        while node is not None:
            prev, label = parent[node]
            chain.append((node, label))
            node = prev
        return chain[::-1]
