"""why-alive's chain (store.gc.chain: a forward search stopped at the target, or one inside
the target's referrer closure, whichever finishes first) equals a breadth-first search over
the whole graph, and names a root that real Nix's `nix-store -q --roots` names too."""

from __future__ import annotations

import pytest
from conftest import needs_nix, run_nix
from test_gc import generate

from storekeeper.formats.url import LocalLayout
from storekeeper.store.gc.bulk import snapshot
from storekeeper.store.gc.chain import _Backward, _Extra, shortest_chain, why_alive
from storekeeper.store.gc.rootlist import all_roots
from storekeeper.store.local import LocalStore


def _whole_graph_chain(conn, roots: dict[int, str], target: int, keep_outputs: bool,
                       keep_derivations: bool) -> list[tuple[int, str]] | None:
    """The oracle: every row of the DB in dicts, one breadth-first search from all roots
    (ordered by label) over references in id order, then the deriver, then outputs in
    output-name order."""
    ids = {p: i for i, p in conn.execute("select id, path from ValidPaths")}
    refs: dict[int, list[int]] = {}
    for a, b in conn.execute("select referrer, reference from Refs order by referrer, reference"):
        refs.setdefault(a, []).append(b)
    deriver = {i: ids[d] for i, d in conn.execute("select id, deriver from ValidPaths") if d in ids}
    outputs: dict[int, list[int]] = {}
    for d, p in conn.execute("select drv, path from DerivationOutputs order by drv, id"):
        if p in ids:
            outputs.setdefault(d, []).append(ids[p])

    def edges(i: int) -> list[tuple[int, str]]:
        out = [(j, "reference") for j in refs.get(i, [])]
        if keep_derivations and i in deriver:
            out.append((deriver[i], "deriver"))
        if keep_outputs:
            out += [(j, "output") for j in outputs.get(i, [])]
        return out

    parent: dict[int, int] = {}
    queue = []
    for r, _ in sorted(roots.items(), key=lambda kv: kv[1]):
        parent[r] = r
        queue.append(r)
    for i in queue:  # (the queue grows while it is read)
        for j, _ in edges(i):
            if j not in parent:
                parent[j] = i
                queue.append(j)
    if target not in parent:
        return None
    chain, node = [], target
    while parent[node] != node:
        prev = parent[node]
        chain.append((node, next(kind for j, kind in edges(prev) if j == node)))
        node = prev
    return [(node, roots[node])] + chain[::-1]


def _root_ids(s: LocalStore) -> dict[int, str]:
    out: dict[int, str] = {}
    for r in all_roots(s):
        row = s.db.conn.execute("select id from ValidPaths where path = ?", (s.print_path(r.path),)).fetchone()
        if row:
            out.setdefault(row[0], f"{r.link} ({r.kind} root)")
    return out


@pytest.mark.parametrize("seed", [11, 12])
def test_chain_equals_a_search_of_the_whole_graph(tmp_path, seed):
    root = str(tmp_path / "s")
    generate(root, seed=seed, n=90, roots=12)
    with LocalStore(LocalLayout.chroot(root)) as s:
        roots = _root_ids(s)
        valid = [i for (i,) in s.db.conn.execute("select id from ValidPaths")]
        kinds: set[str] = set()
        alive = 0
        for keep_outputs in (False, True):
            for keep_derivations in (False, True):
                for target in valid:
                    want = _whole_graph_chain(s.db.conn, roots, target, keep_outputs, keep_derivations)
                    for walk in ("forward", "backward", "both"):
                        got = shortest_chain(s.db, roots, target, keep_outputs, keep_derivations, walk)
                        assert got == want, (target, keep_outputs, keep_derivations, walk)
                    kinds.update(k for _, k in (got or [])[1:])
                    alive += got is not None
        # the stores exercise every edge kind, and both answers
        assert kinds == {"reference", "deriver", "output"}
        assert 0 < alive < 4 * len(valid)


def test_why_alive_names_the_chain_and_reads_only_the_closure(tmp_path):
    root = str(tmp_path / "s")
    generate(root, seed=13, n=60, roots=6)
    with LocalStore(LocalLayout.chroot(root)) as s:
        by_id = dict(s.db.conn.execute("select id, path from ValidPaths"))
        roots = _root_ids(s)
        cfg = s.settings
        some = 0
        for i, p in by_id.items():
            sp = s.store_dir.parse(p)
            want = _whole_graph_chain(s.db.conn, roots, i, cfg.keep_outputs, cfg.keep_derivations)
            got = why_alive(s, sp)
            assert got == (None if want is None else [(label, by_id[j]) for j, label in want])
            with snapshot(s.db.conn) as q:
                back = _Backward(q, _Extra(q, cfg.keep_outputs, cfg.keep_derivations), i)
                while not back.done:
                    back.step()
            some += len(back.members) < len(by_id)
            # the closure is exactly the paths that reach the target
            assert back.members == {m for m in by_id if _whole_graph_chain(
                s.db.conn, {m: "x"}, i, cfg.keep_outputs, cfg.keep_derivations)}
        assert some  # (a closure smaller than the store: not a whole-graph read in disguise)


@needs_nix
@pytest.mark.nix
@pytest.mark.slow
@pytest.mark.parametrize("seed", [14, 15])
def test_chain_root_is_one_nix_names(tmp_path, seed):
    """For every valid path: a chain exactly when `nix-store -q --roots` lists a root,
    and the chain starts at a root Nix lists for it (link and target)."""
    root = str(tmp_path / "s")
    generate(root, seed=seed, n=40, roots=8)
    with LocalStore(LocalLayout.chroot(root)) as s:
        paths = [p for (p,) in s.db.conn.execute("select path from ValidPaths")]
        answers = {p: why_alive(s, s.store_dir.parse(p)) for p in paths}
    alive = 0
    for p in paths:
        out = run_nix(["nix-store", "--store", root, "-q", "--roots", p], str(tmp_path)).stdout.decode()
        theirs = {tuple(line.split(" -> ")) for line in out.splitlines() if line.strip()}
        chain = answers[p]
        assert (chain is None) == (not theirs), p
        if chain is None:
            continue
        alive += 1
        label, first = chain[0]
        link = label.rsplit(" (", 1)[0]
        assert first in {target for _, target in theirs}
        assert (link, first) in theirs, (label, theirs)
    assert 0 < alive < len(paths)
