"""``storekeeper serve`` (the store as an HTTP binary cache) with real Nix 2.8 as the
client (slow tier): ``nix-store -r`` with ``substituters = http://…`` and ``nix copy
--from http://…`` in every served compression, signatures made on the fly checked by
Nix (and refused with another key), ``.ls`` equal to the listing Nix writes, ``log/``,
read-only, a slow client not holding up another, the access log."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import needs_nix, nix_env
from daemon_util import stop_process

from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import dump_string
from storekeeper.formats.narinfo import NarInfo
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.signatures import parse_public_keys, verify_sig
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

pytestmark = needs_nix

NIX = ["nix", "--extra-experimental-features", "nix-command"]



@pytest.fixture
def source(tmp_path):
    """A store with a CA path, an input-addressed (unsigned) path referring to it, a big
    path, and a build log; and a key pair."""
    env = nix_env(str(tmp_path))
    subprocess.run(["nix-store", "--generate-binary-cache-key", "serve-1", str(tmp_path / "sk"),
                    str(tmp_path / "pk")], env=env, check=True)
    root = str(tmp_path / "src")
    with LocalStore(LocalLayout.chroot(root)) as store:
        sd = store.store_dir
        dep = store.add_text("dep.txt", b"a dependency\n").path
        nar = dump_string(f"refers to {sd.print(dep)}\n".encode())
        ia = sd.parse(f"{sd.path}/{'1' * 32}-served")  # input-addressed: needs a signature
        drv = sd.parse(f"{sd.path}/{'2' * 32}-served.drv")
        store.add_nar(ValidPathInfo(ia, Hash("sha256", hashlib.sha256(nar).digest()), len(nar),
                                    frozenset({dep}), drv), io.BytesIO(nar))
        big = store.add_text("big.bin", os.urandom(1 << 20).hex().encode() * 4).path
        log = os.path.join(store.layout.log_dir, "drvs", drv.base[:2], drv.base[2:])
        os.makedirs(os.path.dirname(log))
        with open(log, "w") as f:
            f.write("the build log\n")
        paths = {"dep": sd.print(dep), "ia": sd.print(ia), "big": sd.print(big), "drv": drv.base}
    return root, paths, env


def serve(tmp_path, root: str, *args: str):
    log = str(tmp_path / f"serve-{time.monotonic_ns()}.log")
    proc = subprocess.Popen([sys.executable, "-m", "storekeeper.cli.main", "--store", root, "serve",
                             "--listen", "127.0.0.1:0", *args],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = open(log).read()
        if "serving" in text:
            port = int(text.split("http://127.0.0.1:")[1].split()[0])
            return proc, f"http://127.0.0.1:{port}", log
        if proc.poll() is not None:
            raise AssertionError(text)
        time.sleep(0.1)
    stop_process(proc)
    raise AssertionError("storekeeper serve did not start")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


@pytest.mark.parametrize("compression", ["none", "xz", "zstd"])
def test_nix_substitutes_and_copies_from_storekeeper_serve(tmp_path, source, compression):
    root, paths, env = source
    proc, url, _ = serve(tmp_path, root, "--sign-key", str(tmp_path / "sk"),
                         "--compression", compression)
    try:
        pk = (tmp_path / "pk").read_text().strip()
        dst = str(tmp_path / "dst")
        r = subprocess.run(["nix-store", "--store", dst, "-r", paths["ia"], "--option",
                            "substituters", url, "--option", "trusted-public-keys", pk],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        with LocalStore(LocalLayout.chroot(root)) as src:
            want = {p: src.path_info(src.store_dir.parse(p)).nar_hash.typed("nix32")
                    for p in (paths["ia"], paths["dep"])}
        for p, h in want.items():
            got = subprocess.run(["nix-store", "--store", dst, "-q", "--hash", p], env=env,
                                 capture_output=True, text=True).stdout.strip()
            assert got == h
        info = json.loads(subprocess.run([*NIX, "path-info", "--store", dst, "--json", paths["ia"]],
                                         env=env, capture_output=True, text=True).stdout)
        assert [s.split(":")[0] for s in info[0]["signatures"]] == ["serve-1"]
        # nix copy --from: the closure, signatures checked
        dst2 = str(tmp_path / "dst2")
        c = subprocess.run([*NIX, "copy", "--store", dst2, "--from", url, paths["ia"], paths["big"],
                            "--option", "trusted-public-keys", pk], env=env, capture_output=True,
                           text=True, timeout=120)
        assert c.returncode == 0, c.stderr
        got = subprocess.run(["nix-store", "--store", dst2, "-q", "--hash", paths["big"]], env=env,
                             capture_output=True, text=True).stdout.strip()
        with LocalStore(LocalLayout.chroot(root)) as src:
            assert got == src.path_info(src.store_dir.parse(paths["big"])).nar_hash.typed("nix32")
    finally:
        stop_process(proc)


def test_another_key_is_refused_by_nix(tmp_path, source):
    root, paths, env = source
    proc, url, _ = serve(tmp_path, root, "--sign-key", str(tmp_path / "sk"))
    try:
        r = subprocess.run(["nix-store", "--store", str(tmp_path / "dst"), "-r", paths["ia"],
                            "--option", "substituters", url], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0
        assert f"the substitute for '{paths['ia']}' from '{url}' is not signed by any of the " \
               "keys in 'trusted-public-keys'" in r.stderr
    finally:
        stop_process(proc)


def test_narinfo_signature_listing_log_and_read_only(tmp_path, source):
    root, paths, env = source
    proc, url, log = serve(tmp_path, root, "--sign-key", str(tmp_path / "sk"))
    try:
        hp = os.path.basename(paths["ia"])[:32]
        with LocalStore(LocalLayout.chroot(root)) as src:
            sd = src.store_dir
            ni = NarInfo.parse(get(f"{url}/{hp}.narinfo"), sd)
            assert ni.path_info().with_(sigs=frozenset()) == \
                src.path_info(sd.parse(paths["ia"])).with_(sigs=frozenset(), registration_time=0)
        keys = parse_public_keys([(tmp_path / "pk").read_text()])
        assert [verify_sig(sd, ni.path_info(), s, keys) for s in ni.sigs] == [True]
        # .ls: what Nix writes with write-nar-listing=true for the same path
        cache = tmp_path / "nixcache"
        subprocess.run([*NIX, "copy", "--store", root, "--to",
                        f"file://{cache}?write-nar-listing=true&compression=none", paths["ia"]],
                       env=env, check=True, capture_output=True)
        assert get(f"{url}/{hp}.ls") == (cache / f"{hp}.ls").read_bytes()
        assert get(f"{url}/log/{paths['drv']}") == b"the build log\n"
        assert b"StoreDir: /nix/store\n" in get(f"{url}/nix-cache-info")
        for method in ("PUT", "DELETE"):
            req = urllib.request.Request(f"{url}/{hp}.narinfo", data=b"x", method=method)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 405
        for missing in (f"{'0' * 32}.narinfo", f"nar/{hp}-{'0' * 52}.nar", "nope"):
            with pytest.raises(urllib.error.HTTPError) as e:
                get(f"{url}/{missing}")
            assert e.value.code == 404
        assert f'"GET /{hp}.narinfo HTTP/1.1" 200' in open(log).read()
    finally:
        stop_process(proc)


def test_a_slow_client_does_not_hold_up_another(tmp_path, source):
    root, paths, env = source
    proc, url, _ = serve(tmp_path, root, "--compression", "xz")
    try:
        hp = os.path.basename(paths["big"])[:32]
        ni = NarInfo.parse(get(f"{url}/{hp}.narinfo"), LocalStore(LocalLayout.chroot(root)).store_dir)
        host, port = url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)))
        slow.sendall(f"GET /{ni.url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.5)  # it reads nothing: its thread is stuck writing
        start = time.monotonic()
        assert get(f"{url}/nix-cache-info").startswith(b"StoreDir:")
        get(f"{url}/{hp}.narinfo")
        assert time.monotonic() - start < 5
        slow.close()
    finally:
        stop_process(proc)


def test_our_daemon_substitutes_from_serve_over_http_and_keeps_the_answers(tmp_path, source):
    from daemon_util import start_daemon
    root, paths, env = source
    proc, url, log = serve(tmp_path, root, "--sign-key", str(tmp_path / "sk"), "--compression", "zstd")
    daemon = start_daemon("ours", str(tmp_path / "ours-root"), str(tmp_path / "ours.sock"), env)
    try:
        pk = (tmp_path / "pk").read_text().strip()
        nix_store = ["nix-store", "--store", f"unix://{tmp_path}/ours.sock"]
        opts = ["--option", "substituters", url, "--option", "trusted-public-keys", pk]
        dry = subprocess.run([*nix_store, "-r", "--dry-run", paths["ia"], *opts], env=env,
                             capture_output=True, text=True, timeout=120)
        assert "these 2 paths will be fetched" in dry.stderr, dry.stderr
        r = subprocess.run([*nix_store, "-r", paths["ia"], *opts], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.split() == [paths["ia"]], r.stderr
        hp = os.path.basename(paths["ia"])[:32]
        served = open(log).read()
        # the dry run's answer was kept (narinfo disk cache): one look-up of each narinfo
        assert served.count(f"GET /{hp}.narinfo") == 1
        assert os.path.exists(os.path.join(env["XDG_CACHE_HOME"], "storekeeper",
                                           "binary-cache-v6.sqlite"))
    finally:
        stop_process(daemon)
        stop_process(proc)
