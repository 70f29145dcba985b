"""Why a path is alive: the shortest chain from a root to it, read from the part of the
graph that can reach it.

Only the target's referrer closure (every path from which it is reachable) can
hold a chain to it, so this walks the DB's reference index backwards from the
target, a breadth-first layer per statement, and then runs the forward
breadth-first search from the roots inside that closure alone.  On a million-path
store that closure is typically a few per cent of the graph, read in well under a
second, where loading the whole graph (:class:`.graph.Graph`) takes seconds.

The answer is the one a breadth-first search over the whole graph gives: every
node of a shortest path from a root to a member of the closure is itself a
member, so the search restricted to the closure visits the members in the same
order and gives each the same parent.  Ties go to the root whose label sorts
first, then to references in id order, then the deriver, then outputs in
output-name order.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left

from ...formats.storepath import StorePath
from ..roots import CENSORED, Root
from .bulk import DERIVER_PAIRS, OUTPUT_PAIRS, ids_of_hex, snapshot
from .rootlist import Validity, all_roots

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable

REFERENCE, DERIVER, OUTPUT = "reference", "deriver", "output"

# referrers of a whole breadth-first layer in one statement (the layer as JSON: one
# bound parameter, looked up through the reference index)
_LAYER_REFERRERS = ("select group_concat(printf('%08x%08x', referrer, reference), '') from Refs "
                    "where reference in (select value from json_each(?1))")


def _pairs(hex_text: str | None) -> array:
    """'0000002a00000007…' (16 hex digits per edge) → array('Q', [42 << 32 | 7, …])."""
    out = array("Q")
    if hex_text:
        out.frombytes(bytes.fromhex(hex_text))
        if sys.byteorder == "little":
            out.byteswap()
    return out


class Ancestry:
    """The sub-graph of one DB snapshot that can reach ``target``.

    ``members`` is every valid path with a chain of edges to ``target`` (the
    target included); ``_edges`` every reference between members as ``referrer << 32 |
    reference``, sorted; ``deriver[i]`` is member ``i``'s valid deriver (``keep-derivations``)
    and ``outputs[i]`` a derivation's valid outputs (``keep-outputs``), members or not.
    """

    def __init__(self, db, target: int, keep_outputs: bool, keep_derivations: bool) -> None:
        self.target = target
        self.keep_outputs, self.keep_derivations = keep_outputs, keep_derivations
        self.deriver: dict[int, int] = {}
        self.outputs: dict[int, list[int]] = {}
        holders: dict[int, list[int]] = {}  # reverse of the deriver and output edges
        with snapshot(db.conn) as q:
            if keep_derivations:
                pairs = ids_of_hex(q(DERIVER_PAIRS).fetchone()[0])
                for path, drv in zip(pairs[0::2], pairs[1::2]):
                    self.deriver[path] = drv
                    holders.setdefault(drv, []).append(path)
            if keep_outputs:
                pairs = ids_of_hex(q(OUTPUT_PAIRS).fetchone()[0])
                for drv, out in zip(pairs[0::2], pairs[1::2]):
                    self.outputs.setdefault(drv, []).append(out)
                    holders.setdefault(out, []).append(drv)
            edges = array("Q")  # referrer << 32 | reference: sorted, a member's references are a run
            self.members = {target}
            layer = [target]
            while layer:
                text = q(_LAYER_REFERRERS, ("[" + ",".join(map(str, layer)) + "]",)).fetchone()[0]
                edges.extend(_pairs(text))
                new = set(ids_of_hex(text)[0::2])
                if holders:
                    for i in layer:
                        new.update(holders.get(i, ()))
                new -= self.members
                self.members |= new
                layer = sorted(new)
        self._edges = sorted(edges)

    def refs(self, i: int) -> list[int]:
        """The members that member ``i`` refers to, in id order."""
        edges = self._edges
        lo = bisect_left(edges, i << 32)
        return [e & 0xFFFFFFFF for e in edges[lo:bisect_left(edges, (i + 1) << 32, lo)]]

    def successors(self, i: int) -> list[int]:
        nxt = self.refs(i)
        if self.keep_derivations and i in self.deriver:
            nxt = [*nxt, self.deriver[i]]
        if self.keep_outputs and i in self.outputs:
            nxt = [*nxt, *self.outputs[i]]
        return nxt

    def edge_kind(self, i: int, j: int) -> str:
        """The kind of the first edge ``i`` → ``j`` in successor order."""
        if j in self.refs(i):
            return REFERENCE
        if self.keep_derivations and self.deriver.get(i) == j:
            return DERIVER
        return OUTPUT

    def shortest_chain(self, roots: dict[int, str]) -> list[tuple[int, str]] | None:
        """Breadth-first from every root: [(root, root label), (next, edge kind), …,
        (target, kind)], or None when no root reaches the target."""
        members, target = self.members, self.target
        parent: dict[int, int] = {}  # a root is its own parent
        queue = []
        for r, _ in sorted(roots.items(), key=lambda kv: kv[1]):
            if r in members:  # (a root outside the closure cannot reach the target)
                parent[r] = r
                queue.append(r)
        k = 0
        while k < len(queue) and target not in parent:
            i = queue[k]
            k += 1
            for j in self.successors(i):
                if j not in parent and j in members:
                    parent[j] = i
                    queue.append(j)
        if target not in parent:
            return None
        chain = []
        node = target
        while parent[node] != node:
            prev = parent[node]
            chain.append((node, self.edge_kind(prev, node)))
            node = prev
        chain.append((node, roots[node]))
        return chain[::-1]


def why_alive(store, sp: StorePath,
              hide_link: Callable[[Root], bool] = lambda r: False) -> list[tuple[str, str]] | None:
    """The shortest chain root → … → ``sp``: [(root label, root path), (edge kind, path), …].

    ``hide_link`` says which roots' links the asker may not see: such a root is
    labelled ``{censored}`` (a visible root of the same path is preferred).
    """
    ids = Validity(store.db)
    target = ids.id_of_path(store.print_path(sp))
    if target is None:
        return None
    roots: dict[int, str] = {}
    for r in all_roots(store):
        i = ids.id_of_path(store.print_path(r.path))
        if i is None:
            continue
        if hide_link(r):
            roots.setdefault(i, f"{CENSORED} ({r.kind} root)")
        elif roots.get(i, CENSORED).startswith(CENSORED):
            roots[i] = f"{r.link} ({r.kind} root)"
    s = store.settings
    chain = Ancestry(store.db, target, s.keep_outputs, s.keep_derivations).shortest_chain(roots)
    if chain is None:
        return None
    return [(label, ids.path_of_id(i)) for i, label in chain]
