"""The reference graph of a whole store, loaded in one read snapshot, as compact integer arrays.

Liveness is the forward closure of the roots over references, plus a path's
deriver when ``keep-derivations`` and a derivation's outputs when
``keep-outputs`` (spec §6.8: the same verdicts as Nix's referrer walk).

A million-path store has four million references: one Python object per path
or per edge costs a gigabyte and most of the time.  So the graph keeps no
object per path: nodes are the DB's ``ValidPaths`` ids used as indices into
``array('I')`` columns, the edges are read in bulk as hex text that SQLite
formats (one step per chunk, the GIL released while it runs) and Python turns
into machine integers without a loop, and a path's name is looked up in the DB
only where one is needed.
"""

from __future__ import annotations

import heapq
import json
from array import array
from bisect import bisect_left, bisect_right
from itertools import accumulate, compress, islice, repeat
from operator import le
from typing import Iterable

from ...errors import StoreError
from .bulk import DERIVER_PAIRS, OUTPUT_PAIRS
from .bulk import ids_of_hex as _ids
from .bulk import snapshot as _snapshot

# referrer ids per bulk query: bounds the hex text SQLite builds at once (~16 bytes per edge)
_CHUNK = 1 << 18


def _decimal(text: str | None) -> list[int]:
    """'42,7,…' → [42, 7, …] (json's scanner: in C)."""
    return json.loads(f"[{text}]") if text else []


def _zeros(n: int) -> array:
    return array("I", bytes(4 * n))


