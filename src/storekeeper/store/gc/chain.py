"""Why a path is alive: the shortest chain from a root to it, without loading the graph.

The answer is the one a breadth-first search from all the roots over the whole
graph gives (ties go to the root whose label sorts first, then to references in id
order, then the deriver, then outputs in output-name order).  Two walks read the
DB a breadth-first layer per statement (through its reference indexes), taking
turns by the smaller next layer, until one of them answers:

* forward from the roots (:class:`_Forward`): that search itself, stopped where it
  reaches the target: cheap for a path many paths hold (a few layers from a root);
* backward from the target (:class:`_Backward`): its referrer closure, the only
  paths that can be on a chain to it, then the forward search inside that closure
  alone (:class:`Ancestry`): cheap for a path few paths hold, however deep.  Every
  predecessor of a member is a member, so the restricted search visits the members
  in the same order and gives each the same parent as the whole one.

On the million-path store a path held by 8 % of the store took 1.8 s with the whole
graph and takes 0.4 s; one held by 98 % (reached 5 layers from a root) is answered
by the forward walk.
"""

from __future__ import annotations

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

# the edges into / out of a whole breadth-first layer in one statement (the layer as JSON:
# one bound parameter, looked up through the reference / referrer index)
_LAYER_REFERRERS = ("select group_concat(printf('%08x%08x', referrer, reference), '') from Refs "
                    "where reference in (select value from json_each(?1))")
_LAYER_REFERENCES = ("select group_concat(printf('%08x%08x', referrer, reference), '') from Refs "
                     "where referrer in (select value from json_each(?1))")


def _pairs(hex_text: str | None) -> array:
    """'0000002a00000007…' (16 hex digits per edge) → array('Q', [42 << 32 | 7, …])."""
    return ids_of_hex(hex_text, "Q")


def _json_ids(ids: list[int]) -> tuple[str]:
    return ("[" + ",".join(map(str, ids)) + "]",)


def _refs_of(edges: list[int], i: int) -> list[int]:
    """What ``i`` refers to, in id order, from sorted ``referrer << 32 | reference`` codes."""
    lo = bisect_left(edges, i << 32)
    return [e & 0xFFFFFFFF for e in edges[lo:bisect_left(edges, (i + 1) << 32, lo)]]


def _unwind(parent: dict[int, tuple[int, str]], target: int) -> list[tuple[int, str]]:
    """The chain from a root (its own parent) to ``target`` along the search's ``parent``s."""
    out = []
    node = target
    while True:
        prev, kind = parent[node]
        out.append((node, kind))
        if prev == node:
            return out[::-1]
        node = prev


class _Extra:
    """The deriver and output edges (``keep-derivations``, ``keep-outputs``), both ways,
    read whole (one scan; references are read a layer at a time)."""

    def __init__(self, q, keep_outputs: bool, keep_derivations: bool) -> None:
        self.deriver: dict[int, int] = {}
        self.outputs: dict[int, list[int]] = {}
        self.holders: dict[int, list[int]] = {}  # their reverse
        if keep_derivations:
            pairs = ids_of_hex(q(DERIVER_PAIRS).fetchone()[0])
            for path, drv in zip(pairs[0::2], pairs[1::2]):
                self.deriver[path] = drv
                self.holders.setdefault(drv, []).append(path)
        if keep_outputs:
            pairs = ids_of_hex(q(OUTPUT_PAIRS).fetchone()[0])
            for drv, out in zip(pairs[0::2], pairs[1::2]):
                self.outputs.setdefault(drv, []).append(out)
                self.holders.setdefault(out, []).append(drv)

    def after_refs(self, i: int, refs: list[int]) -> list[tuple[int, str]]:
        """``i``'s successors in search order, with the kind of edge to each."""
        nxt = [(j, REFERENCE) for j in refs]
        if i in self.deriver:
            nxt.append((self.deriver[i], DERIVER))
        for j in self.outputs.get(i, ()):
            nxt.append((j, OUTPUT))
        return nxt


