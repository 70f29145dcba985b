"""The narinfo disk cache (spec binary-cache.md §8), in process with a loopback HTTP
server serving a cache Nix 2.8 wrote: a 404 is believed for the negative TTL, a
narinfo for the positive TTL, with no request to the server; TTL 0 asks again;
``file://`` caches are never disk-cached (an edit is seen at once)."""

from __future__ import annotations

import os
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from daemon_util import SHARED

from storekeeper.build import Substituters, SubstituteSettings
from storekeeper.build.narinfo_cache import NarInfoDiskCache
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

VECTORS = os.path.join(SHARED, "spec", "binary-cache-vectors")
HELLO = "/nix/store/5m5ci15djpxd4bs7xa0208nhkhi6cbp3-hello.txt"
HELLO_INFO = "5m5ci15djpxd4bs7xa0208nhkhi6cbp3.narinfo"


@pytest.fixture
def served(tmp_path):
    """An empty-of-narinfos copy of a Nix cache on loopback, and the requests it got."""
    root = str(tmp_path / "cache")
    shutil.copytree(os.path.join(VECTORS, "nix28-file-zstd"), root)
    os.rename(os.path.join(root, HELLO_INFO), str(tmp_path / HELLO_INFO))
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_request(self, *args) -> None:
            requests.append(self.path)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=root))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{server.server_port}", requests, str(tmp_path / HELLO_INFO)
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(tmp_path):
    s = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    yield s
    s.close()


def lookups(requests: list[str]) -> int:
    return sum(1 for r in requests if r.endswith(".narinfo"))


def test_negative_then_positive_answers_are_believed_for_their_ttl(tmp_path, served, store):
    root, url, requests, narinfo = served
    disk = NarInfoDiskCache(str(tmp_path / "disk.sqlite"))
    sp = store.store_dir.parse(HELLO)

    def query(**ttl):
        subs = Substituters(store, SubstituteSettings(substituters=(url,), **ttl), disk_cache=disk)
        try:
            return subs.query(sp)
        finally:
            subs.close()

    assert query() is None
    assert lookups(requests) == 1
    shutil.copy(narinfo, root)  # uploaded after the 404: still "absent" for an hour
    assert query() is None
    assert lookups(requests) == 1
    hit = query(narinfo_cache_negative_ttl=0)
    assert hit is not None and hit[1].path == sp
    assert lookups(requests) == 2
    os.unlink(os.path.join(root, HELLO_INFO))  # deleted: still believed for 30 days
    again = query()
    assert again is not None and again[1] == hit[1]
    assert lookups(requests) == 2
    assert query(narinfo_cache_positive_ttl=0) is None
    assert lookups(requests) == 3
    disk.close()


def test_answers_are_kept_across_opens_of_the_file(tmp_path, served, store):
    root, url, requests, narinfo = served
    shutil.copy(narinfo, root)
    path = str(tmp_path / "disk.sqlite")
    sp = store.store_dir.parse(HELLO)
    for _ in range(2):
        disk = NarInfoDiskCache(path)
        subs = Substituters(store, SubstituteSettings(substituters=(url,)), disk_cache=disk)
        found = subs.query_many([sp])
        subs.close()
        disk.close()
        assert list(found) == [sp] and found[sp].nar_size > 0
    assert lookups(requests) == 1


def test_file_caches_are_not_disk_cached(tmp_path, served, store):
    root, _, _, narinfo = served
    disk = NarInfoDiskCache(str(tmp_path / "disk.sqlite"))
    sp = store.store_dir.parse(HELLO)
    settings = SubstituteSettings(substituters=(f"file://{root}",))
    assert Substituters(store, settings, disk_cache=disk).query(sp) is None
    shutil.copy(narinfo, root)
    assert Substituters(store, settings, disk_cache=disk).query(sp) is not None
    disk.close()