class Graph:
    """The reference graph of one DB snapshot in compressed-sparse-row form.

    Node ``i`` is the valid path whose ``ValidPaths.id`` is ``i``; every column
    is indexed by id (``size`` is the largest id + 1; id 0 is never used).
    Node ``i`` refers to ``ref[off[i]:off[i + 1]]`` (self-references
    included); ``drv[i]`` is the id of its valid deriver (0: none); a
    derivation's valid outputs are the ``out_id`` entries whose ``out_drv`` is
    its id (both sorted by ``out_drv``).  Marks (alive, dead, seen) are
    ``bytearray(size)``s owned by the caller.
    """

    def __init__(self, db) -> None:
        self.db = db
        self._path_of: dict[int, str] | None = None
        with _snapshot(db.conn) as q:
            (top,) = q("select coalesce(max(id), 0) from ValidPaths").fetchone()
            self.size = top + 1
            self.off, self.ref = self._load_refs(q)
            if max(self.ref, default=0) >= self.size:
                raise StoreError("a reference to a path that is not valid")
            self.drv = _zeros(self.size)
            pairs = _ids(q(DERIVER_PAIRS).fetchone()[0])
            drv = self.drv
            for k in range(0, len(pairs), 2):
                drv[pairs[k]] = pairs[k + 1]
            pairs = _ids(q(OUTPUT_PAIRS).fetchone()[0])
            self.out_drv, self.out_id = pairs[0::2], pairs[1::2]
            self._has_drv = any(drv)
            if not _sorted(self.out_drv):
                order = sorted(range(len(self.out_drv)), key=self.out_drv.__getitem__)
                self.out_drv = array("I", (self.out_drv[k] for k in order))
                self.out_id = array("I", (pairs[2 * k + 1] for k in order))

    @classmethod
    def from_edges(cls, size: int, refs: dict[int, list[int]], deriver: dict[int, int] | None = None,
                   outputs: dict[int, list[int]] | None = None) -> "Graph":
        """A graph of nodes ``0..size-1`` given in memory (no DB; paths named ``/nix/store/<id>``;
        node 0 cannot be a deriver)."""
        g = cls.__new__(cls)
        g.db, g.size = None, size
        g._path_of = {i: f"/nix/store/{i}" for i in range(size)}
        g.off = array("I", accumulate((len(refs.get(i, ())) for i in range(size)), initial=0))
        g.ref = array("I", (j for i in range(size) for j in refs.get(i, ())))
        g.drv = _zeros(size)
        for i, d in (deriver or {}).items():
            g.drv[i] = d
        g._has_drv = any(g.drv)
        pairs = sorted((d, o) for d, os_ in (outputs or {}).items() for o in os_)
        g.out_drv, g.out_id = array("I", (d for d, _ in pairs)), array("I", (o for _, o in pairs))
        return g

    def _load_refs(self, q) -> tuple[array, array]:
        """(off, ref): the Refs table as CSR, read in chunks of referrer ids.

        Per chunk two statements, each one SQLite step with the GIL released: the
        references in (referrer, reference) order as decimal text, and each
        referrer's count in the same order; ``json`` parses the text in C.
        """
        ref = array("I")
        counts = _zeros(self.size)
        for lo in range(0, self.size, _CHUNK):
            hi = min(lo + _CHUNK, self.size)
            who, many = q("select group_concat(referrer), group_concat(c) from (select referrer, count(*) c "
                          "from Refs where referrer >= ?1 and referrer < ?2 group by referrer "
                          "order by referrer)", (lo, hi)).fetchone()
            if not who:
                continue
            refs = q("select group_concat(reference) from (select reference from Refs where referrer >= ?1 "
                     "and referrer < ?2 order by referrer, reference)", (lo, hi)).fetchone()[0]
            ref.extend(_decimal(refs))
            per = dict(zip(_decimal(who), _decimal(many)))
            counts[lo:hi] = array("I", map(per.get, range(lo, hi), repeat(0)))
        off = array("I", accumulate(counts, initial=0))
        if off[-1] != len(ref):
            raise StoreError("the Refs table changed while it was read")
        return off, ref

    # --- walking --------------------------------------------------------------------

    def marks(self) -> bytearray:
        return bytearray(self.size)

    def outputs_of(self, i: int) -> array:
        lo = bisect_left(self.out_drv, i)
        if lo == len(self.out_drv) or self.out_drv[lo] != i:
            return array("I")
        return self.out_id[lo:bisect_right(self.out_drv, i)]

    def successors(self, i: int, keep_outputs: bool, keep_derivations: bool) -> Iterable[int]:
        nxt: Iterable[int] = self.ref[self.off[i]:self.off[i + 1]]
        if keep_derivations and self.drv[i]:
            nxt = [*nxt, self.drv[i]]
        if keep_outputs:
            outs = self.outputs_of(i)
            if outs:
                nxt = [*nxt, *outs]
        return nxt

    def closure(self, start: Iterable[int], alive: bytearray, keep_outputs: bool,
                keep_derivations: bool) -> None:
        """Mark everything reachable from ``start`` in ``alive`` (depth-first, iterative)."""
        stack = [i for i in start if 0 <= i < self.size and not alive[i]]
        for i in stack:
            alive[i] = 1
        off, ref, push, pop = self.off, self.ref, stack.append, stack.pop
        if keep_outputs or (keep_derivations and self._has_drv):
            succ = self.successors
            while stack:
                for j in succ(pop(), keep_outputs, keep_derivations):
                    if not alive[j]:
                        alive[j] = 1
                        push(j)
            return
        while stack:  # (references only: the hot loop of a GC, kept bare)
            i = pop()
            for j in ref[off[i]:off[i + 1]]:
                if not alive[j]:
                    alive[j] = 1
                    push(j)

    def closure_ids(self, start: Iterable[int], keep_outputs: bool, keep_derivations: bool) -> list[int]:
        seen = self.marks()
        self.closure(start, seen, keep_outputs, keep_derivations)
        return list(compress(range(self.size), seen))

    def closure_sums(self, starts: list[int], weights: array, keep_outputs: bool,
                     keep_derivations: bool) -> list[int] | None:
        """The sum of ``weights`` over each start's closure, for all starts in one pass
        per 64 of them, or None when the ids are not in reference order (the caller then
        walks each closure).

        Ids follow registration, and a path's references and its deriver are
        registered before it, so an edge almost always goes to a lower id; when every
        edge reached does, visiting the ids from the highest down finishes each
        node's *holder mask* (which starts reach it) before pushing it along its edges.
        A derivation's outputs come after it (``keep-outputs``): no such order.
        """
        if keep_outputs and len(self.out_id):
            return None
        off, ref, drv = self.off, self.ref, self.drv
        derivers = keep_derivations and self._has_drv
        sums = [0] * len(starts)
        for base in range(0, len(starts), 64):  # (masks of at most 64 bits: machine words)
            chunk = starts[base:base + 64]
            masks = [0] * self.size
            for bit, s in enumerate(chunk):
                if 0 < s < self.size:
                    masks[s] |= 1 << bit
            for i in range(max(chunk, default=0), 0, -1):
                m = masks[i]
                if not m:
                    continue
                for j in ref[off[i]:off[i + 1]]:
                    if j >= i:
                        if j == i:
                            continue
                        return None
                    masks[j] |= m
                if derivers and drv[i]:
                    if drv[i] >= i:
                        return None
                    masks[drv[i]] |= m
            groups: dict[int, int] = {}  # mask -> summed weight: paths held alike fall together
            for i in compress(range(self.size), masks):
                groups[masks[i]] = groups.get(masks[i], 0) + weights[i]
            for m, w in groups.items():
                while m:
                    low = m & -m
                    sums[base + low.bit_length() - 1] += w
                    m ^= low
        return sums

    def referrers_first(self, ids: Iterable[int], nodes: bytearray) -> array:
        """Those of ``ids`` marked in ``nodes``, each after every marked node that refers to
        it (Kahn's algorithm over the CSR arrays).  Among the ready ones the highest id goes
        first: ids follow registration, and inodes creation, so a deletion in this order
        walks the inode table (and the DB's rowid order) nearly sequentially, from the
        newest down, instead of jumping around it in name (hash) order, which on a cold
        cache costs a disk read per path."""
        off, ref = self.off, self.ref
        indeg = _zeros(self.size)
        members = [i for i in ids if nodes[i]]
        for i in members:
            for j in ref[off[i]:off[i + 1]]:
                if nodes[j] and j != i:
                    indeg[j] += 1
        ready = [-i for i in members if not indeg[i]]
        heapq.heapify(ready)
        order = array("I")
        while ready:
            i = -heapq.heappop(ready)
            order.append(i)
            for j in ref[off[i]:off[i + 1]]:
                if nodes[j] and j != i:
                    indeg[j] -= 1
                    if not indeg[j]:
                        heapq.heappush(ready, -j)
        if len(order) != len(members):
            raise StoreError("cycle in the reference graph of dead paths")
        return order

    # --- names: from the DB, only where needed ----------------------------------------

    def id_of_path(self, path: str) -> int | None:
        if self.db is None:  # (from_edges)
            return next((i for i, p in self.path_of.items() if p == path), None)
        row = self.db.conn.execute("select id from ValidPaths where path = ?", (path,)).fetchone()
        return row[0] if row and row[0] < self.size else None

    def path_of_id(self, i: int) -> str:
        if self.db is None:
            return self.path_of[i]
        row = self.db.conn.execute("select path from ValidPaths where id = ?", (i,)).fetchone()
        if row is None:
            raise KeyError(i)
        return row[0]

    def ids_of_hash(self, store_path_prefix: str) -> list[int]:
        """Ids of the valid paths whose name starts ``<store>/<hash>-``."""
        lo = store_path_prefix + "-"
        hi = store_path_prefix + "."  # ('-' + 1)
        return [i for (i,) in self.db.conn.execute(
            "select id from ValidPaths where path >= ? and path < ?", (lo, hi)) if i < self.size]

    def select(self, marks: bytearray, value: int, ids: bool = True) -> tuple[array, list[str]]:
        """(ids, paths) of the valid paths of the snapshot whose mark is ``value``, in path
        order (no ids unless ``ids``); SQLite filters and joins them in one step."""
        blob = bytes(marks)
        want = bytes([value])
        id_text = "group_concat(printf('%08x', id), '')" if ids else "null"
        with _snapshot(self.db.conn) as q:
            ids_hex, text = q(f"select {id_text}, group_concat(path, char(10)) from (select id, path "
                              "from ValidPaths where substr(?1, id + 1, 1) = ?2 order by path)",
                              (blob, want)).fetchone()
        return _ids(ids_hex), (text.split("\n") if text else [])

    def nar_sizes(self) -> array:
        """``narSize`` by id (0 where unknown), read in bulk."""
        out = array("Q", bytes(8 * self.size))
        with _snapshot(self.db.conn) as q:
            ids, sizes = q("select group_concat(id), group_concat(coalesce(narSize, 0)) from ValidPaths "
                           "where id < ?", (self.size,)).fetchone()
        for i, n in zip(_decimal(ids), _decimal(sizes)):
            out[i] = n
        return out

    @property
    def path_of(self) -> dict[int, str]:
        """Every path by id (a dict of the whole store: for callers that need most names)."""
        if self._path_of is None:
            self._path_of = {i: p for i, p in self.db.conn.execute("select id, path from ValidPaths")
                             if i < self.size}
        return self._path_of

    # --- the adjacency as mappings (callers written for dict-of-lists graphs) ---------

    @property
    def id_of(self) -> "_IdOf":
        return _IdOf(self)

    @property
    def refs(self) -> "_Refs":
        return _Refs(self)

    @property
    def deriver(self) -> "_Deriver":
        return _Deriver(self)

    @property
    def outputs(self) -> "_Outputs":
        return _Outputs(self)

    def referrers_of(self, i: int) -> list[int]:
        """Reverse edges from the DB's index (only deleting named paths needs them)."""
        return [r for (r,) in self.db.conn.execute("select referrer from Refs where reference = ?", (i,))
                if r < self.size]


