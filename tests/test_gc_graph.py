"""The compact reference graph (store.gc.graph) read from a real DB equals the DB's rows,
also across id gaps left by collections and across the chunks it reads in."""

from __future__ import annotations

import os

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
