"""Helpers of the fleet cache GC tests: a small store with a graph worth collecting, and
the invariants checked over a whole cache (spec binary-cache.md §12)."""

from __future__ import annotations

from test_cache import store_for

from storekeeper.cache import BinaryCache
from storekeeper.cache.gc import FakeClock, Timings
from storekeeper.cache.gc.collect import _NARINFO, parse_node
from storekeeper.formats.storepath import StorePath
from storekeeper.store.local import LocalStore


def timings(**kw: float) -> Timings:
    base = dict(lease_ttl=600.0, settle=300.0, nar_grace=0.0, temp_grace=86400.0, skew=60.0,
                margin=60.0, sweep_budget=3600.0, poll=5.0)
    base.update(kw)
    return Timings(**base)


class Graph:
    """lib <- app1, lib <- app2 <- top; twin_a and twin_b: different paths, one NAR."""

    def __init__(self, tmp) -> None:
        self.store: LocalStore = store_for(tmp / "src", "/nix/store")
        s = self.store
        self.lib = s.add_text("lib", b"the library").path
        self.app1 = s.add_text("app1", f"app1 uses {s.print_path(self.lib)}".encode(), [self.lib]).path
        self.app2 = s.add_text("app2", f"app2 uses {s.print_path(self.lib)}".encode(), [self.lib]).path
        self.top = s.add_text("top", f"top uses {s.print_path(self.app2)}".encode(), [self.app2]).path
        self.twin_a = s.add_text("twin-a", b"identical bytes").path
        self.twin_b = s.add_text("twin-b", b"identical bytes").path


def violations(cache: BinaryCache) -> list[str]:
    """Every narinfo whose NAR or a reference's narinfo is missing (I1, I2)."""
    keys = {e.key for e in cache.backend.list_keys("")}
    out = []
    for k in sorted(keys):
        if not _NARINFO.fullmatch(k):
            continue
        data = cache.backend.get(k)
        if data is None:
            continue
        node = parse_node(data)
        assert node is not None, k
        if node.url not in keys:
            out.append(f"{k}: NAR {node.url} missing")
        for r in node.refs:
            if r + ".narinfo" not in keys:
                out.append(f"{k}: reference {r} missing")
    return out


def present(cache: BinaryCache, *paths: StorePath) -> list[bool]:
    return [cache.backend.exists(p.hash_part + ".narinfo") for p in paths]


def clock() -> FakeClock:
    return FakeClock()
