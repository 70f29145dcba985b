"""Fleet cache GC under load (issue 18), bounded by counts, not seconds: 4 writers push
overlapping closures (our ``copy --to`` under a lease with a root, and on file:// one
writer that is real ``nix copy --to``, which takes no lease), roots are added, dropped by
keep-last-N and unpinned, and two collectors run in loops meanwhile.  Afterwards: every
narinfo reachable from a live root has its NAR and its references, every path a writer
was told "done" was present right then, and real Nix 2.8 substitutes every rooted
closure.  Counts are printed; violations must be 0.

Writers pause up to SLOW seconds (longer than the settle period) between their
presence check and their uploads, so collections do run in that window.  The same
test with the lease taken out (plain ``copy_to_cache`` then the root) found 57
violations on file:// when it was written (missing NARs and references)."""

from __future__ import annotations

import json
import os
import random
import threading
import time

import pytest
from conftest import HAVE_NIX, run_nix
from gc_cache_util import timings
from test_cache import store_for
from test_cache_s3 import moto  # noqa: F401 -- fixture

from storekeeper.cache import open_cache
from storekeeper.cache.gc import Collector, audit, copy_with_lease, live_roots, read_roots, unpin
from storekeeper.cache.gc.collect import parse_node
from storekeeper.cache.gc.objects import LEASES
from storekeeper.formats.storepath import StorePath

pytestmark = pytest.mark.slow

PUSHES = 6        # per writer
SLOW = 3.0        # a writer pauses up to this long between its presence check and upload
WRITERS = 4
#: short but consistent timings: settle > renewal (ttl / 3); margin covers one commit
T = dict(lease_ttl=12.0, settle=4.5, skew=0.2, margin=2.0, nar_grace=0.0, temp_grace=60.0,
         sweep_budget=60.0, poll=0.05)


def _graph(store, rng: random.Random) -> list[StorePath]:
    """Libraries, middles and apps with overlapping closures, and leaves sharing one NAR."""
    libs = [store.add_text(f"lib{i}", f"lib {i}".encode()).path for i in range(8)]
    mids = []
    for i in range(8):
        refs = rng.sample(libs, 2)
        text = f"mid {i} " + " ".join(store.print_path(r) for r in refs)
        mids.append(store.add_text(f"mid{i}", text.encode(), refs).path)
    apps = []
    for i in range(12):
        refs = rng.sample(mids, 2) + [rng.choice(libs)]
        text = f"app {i} " + " ".join(store.print_path(r) for r in refs)
        apps.append(store.add_text(f"app{i}", text.encode(), refs).path)
    shared = [store.add_text(f"share{i}", b"one NAR for all").path for i in range(4)]
    return apps + shared


def _closure_problems(cache, paths: list[str]) -> list[str]:
    """Missing narinfos, NARs or references in the closure of ``paths`` (basenames)."""
    problems, seen, todo = [], set(), [p[:32] for p in paths]
    while todo:
        h = todo.pop()
        if h in seen:
            continue
        seen.add(h)
        data = cache.backend.get(h + ".narinfo")
        if data is None:
            problems.append(f"{h}.narinfo missing")
            continue
        node = parse_node(data)
        if node is None or not cache.backend.exists(node.url):
            problems.append(f"{h}: NAR missing")
            continue
        todo.extend(node.refs)
    return problems