class _IdOf:
    def __init__(self, g: Graph) -> None:
        self.g = g

    def get(self, path: str, default: int | None = None) -> int | None:
        i = self.g.id_of_path(path)
        return default if i is None else i

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.g.id_of_path(path) is not None

    def __getitem__(self, path: str) -> int:
        i = self.g.id_of_path(path)
        if i is None:
            raise KeyError(path)
        return i


class _Refs:
    def __init__(self, g: Graph) -> None:
        self.g = g

    def get(self, i: int, default=()):
        g = self.g
        if not 0 <= i < g.size or g.off[i] == g.off[i + 1]:
            return default
        return g.ref[g.off[i]:g.off[i + 1]]


class _Deriver:
    def __init__(self, g: Graph) -> None:
        self.g = g

    def __contains__(self, i: int) -> bool:
        return 0 <= i < self.g.size and self.g.drv[i] != 0

    def __getitem__(self, i: int) -> int:
        if i not in self:
            raise KeyError(i)
        return self.g.drv[i]


class _Outputs:
    def __init__(self, g: Graph) -> None:
        self.g = g

    def get(self, i: int, default=()):
        return self.g.outputs_of(i) or default


def stray_names(db, store_dir, entries: Iterable[str]) -> set[str]:
    """Those of the store directory's ``entries`` that are not valid paths now (set
    differences in C, a chunk of ids at a time: no Python loop over a million names,
    and never a million of them held twice)."""
    names = set(entries)
    with _snapshot(db.conn) as q:
        (top,) = q("select coalesce(max(id), 0) from ValidPaths").fetchone()
        for lo in range(0, top + 1, _CHUNK):
            (text,) = q("select group_concat(substr(path, ?1), char(10)) from ValidPaths "
                        "where id >= ?2 and id < ?3", (len(store_dir.path) + 2, lo, lo + _CHUNK)).fetchone()
            if text:
                names.difference_update(text.split("\n"))
    return names


def _sorted(a: array) -> bool:
    return all(map(le, a, islice(a, 1, None)))
