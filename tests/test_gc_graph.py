"""The compact reference graph (store.gc.graph) read from a real DB equals the DB's rows,
also across id gaps left by collections and across the chunks it reads in."""

from __future__ import annotations

import os
import random
from array import array

from test_gc import generate

from storekeeper.api import DELETE_SPECIFIC, GCOptions
from storekeeper.formats.url import LocalLayout
from storekeeper.store.gc import graph as graph_mod
from storekeeper.store.gc.graph import Graph, stray_names
from storekeeper.store.local import LocalStore


def _naive(conn) -> tuple[dict[int, set[int]], dict[int, int], dict[int, set[int]]]:
    refs: dict[int, set[int]] = {}
    for a, b in conn.execute("select referrer, reference from Refs"):
        refs.setdefault(a, set()).add(b)
    ids = dict((p, i) for i, p in conn.execute("select id, path from ValidPaths"))
    deriver = {i: ids[d] for i, d in conn.execute("select id, deriver from ValidPaths") if d in ids}
    outputs: dict[int, set[int]] = {}
    for d, p in conn.execute("select drv, path from DerivationOutputs"):
        if p in ids:
            outputs.setdefault(d, set()).add(ids[p])
    return refs, deriver, outputs


def test_graph_equals_the_db_rows_with_gaps(tmp_path, monkeypatch):
    monkeypatch.setattr(graph_mod, "_CHUNK", 3)  # many chunks, some of them empty
    root = str(tmp_path / "s")
    made = generate(root, seed=4, n=40)["paths"]
    with LocalStore(LocalLayout.chroot(root)) as s:
        # leave holes in the ids: delete a few paths nothing refers to
        victims = [p for p in made if not s.db.referrers(s.store_dir.print(p))][:4]
        s.collect_garbage(GCOptions(action=DELETE_SPECIFIC, paths=victims, ignore_liveness=True))
        refs, deriver, outputs = _naive(s.db.conn)
        g = Graph(s.db)
        valid = [i for (i,) in s.db.conn.execute("select id from ValidPaths")]
        assert len(valid) < max(valid)  # there are gaps
        for i in range(g.size):
            assert set(g.refs.get(i, ())) == refs.get(i, set())
            assert (g.deriver[i] if i in g.deriver else None) == deriver.get(i)
            assert set(g.outputs.get(i, ())) == outputs.get(i, set())
        # closure marks equal a naive walk
        for start in valid[:10]:
            want, todo = set(), [start]
            while todo:
                i = todo.pop()
                if i not in want:
                    want.add(i)
                    todo += refs.get(i, ())
                    todo += [deriver[i]] if i in deriver else []
            assert set(g.closure_ids([start], False, True)) == want
        alive = g.marks()
        g.closure(valid[:3], alive, False, True)
        ids, paths = g.select(alive, 0)
        by_id = dict(s.db.conn.execute("select id, path from ValidPaths"))
        assert list(paths) == sorted(by_id[i] for i in valid if not alive[i])
        assert [by_id[i] for i in ids] == list(paths)


def test_stray_names_are_the_entries_that_are_not_valid(tmp_path, monkeypatch):
    monkeypatch.setattr(graph_mod, "_CHUNK", 4)
    root = str(tmp_path / "s")
    generate(root, seed=5, n=20)
    with LocalStore(LocalLayout.chroot(root)) as s:
        entries = os.listdir(s.real_store_dir)
        junk = ["00000000000000000000000000000000-junk", "tmp-123", "x.lock"]
        assert stray_names(s.db, s.store_dir, entries + junk) == set(junk) | ({".links"} & set(entries))
        # valid paths missing from the listing are not strays (nor anything else)
        assert stray_names(s.db, s.store_dir, junk) == set(junk)


def _walked(g: Graph, starts: list[int], weights, keep_outputs: bool, keep_derivations: bool) -> list[int]:
    return [sum(weights[i] for i in g.closure_ids([s], keep_outputs, keep_derivations)) for s in starts]


def test_closure_sums_equal_a_walk_per_start():
    """One pass for all roots' closure sizes (``roots``) gives each root's walk; on ids out
    of reference order, or with keep-outputs edges, it declines (None) and the caller walks."""
    rng = random.Random(7)
    for trial in range(40):
        n = rng.randrange(2, 120)
        # edges to lower ids, as registration orders them, plus self-references
        refs = {i: sorted({rng.randrange(1, i) for _ in range(rng.randrange(0, 5))} | ({i} if rng.random() < .2 else set()))
                for i in range(2, n)}
        deriver = {i: rng.randrange(1, i) for i in range(2, n) if rng.random() < .3}
        g = Graph.from_edges(n, refs, deriver)
        weights = array("Q", (rng.randrange(0, 1000) for _ in range(n)))
        starts = sorted(rng.sample(range(1, n), min(n - 1, rng.randrange(1, 150))))  # > 64: chunks
        for kd in (False, True):
            assert g.closure_sums(starts, weights, False, kd) == _walked(g, starts, weights, False, kd), trial
    # an edge to a higher id: no order to rely on
    g = Graph.from_edges(4, {1: [3], 2: [1]})
    assert g.closure_sums([2], array("Q", [0, 1, 2, 4]), False, False) is None
    # keep-outputs: a derivation's outputs come after it
    g = Graph.from_edges(4, {3: [1]}, outputs={2: [3]})
    assert g.closure_sums([2], array("Q", [0, 1, 2, 4]), True, False) is None
    assert g.closure_sums([2], array("Q", [0, 1, 2, 4]), False, False) == [2]