def _stress(tmp_path, url: str, nix_writer: bool, http_url: str | None = None) -> None:
    rng = random.Random(18)
    root = str(tmp_path / "src" / "root")
    store = store_for(tmp_path / "src", "/nix/store")
    tops = _graph(store, rng)
    store.close()
    t = timings(**T)
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"pushes": 0, "nix_pushes": 0, "restarts": 0, "waits": 0, "gcs": 0,
              "narinfos_deleted": 0, "nars_deleted": 0, "spared": 0, "unpins": 0,
              "nix_failures": 0}
    violations: list[str] = []
    errors: list[BaseException] = []

    def count(name: str, n: int = 1) -> None:
        with lock:
            counts[name] += n

    def writer(i: int) -> None:
        wrng = random.Random(i)
        s = store_for(tmp_path / "src", "/nix/store")
        try:
            for k in range(PUSHES):
                paths = wrng.sample(tops, 3)
                if nix_writer and i == WRITERS - 1:
                    r = run_nix(["nix", "--extra-experimental-features", "nix-command", "--store",
                                 root, "copy", "--to", url.split("?")[0] + "?compression=none",
                                 *[s.print_path(p) for p in paths]], str(tmp_path), check=False)
                    # unprotected: a collection may take a reference it found present
                    count("nix_pushes" if r.returncode == 0 else "nix_failures")
                    continue

                def hook(step, actor):
                    if step == "writer.lapsed":
                        count("restarts")
                    elif step == "writer.waiting":
                        count("waits")
                    elif step == "writer.checked":
                        time.sleep(wrng.uniform(0, SLOW))  # a slow writer: longer than a settle
                cache = open_cache(url)
                copy_with_lease(s, cache, paths, root=f"w{i}/{k}", keep=1, timings=t, hook=hook)
                count("pushes")
                bad = _closure_problems(cache, [p.base for p in paths])  # "done": present now
                with lock:
                    violations.extend(f"writer {i} push {k}: {b}" for b in bad)
                if k and wrng.random() < 0.5:
                    unpin(cache.backend, f"w{i}/{k - 1}")
                    count("unpins")
                cache.close()
        except BaseException as e:
            errors.append(e)
        finally:
            s.close()

    def collector() -> None:
        try:
            while not stop.is_set():
                cache = open_cache(url)
                rep = Collector(cache.backend, t, threads=4).run()
                count("gcs")
                count("narinfos_deleted", rep.narinfos_deleted)
                count("nars_deleted", rep.nars_deleted)
                count("spared", rep.spared)
                cache.close()
        except BaseException as e:
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    gcs = [threading.Thread(target=collector) for _ in range(2)]
    for th in writers + gcs:
        th.start()
    for th in writers:
        th.join()
    stop.set()
    for th in gcs:
        th.join()
    assert not errors, errors
    cache = open_cache(url)
    assert not list(cache.backend.list_keys(LEASES))
    live, _dead = live_roots(read_roots(cache.backend), time.time(), t.skew)
    rooted = sorted({p for r in live for p in r.paths})
    violations += _closure_problems(cache, rooted)
    damaged = audit(cache, timings=t).problems  # unprotected (nix copy) narinfos, if any
    print(f"\nstress {url.split('?')[0][:5]}: {json.dumps(counts)} live roots {len(live)} "
          f"rooted paths {len(rooted)} audit problems {damaged} violations {len(violations)}")
    assert violations == []
    assert counts["gcs"] >= 2 and counts["narinfos_deleted"] > 0
    if HAVE_NIX and rooted:
        nixroot = str(tmp_path / "nix")
        run_nix(["nix-store", "--store", nixroot, "-r", *[f"/nix/store/{p}" for p in rooted],
                 "--option", "substituters", http_url or url.split("?")[0],
                 "--option", "require-sigs", "false"], str(tmp_path))
        for p in rooted:
            assert os.path.exists(os.path.join(nixroot, "nix", "store", p)), p



def test_stress_file(tmp_path):
    _stress(tmp_path, f"file://{tmp_path}/cache?compression=none", nix_writer=HAVE_NIX)


def test_stress_s3(tmp_path, moto, monkeypatch):  # noqa: F811
    import boto3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    name = f"gcs-{os.urandom(4).hex()}"
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto}", region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject"],
         "Resource": f"arn:aws:s3:::{name}/*"}]}))
    _stress(tmp_path, f"s3://{name}?endpoint=127.0.0.1:{moto}&scheme=http&region=us-east-1"
            "&compression=none", nix_writer=False, http_url=f"http://127.0.0.1:{moto}/{name}")