class _Forward:
    """The breadth-first search from the roots, a layer per step; ``done`` once it has
    reached the target (``found``) or run out of paths."""

    def __init__(self, q, extra: _Extra, roots: dict[int, str], target: int) -> None:
        self.q, self.extra, self.target = q, extra, target
        self.parent: dict[int, tuple[int, str]] = {}  # node -> (parent, edge kind); a root: itself
        self.layer = []
        for r, label in sorted(roots.items(), key=lambda kv: kv[1]):
            self.parent[r] = (r, label)
            self.layer.append(r)
        self.found = target in self.parent
        self.done = self.found or not self.layer

    def step(self) -> None:
        text = self.q(_LAYER_REFERENCES, _json_ids(self.layer)).fetchone()[0]
        edges = sorted(_pairs(text))
        parent, nxt = self.parent, []
        for i in self.layer:
            for j, kind in self.extra.after_refs(i, _refs_of(edges, i)):
                if j not in parent:
                    parent[j] = (i, kind)
                    nxt.append(j)
                    if j == self.target:
                        self.found = self.done = True
                        return
        self.layer = nxt
        self.done = not nxt

    def chain(self) -> list[tuple[int, str]]:
        return _unwind(self.parent, self.target)


class _Backward:
    """The target's referrer closure, a layer per step; ``done`` once complete."""

    def __init__(self, q, extra: _Extra, target: int) -> None:
        self.q, self.extra, self.target = q, extra, target
        self.edges = array("Q")  # referrer << 32 | reference, between members
        self.members = {target}
        self.layer = [target]
        self.done = False

    def step(self) -> None:
        text = self.q(_LAYER_REFERRERS, _json_ids(self.layer)).fetchone()[0]
        self.edges.extend(_pairs(text))
        new = set(ids_of_hex(text)[0::2])
        holders = self.extra.holders
        if holders:
            for i in self.layer:
                new.update(holders.get(i, ()))
        new -= self.members
        self.members |= new
        self.layer = sorted(new)
        self.done = not new


class Ancestry:
    """The sub-graph that can reach ``target`` (a finished :class:`_Backward`): ``members``
    is every path with a chain of edges to it (itself included)."""

    def __init__(self, walk: _Backward) -> None:
        self.target, self.extra, self.members = walk.target, walk.extra, walk.members
        self._edges = sorted(walk.edges)

    def shortest_chain(self, roots: dict[int, str]) -> list[tuple[int, str]] | None:
        """Breadth-first from every root inside the closure: [(root, root label), (next, edge
        kind), …, (target, kind)], or None when no root reaches the target."""
        members, target = self.members, self.target
        parent: dict[int, tuple[int, str]] = {}
        queue = []
        for r, label in sorted(roots.items(), key=lambda kv: kv[1]):
            if r in members:  # (a root outside the closure cannot reach the target)
                parent[r] = (r, label)
                queue.append(r)
        k = 0
        while k < len(queue) and target not in parent:
            i = queue[k]
            k += 1
            for j, kind in self.extra.after_refs(i, _refs_of(self._edges, i)):
                if j not in parent and j in members:
                    parent[j] = (i, kind)
                    queue.append(j)
        return _unwind(parent, target) if target in parent else None


def shortest_chain(db, roots: dict[int, str], target: int, keep_outputs: bool, keep_derivations: bool,
                   walk: str = "both") -> list[tuple[int, str]] | None:
    """[(root, root label), (next, edge kind), …, (target, kind)] in one DB snapshot, or None
    when no root reaches ``target``.  ``walk`` ("forward", "backward": only that one; tests)."""
    with snapshot(db.conn) as q:
        extra = _Extra(q, keep_outputs, keep_derivations)
        fwd = _Forward(q, extra, roots, target)
        back = _Backward(q, extra, target)
        while not (fwd.done or back.done):
            if walk == "forward" or (walk == "both" and len(fwd.layer) <= len(back.layer)):
                fwd.step()
            else:
                back.step()
    if fwd.done:
        return fwd.chain() if fwd.found else None
    return Ancestry(back).shortest_chain(roots)


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
    chain = shortest_chain(store.db, roots, target, s.keep_outputs, s.keep_derivations)
    if chain is None:
        return None
    return [(label, ids.path_of_id(i)) for i, label in chain]
