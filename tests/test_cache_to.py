"""``copy --to`` a file:// cache as it is made fast (bench/RESULTS.md "cache-to"):
batches compressed ahead of the one being committed, NARs read into one reused
buffer, a thread's zstd context reused.  What must still hold: every narinfo after its NAR and its references' narinfos (checked over the
whole cache), nothing left behind when a path fails mid-copy, the same bytes."""

from __future__ import annotations

import os

import pytest
import zstandard
from gc_cache_util import violations
from test_cache import store_for

from storekeeper.cache import open_cache
from storekeeper.cache.compression import compressor
from storekeeper.cache.copy import copy_to_cache
from storekeeper.cache.gc import copy_with_lease, writer
from storekeeper.errors import StoreError


def _chain(store, n: int) -> list:
    """``n`` text paths, each referring to the one before: references first."""
    paths, prev = [], []
    for i in range(n):
        info = store.add_text(f"p{i}", os.urandom(3000) + b"x" * 5000 * (i % 3), prev)
        paths.append(info.path)
        prev = [info.path]
    return paths


def _leftovers(cache_dir) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(cache_dir)
                  for f in files if ".tmp-" in f)


@pytest.mark.parametrize("lease", [True, False])
def test_a_path_failing_mid_copy_leaves_a_sound_cache_and_no_temp_files(tmp_path, monkeypatch, lease):
    monkeypatch.setattr(writer, "BATCH", 4)  # several batches queued ahead of the failing one
    store = store_for(tmp_path, "/nix/store")
    paths = _chain(store, 30)
    bad = paths[17]
    real = store.real_path(bad)
    os.chmod(real, 0o644)
    with open(real, "r+b") as f:  # damaged in the store: its NAR no longer has its NarHash
        f.write(b"!")
    cache = open_cache(f"file://{tmp_path}/cache?compression=zstd")
    copy = copy_with_lease if lease else copy_to_cache
    with pytest.raises(StoreError, match="is corrupt: its NAR hash"):
        copy(store, cache, [paths[-1]], jobs=3)
    cache.close()
    assert _leftovers(tmp_path / "cache") == []
    assert violations(cache) == []
    there = [cache.backend.exists(f"{p.hash_part}.narinfo") for p in paths]
    assert not any(there[17:])
    assert any(there[:17]) or not lease  # (the lease writer commits each batch before the next)


def test_copy_in_batches_equals_a_copy_one_by_one(tmp_path, monkeypatch):
    store = store_for(tmp_path, "/nix/store")
    top = _chain(store, 40)[-1]
    monkeypatch.setattr(writer, "BATCH", 3)
    copy_with_lease(store, open_cache(f"file://{tmp_path}/a?compression=zstd"), [top], jobs=4)
    copy_with_lease(store, open_cache(f"file://{tmp_path}/b?compression=zstd"), [top], jobs=1)

    def files(d):
        return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
                for r, _, fs in os.walk(d) for f in fs if not r.endswith(("leases", "gc"))}
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b and len([k for k in a if k.endswith(".narinfo")]) == 40
    assert violations(open_cache(f"file://{tmp_path}/a")) == []


def test_zstd_streams_of_one_thread_never_share_a_context():
    data = os.urandom(50_000) + b"abc" * 50_000
    one = compressor("zstd")
    first = one.compress(data[:70_000])
    other = compressor("zstd")  # while the first is open: its own context
    second = other.compress(data) + other.flush()
    first += one.compress(data[70_000:]) + one.flush()
    again = compressor("zstd")  # reuses a flushed one
    third = again.compress(data) + again.flush()
    dec = zstandard.ZstdDecompressor()
    for out in (first, second, third):
        assert dec.decompressobj().decompress(out) == data
    assert first == second == third
