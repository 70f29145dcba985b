"""Binary cache stores (storekeeper.cache): reading every cache Nix 2.8 wrote (vectors),
writing caches whose narinfos equal Nix's, checks while streaming, file:// and http://
(a loopback server thread).  S3 is in test_cache_s3.py, real Nix in test_cache_nix.py."""

from __future__ import annotations

import glob
import http.server
import io
import json
import os
import shutil
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_narinfo import PUBLIC, VECTORS, _read

from storekeeper.cache import CacheError, NarCorrupt, NarMissing, open_cache
from storekeeper.cache.compression import CompressionError, Decompressing, compressor
from storekeeper.cache.copy import copy_from_cache, copy_to_cache
from storekeeper.errors import StoreError, UsageError
from storekeeper.formats import nar as narfmt
from storekeeper.formats.hashes import Hash
from storekeeper.formats.narinfo import NarInfo
from storekeeper.formats.signatures import PublicKey, parse_public_keys
from storekeeper.formats.storepath import StoreDir, StorePath
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

NIX_CACHES = ["nix28-file-xz", "nix28-file-zstd", "nix28-file-br", "nix28-file-bzip2",
              "nix28-file-none", "nix28-file-gzip", "nix28-file-ls"]
A = StorePath("2qzxavkmc1a53hdc058phqdqyic53b67-a.txt")
B = StorePath("abdy0gp06c21k6cn2fd0w9l07x5drjgh-b.txt")
HELLO = StorePath("5m5ci15djpxd4bs7xa0208nhkhi6cbp3-hello.txt")
DEMO = StorePath("qsy18l8rk7lnkvv5cn8zf7xa7hvmz2ak-demo-1.0")
KEYS = {PUBLIC.name: PUBLIC}


def copy_vector(name: str, tmp) -> str:
    dest = os.path.join(str(tmp), name)
    shutil.copytree(os.path.join(VECTORS, name), dest)
    return dest


def store_for(tmp, store_dir: str) -> LocalStore:
    """A local store whose logical store dir is ``store_dir`` (files under tmp)."""
    if store_dir == "/nix/store":
        return LocalStore(LocalLayout.chroot(os.path.join(str(tmp), "root")))
    base = os.path.join(str(tmp), "cs")
    return LocalStore(LocalLayout.custom(store_dir, base + "/state", base + "/log",
                                         real_store_dir=base + "/store"))


# --- reading what Nix wrote --------------------------------------------------------------

@pytest.mark.parametrize("name", NIX_CACHES)
def test_read_every_nix_written_cache(name):
    cache = open_cache(f"file://{VECTORS}/{name}")
    info = cache.info()
    assert info is not None
    sd = StoreDir(info.store_dir)
    cache.check_store_dir(sd)
    files = sorted(glob.glob(os.path.join(VECTORS, name, "*.narinfo")))
    for f in files:
        sp = StorePath.from_base(_read(f).split("\n")[0].rsplit("/", 1)[1])
        ni = cache.narinfo(sd, sp)
        assert ni is not None and ni.render() == _read(f)
        stream = cache.open_nar(ni)
        h, size = narfmt.nar_digest(stream)
        assert (h, size) == (ni.nar_hash, ni.nar_size)
        assert stream.read(10) == b""
        stream.finish()


def test_wrong_store_dir_is_refused_as_nix_words_it():
    cache = open_cache(f"file://{VECTORS}/nix28-file-xz")
    with pytest.raises(CacheError, match="binary cache 'file://.*nix28-file-xz' is for Nix stores "
                       "with prefix '/tmp/research-bc/cs/store', not '/nix/store'"):
        cache.check_store_dir(StoreDir("/nix/store"))


def test_narinfo_lookup_checks_the_name(tmp_path):
    d = copy_vector("nix28-file-none", tmp_path)
    cache = open_cache(f"file://{d}")
    assert cache.narinfo(StoreDir(), StorePath(A.hash_part + "-other-name")) is None
    assert cache.narinfo(StoreDir(), StorePath("0" * 32 + "-a.txt")) is None
    assert set(cache.narinfos(StoreDir(), [A, B, StorePath("1" * 32 + "-x")])) == {A, B}


@pytest.mark.parametrize("name", ["nix28-file-zstd", "nix28-file-xz", "nix28-file-none"])
def test_tampered_nar_is_refused_while_streaming(tmp_path, name):
    d = copy_vector(name, tmp_path)
    cache = open_cache(f"file://{d}")
    sd = StoreDir(cache.info().store_dir)  # type: ignore[union-attr]
    sp = DEMO if name.endswith("xz") else HELLO
    ni = cache.narinfo(sd, sp)
    assert ni is not None
    # a NAR that decodes but is another one: the NarHash check stops it
    other = next(n for n in glob.glob(os.path.join(d, "nar", "*")) if not n.endswith(ni.url[4:]))
    shutil.copy(other, os.path.join(d, ni.url))
    with pytest.raises((NarCorrupt, CompressionError)):
        checked_digest(cache, ni)


def checked_digest(cache, ni):
    stream = cache.open_nar(ni)
    out = narfmt.nar_digest(stream)
    stream.finish()
    return out


def test_file_hash_is_checked_too(tmp_path):
    d = copy_vector("nix28-file-xz", tmp_path)
    cache = open_cache(f"file://{d}")
    ni = cache.narinfo(StoreDir(cache.info().store_dir), DEMO)  # type: ignore[union-attr]
    assert ni is not None and ni.file_hash is not None
    assert checked_digest(cache, ni) == (ni.nar_hash, ni.nar_size)
    # FileHash and FileSize are not signed: a cache could lie about them; we check both
    with pytest.raises(NarCorrupt, match="has hash sha256:.*its narinfo says"):
        checked_digest(cache, ni.with_(file_hash=Hash.of("sha256", b"x")))
    with pytest.raises(NarCorrupt, match="is 276 bytes, its narinfo says 277"):
        checked_digest(cache, ni.with_(file_size=277))


def test_flipped_byte_in_uncompressed_nar(tmp_path):
    d = copy_vector("nix28-file-none", tmp_path)
    cache = open_cache(f"file://{d}")
    ni = cache.narinfo(StoreDir(), HELLO)
    assert ni is not None
    path = os.path.join(d, ni.url)
    data = bytearray(open(path, "rb").read())
    data[-30] ^= 1  # inside the file contents: still a NAR, another hash
    open(path, "wb").write(bytes(data))
    with pytest.raises(NarCorrupt, match="hash mismatch importing path"):
        checked_digest(cache, ni)


def test_missing_nar_is_substitute_gone(tmp_path):
    d = copy_vector("nix28-file-zstd", tmp_path)
    cache = open_cache(f"file://{d}")
    ni = cache.narinfo(StoreDir(), B)
    assert ni is not None
    os.unlink(os.path.join(d, ni.url))
    with pytest.raises(NarMissing, match=f"file '{ni.url}' does not exist in binary cache"):
        cache.open_nar(ni)


def test_declared_compression_is_a_hint_except_none_and_br(tmp_path):
    """Spec §4.2: 'xz' on a bzip2 file works; 'xz' on an uncompressed NAR does not."""
    d = copy_vector("nix28-file-bzip2", tmp_path)
    cache = open_cache(f"file://{d}")
    ni = cache.narinfo(StoreDir(), HELLO)
    assert ni is not None
    assert checked_digest(cache, ni.with_(compression="xz"))[0] == ni.nar_hash
    d2 = copy_vector("nix28-file-none", tmp_path)
    ni2 = open_cache(f"file://{d2}").narinfo(StoreDir(), HELLO)
    assert ni2 is not None
    with pytest.raises(CompressionError, match="input compression not recognized"):
        open_cache(f"file://{d2}").open_nar(ni2.with_(compression="xz"))


# --- copying from Nix's caches into a local store -------------------------------------------

@pytest.mark.parametrize("name", ["nix28-file-zstd", "nix28-file-br", "nix28-file-bzip2",
                                  "nix28-file-none", "nix28-file-gzip"])
def test_copy_from_nix_cache_ca_paths(tmp_path, name):
    store = store_for(tmp_path, "/nix/store")
    cache = open_cache(f"file://{VECTORS}/{name}")
    want = [HELLO] if name.endswith("gzip") else [B, HELLO]
    result = copy_from_cache(cache, store, want, keys={})  # CA paths need no key
    assert set(result.copied) == ({HELLO} if name.endswith("gzip") else {A, B, HELLO})
    for p in result.copied:
        info = store.path_info(p)
        ni = cache.narinfo(store.store_dir, p)
        assert ni is not None
        assert (info.nar_hash, info.nar_size, info.references, info.ca, info.sigs) == (
            ni.nar_hash, ni.nar_size, ni.references, ni.ca, ni.sigs)
    again = copy_from_cache(cache, store, want, keys={})
    assert again.copied == [] and set(again.skipped) == set(result.copied)


def test_copy_from_checks_signatures_of_input_addressed_paths(tmp_path):
    store = store_for(tmp_path, "/tmp/research-bc/cs/store")
    cache = open_cache(f"file://{VECTORS}/nix28-file-xz")
    nixos = parse_public_keys(["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="])
    with pytest.raises(StoreError, match="lacks a valid signature"):
        copy_from_cache(cache, store, [DEMO], keys=nixos)
    assert not store.is_valid(DEMO)
    result = copy_from_cache(cache, store, [DEMO], keys=KEYS)
    assert result.copied[-1] == DEMO and len(result.copied) == 2
    info = store.path_info(DEMO)
    assert info.deriver == StorePath("0s9wh6al076z7hm4k0pmfxkzhrqf9p61-demo-1.0.drv")
    assert info.sigs and not info.ultimate
    # ?trusted=1 skips the check
    store2 = store_for(tmp_path / "2", "/tmp/research-bc/cs/store")
    trusted = open_cache(f"file://{VECTORS}/nix28-file-xz?trusted=1")
    assert DEMO in copy_from_cache(trusted, store2, [DEMO], keys={}).copied


def test_copy_from_refuses_a_corrupt_nar_and_registers_nothing(tmp_path):
    d = copy_vector("nix28-file-zstd", tmp_path)
    cache = open_cache(f"file://{d}")
    ni = cache.narinfo(StoreDir(), A)
    assert ni is not None
    shutil.copy(os.path.join(d, cache.narinfo(StoreDir(), HELLO).url),  # type: ignore[union-attr]
                os.path.join(d, ni.url))
    store = store_for(tmp_path, "/nix/store")
    with pytest.raises(StoreError):
        copy_from_cache(cache, store, [B], keys={})
    assert not store.is_valid(A) and not store.is_valid(B)


# --- writing: what Nix writes, byte for byte where the spec says so --------------------------

def _nix_paths_into(store: LocalStore) -> None:
    """Re-create the vectors' /nix/store paths (a.txt, b.txt, hello.txt) in ``store``."""
    a = store.add_text("a.txt", b"aaa")
    assert a.path == A
    b = store.add_text("b.txt", f"ref to {store.print_path(A)}".encode(), [A])
    assert b.path == B
    nar = open(os.path.join(VECTORS, "nix28-file-none", "nar",
                            "12kn72kmqja4c7x6a57wi7y4q3ilkw0rr8n37wzjcsrx5kwri6l1.nar"), "rb").read()
    h = store.add_dump(io.BytesIO(nar), "hello.txt", "recursive")
    assert h.path == HELLO


@pytest.mark.parametrize("compression", ["none", "xz", "zstd", "br", "bzip2", "gzip"])
def test_written_narinfos_equal_nix28s(tmp_path, compression):
    store = store_for(tmp_path, "/nix/store")
    _nix_paths_into(store)
    secret = os.path.join(VECTORS, "keys", "research-bc-1.secret")
    sign = "" if compression == "gzip" else f"&secret-key={secret}"
    out = tmp_path / "cache"
    cache = open_cache(f"file://{out}?compression={compression}{sign}")
    result = copy_to_cache(store, cache, [B, HELLO], jobs=2 if compression == "xz" else 1)
    # the vectors: gzip has hello.txt only; xz has other paths (see test_written_listing…)
    want = {"gzip": [HELLO], "xz": []}.get(compression, [A, B, HELLO])
    assert set(result.copied) == {A, B, HELLO}
    assert result.copied.index(A) < result.copied.index(B)  # references first
    assert _read(str(out / "nix-cache-info")) == "StoreDir: /nix/store\n"
    for p in want:
        ours = _read(str(out / f"{p.hash_part}.narinfo"))
        nix = _read(os.path.join(VECTORS, f"nix28-file-{compression}", f"{p.hash_part}.narinfo"))
        if compression == "none":
            assert ours == nix
        else:
            # the compressed file (URL, FileHash, FileSize) is the codec's business (spec §3.4)
            def strip(t: str) -> list[str]:
                return [line for line in t.splitlines()
                        if not line.startswith(("URL:", "FileHash:", "FileSize:"))]
            assert strip(ours) == strip(nix)
    # and our reader reads it back, every NAR checked
    for p in (A, B, HELLO):
        ni = cache.narinfo(StoreDir(), p)
        assert ni is not None and os.path.exists(out / ni.url)
        assert checked_digest(cache, ni) == (ni.nar_hash, ni.nar_size)
    # a second copy finds everything there
    again = copy_to_cache(store, open_cache(f"file://{out}?compression={compression}"), [B, HELLO])
    assert again.copied == [] and len(again.skipped) == 3


def test_written_listing_equals_nix28s(tmp_path):
    """``write-nar-listing``: the .ls of a path equals the one Nix wrote (vector nix28-file-ls)."""
    store = store_for(tmp_path, "/tmp/research-bc/cs/store")
    copy_from_cache(open_cache(f"file://{VECTORS}/nix28-file-xz"), store, [DEMO], keys=KEYS)
    out = tmp_path / "cache"
    copy_to_cache(store, open_cache(f"file://{out}?compression=none&write-nar-listing=1"), [DEMO])
    for hp in ("qsy18l8rk7lnkvv5cn8zf7xa7hvmz2ak", "47azgk2sj1r1p469lpmqhmm00jsirb06"):
        assert _read(str(out / f"{hp}.ls")) == _read(os.path.join(VECTORS, "nix28-file-ls", f"{hp}.ls"))
        ours = _read(str(out / f"{hp}.narinfo"))
        # Nix's source paths there had no signature; ours came signed from the xz cache
        assert "".join(line for line in ours.splitlines(True) if not line.startswith("Sig: ")) \
            == _read(os.path.join(VECTORS, "nix28-file-ls", f"{hp}.narinfo"))
    # xz, signed: Nix's narinfo (with Deriver and Sig) but for the compressed file's fields
    secret = os.path.join(VECTORS, "keys", "research-bc-1.secret")
    xz = tmp_path / "xz"
    copy_to_cache(store, open_cache(f"file://{xz}?secret-key={secret}"), [DEMO])
    for hp in ("qsy18l8rk7lnkvv5cn8zf7xa7hvmz2ak", "47azgk2sj1r1p469lpmqhmm00jsirb06"):
        ours = _read(str(xz / f"{hp}.narinfo")).splitlines()
        nix = _read(os.path.join(VECTORS, "nix28-file-xz", f"{hp}.narinfo")).splitlines()
        assert [line for line in ours if not line.startswith(("URL", "File"))] == \
            [line for line in nix if not line.startswith(("URL", "File"))]
        assert "Compression: xz" in ours


def test_writer_keeps_existing_narinfos_and_shares_nars(tmp_path):
    store = store_for(tmp_path, "/nix/store")
    _nix_paths_into(store)
    out = tmp_path / "cache"
    cache = open_cache(f"file://{out}?compression=none")
    copy_to_cache(store, cache, [A])
    before = os.stat(out / f"{A.hash_part}.narinfo").st_ino
    r = copy_to_cache(store, cache, [B])
    assert r.copied == [B] and r.skipped == [A]
    assert os.stat(out / f"{A.hash_part}.narinfo").st_ino == before
    # a narinfo with another NarHash for the same path is never overwritten
    prep = cache.prepare(store.store_dir, store.path_info(HELLO), store.dump_path(HELLO))
    cache.upload(prep)
    bogus = prep.narinfo.with_(path=A)
    prep.narinfo = bogus
    with pytest.raises(CacheError, match="already has another narinfo"):
        cache.commit(prep, {A})


def test_writer_refuses_a_narinfo_before_its_references(tmp_path):
    store = store_for(tmp_path, "/nix/store")
    _nix_paths_into(store)
    cache = open_cache(f"file://{tmp_path}/cache?compression=none")
    cache.check_store_dir(store.store_dir, create=True)
    prep = cache.prepare(store.store_dir, store.path_info(B), store.dump_path(B))
    cache.upload(prep)
    with pytest.raises(CacheError, match="because the reference '/nix/store/.*-a.txt' is not valid"):
        cache.commit(prep, set())
    assert not os.path.exists(tmp_path / "cache" / f"{B.hash_part}.narinfo")


def test_writer_refuses_a_store_path_whose_nar_does_not_match(tmp_path):
    store = store_for(tmp_path, "/nix/store")
    _nix_paths_into(store)
    cache = open_cache(f"file://{tmp_path}/cache?compression=xz")
    cache.check_store_dir(store.store_dir, create=True)
    info = store.path_info(A)
    with pytest.raises(StoreError, match="is corrupt: its NAR hash"):
        cache.prepare(store.store_dir, info, store.dump_path(HELLO))
    assert glob.glob(str(tmp_path / "cache" / "nar" / "*")) == []


def test_bad_cache_urls():
    for url, msg in [("ftp://x", "don't know how to open"), ("file://rel/dir", "absolute path"),
                     ("file:///c?compression=lzma", "unknown compression method 'lzma'"),
                     ("nocolon", "not a binary cache URL")]:
        with pytest.raises(UsageError, match=msg):
            open_cache(url)


# --- http:// on a loopback server ----------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD from the directory; PUT (with If-None-Match: *) into it; a log of requests."""

    protocol_version = "HTTP/1.1"  # keep-alive

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.log.append(("GET", self.path))  # type: ignore[attr-defined]
        self.server.ports.add(self.client_address[1])  # type: ignore[attr-defined]
        if self.server.fail_next:  # type: ignore[attr-defined]
            self.server.fail_next -= 1  # type: ignore[attr-defined]
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def do_PUT(self) -> None:
        self.server.log.append(("PUT", self.path))  # type: ignore[attr-defined]
        self.server.ports.add(self.client_address[1])  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        path = self.translate_path(self.path)
        if self.headers.get("If-None-Match") == "*" and os.path.exists(path):
            self.send_response(412)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                f.write(body)
            os.replace(path + ".tmp", path)
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    def handler(*a, **kw):
        return _Handler(*a, directory=str(root), **kw)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.log = []  # type: ignore[attr-defined]
    server.fail_next = 0  # type: ignore[attr-defined]
    server.ports = set()  # type: ignore[attr-defined]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


def test_http_read_nix_cache_and_copy_from(http_dir, tmp_path):
    root, url, server = http_dir
    shutil.copytree(os.path.join(VECTORS, "nix28-file-zstd"), root / "c")
    cache = open_cache(f"{url}/c/")
    assert cache.url == f"{url}/c"
    store = store_for(tmp_path, "/nix/store")
    server.fail_next = 2  # two 503s: retried
    result = copy_from_cache(cache, store, [B], keys={})
    assert result.copied == [A, B]
    gets = [p for m, p in server.log if m == "GET"]
    assert "/c/nix-cache-info" in gets and f"/c/{B.hash_part}.narinfo" in gets
    assert sum(1 for p in gets if p.startswith("/c/nar/")) == 2
    # 404: absent, not an error
    assert cache.narinfo(StoreDir(), StorePath("0" * 32 + "-x")) is None
    cache.close()


def test_http_copy_to_then_from(http_dir, tmp_path):
    root, url, server = http_dir
    src = store_for(tmp_path / "src", "/nix/store")
    _nix_paths_into(src)
    secret = os.path.join(VECTORS, "keys", "research-bc-1.secret")
    cache = open_cache(f"{url}/cache?compression=zstd&secret-key={secret}")
    r = copy_to_cache(src, cache, [B, HELLO])
    assert set(r.copied) == {A, B, HELLO}
    puts = [p for m, p in server.log if m == "PUT"]
    # NAR before narinfo, references' narinfos before referrers'
    assert puts.index(f"/cache/{A.hash_part}.narinfo") < puts.index(f"/cache/{B.hash_part}.narinfo")
    for p in (A, B, HELLO):
        ni = NarInfo.parse(_read(str(root / "cache" / f"{p.hash_part}.narinfo")), StoreDir())
        assert puts.index(f"/cache/{ni.url}") < puts.index(f"/cache/{p.hash_part}.narinfo")
        assert ni.sigs
    dest = store_for(tmp_path / "dest", "/nix/store")
    server.ports.clear()
    before = len(server.log)
    r2 = copy_from_cache(open_cache(f"{url}/cache"), dest, [B, HELLO], keys=KEYS)
    # keep-alive: nix-cache-info, 3 narinfos, 3 NARs (fetched in parallel) over pooled
    # connections: at most one per request running at once
    assert len(server.log) - before == 7 and len(server.ports) <= 3
    assert set(r2.copied) == {A, B, HELLO}
    assert dest.path_info(B).sigs == src.path_info(B).sigs | cache.narinfo(StoreDir(), B).sigs  # type: ignore[union-attr]


def test_http_unreachable_is_one_clear_error(tmp_path):
    cache = open_cache("http://127.0.0.1:9/c")
    cache.backend._attempts = 2  # type: ignore[attr-defined]
    cache.backend._delay = 0.01  # type: ignore[attr-defined]
    with pytest.raises(CacheError, match="unable to GET 'http://127.0.0.1:9/c/nix-cache-info'"):
        cache.info()


def test_public_key_type_is_exported():
    assert PublicKey.parse(PUBLIC.render()) == PUBLIC


def test_missing_optional_packages_give_one_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(UsageError, match=r"s3:// binary caches need the Python package 'boto3': "
                       r"pip install 'storekeeper\[s3\]'"):
        open_cache("s3://bucket")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    cache = open_cache(f"file://{VECTORS}/nix28-file-zstd")
    ni = cache.narinfo(StoreDir(), A)
    assert ni is not None
    with pytest.raises(UsageError, match=r"pip install 'storekeeper\[zstd\]'"):
        cache.open_nar(ni).read(1)


# --- the CLI --------------------------------------------------------------------------------

def _sk(*args: str, env=None):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "storekeeper.cli.main", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_cli_cache_info_and_key_generate(tmp_path):
    r = _sk("cache", "info", "--json", f"file://{VECTORS}/nix28-file-xz?priority=7")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"url": f"file://{VECTORS}/nix28-file-xz", "storeDir":
                                    "/tmp/research-bc/cs/store", "wantMassQuery": False, "priority": 7}
    r = _sk("cache", "info", f"file://{tmp_path}")
    assert r.returncode != 0 and r.stderr == f"error: 'file://{tmp_path}' does not appear to be a binary cache\n"
    r = _sk("key", "generate", "--name", "k-1", "--secret", str(tmp_path / "sk"))
    assert r.returncode == 0 and r.stdout.startswith("k-1:")
    assert oct(os.stat(tmp_path / "sk").st_mode & 0o777) == "0o600"
    assert not (tmp_path / "sk").read_text().endswith("\n")  # as Nix writes key files
    assert PublicKey.parse(r.stdout.strip()) == \
        PublicKey.parse(_sk("key", "public", str(tmp_path / "sk")).stdout.strip())
    again = _sk("key", "generate", "--name", "k-1", "--secret", str(tmp_path / "sk"))
    assert again.returncode == 2 and "exists already" in again.stderr
    (tmp_path / "bad").write_text("k-1:not base64!")
    bad = _sk("key", "public", str(tmp_path / "bad"))
    assert bad.returncode == 65 and bad.stderr.startswith("error: secret key: invalid character")


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=200_000), method=st.sampled_from(["xz", "bzip2", "zstd", "br", "gzip", "none"]),
       chunk=st.integers(1, 70_000), split=st.integers(1, 5000))
def test_codecs_round_trip_streamed(data, method, chunk, split):
    """Whatever the chunking on either side, a streamed compressor's output decodes to the
    input through the sniffing decoder (br and none by name)."""
    comp = compressor(method)
    out = b"".join(comp.compress(data[i:i + chunk]) for i in range(0, len(data), chunk)) + comp.flush()
    dec = Decompressing(io.BytesIO(out), method)
    assert dec.read(0) == b""  # a read of nothing consumes nothing
    got = b""
    while True:
        piece = dec.read(split)
        if not piece:
            break
        assert len(piece) <= split
        got += piece
    assert got == data
    if method not in ("none", "br", "zstd") and out:
        # (a cut zstd frame just ends: VerifiedNar's NarSize check is what catches it)
        with pytest.raises(CompressionError):
            Decompressing(io.BytesIO(out[: len(out) // 2]), method).read(-1)


@pytest.mark.parametrize("method", ["xz", "bzip2", "zstd", "br", "gzip"])
def test_decoding_memory_is_bounded_by_the_read_size(method):
    """A few KiB that decode to 32 MiB of zeros (a NAR of a sparse file) never sit in
    memory at once: each read gives at most what was asked for (the peak allowed is the
    codec's own state: xz's dictionary is 8 MiB)."""
    import tracemalloc
    comp = compressor(method, level=1 if method == "br" else -1)
    zeros = bytes(1 << 20)
    packed = b"".join(comp.compress(zeros) for _ in range(32)) + comp.flush()
    assert len(packed) < 1 << 20
    dec = Decompressing(io.BytesIO(packed), method)
    tracemalloc.start()
    try:
        total = 0
        while piece := dec.read(1 << 16):
            assert len(piece) <= 1 << 16
            total += len(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 32 << 20
    assert peak < 16 << 20, peak


def test_http_corrupt_nar_fails_the_copy_and_registers_nothing(http_dir, tmp_path):
    root, url, _server = http_dir
    shutil.copytree(os.path.join(VECTORS, "nix28-file-zstd"), root / "c")
    cache = open_cache(f"{url}/c")
    a_ni = cache.narinfo(StoreDir(), A)
    hello_ni = cache.narinfo(StoreDir(), HELLO)
    assert a_ni is not None and hello_ni is not None
    shutil.copy(root / "c" / hello_ni.url, root / "c" / a_ni.url)
    store = store_for(tmp_path, "/nix/store")
    with pytest.raises(StoreError, match="a.txt"):
        copy_from_cache(cache, store, [B, HELLO], keys={})
    assert not store.is_valid(A) and not store.is_valid(B)


def test_store_accepts_a_signed_import_only_with_a_trusted_key(tmp_path):
    """add_nar(check_sigs=True) (what the daemon does for untrusted clients and
    dontCheckSigs=0): a signed input-addressed path passes with trusted-public-keys or a
    readable secret-key-files key, and is refused otherwise."""
    from storekeeper.store.settings import StoreSettings
    cache = open_cache(f"file://{VECTORS}/nix28-file-xz")
    sd = StoreDir("/tmp/research-bc/cs/store")
    dep = cache.narinfo(sd, StorePath("47azgk2sj1r1p469lpmqhmm00jsirb06-dep.txt"))
    demo = cache.narinfo(sd, DEMO)
    assert dep is not None and demo is not None

    def attempt(settings: StoreSettings, n: int) -> None:
        store = store_for(tmp_path / str(n), sd.path)
        store.settings = settings
        store.add_nar(dep.path_info(), cache.open_nar(dep), check_sigs=True)  # CA: no key needed
        store.add_nar(demo.path_info(), cache.open_nar(demo), check_sigs=True)
        assert store.is_valid(DEMO)

    with pytest.raises(StoreError, match="because it lacks a valid signature"):
        attempt(StoreSettings(), 0)  # cache.nixos.org's key only
    attempt(StoreSettings(trusted_public_keys=(PUBLIC.render(),)), 1)
    attempt(StoreSettings(trusted_public_keys=(), secret_key_files=(
        str(tmp_path / "unreadable-is-skipped"), os.path.join(VECTORS, "keys", "research-bc-1.secret"))), 2)
    forged = demo.path_info().with_(nar_size=demo.nar_size + 8)
    store = store_for(tmp_path / "3", sd.path)
    store.settings = StoreSettings(trusted_public_keys=(PUBLIC.render(),))
    with pytest.raises(StoreError, match="lacks a valid signature"):
        store.add_nar(forged, cache.open_nar(demo), check_sigs=True)


@pytest.mark.parametrize("compression", ["xz", "zstd", "br", "bzip2", "gzip", "none"])
def test_round_trip_of_every_kind_of_file(tmp_path, compression):
    """Executables (their empty marker string), empty files, symlinks, nested and empty
    directories, a file bigger than a chunk: out through a cache and back, same NAR."""
    src = tmp_path / "tree"
    (src / "bin").mkdir(parents=True)
    (src / "empty-dir").mkdir()
    (src / "bin" / "run").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(src / "bin" / "run", 0o755)
    (src / "empty").write_bytes(b"")
    (src / "big").write_bytes(os.urandom(300_000) + bytes(300_000))
    os.symlink("bin/run", src / "link")
    a = store_for(tmp_path / "a", "/nix/store")
    info = a.add_path(str(src), name="tree")
    cache = open_cache(f"file://{tmp_path}/c?compression={compression}&write-nar-listing=1")
    copy_to_cache(a, cache, [info.path])
    listing = json.loads((tmp_path / "c" / f"{info.path.hash_part}.ls").read_text())
    assert listing["root"]["entries"]["bin"]["entries"]["run"]["executable"] is True
    assert listing["root"]["entries"]["link"] == {"type": "symlink", "target": "bin/run"}
    assert listing["root"]["entries"]["empty-dir"] == {"type": "directory", "entries": {}}
    b = store_for(tmp_path / "b", "/nix/store")
    copy_from_cache(cache, b, [info.path], keys={})
    assert b.path_info(info.path).nar_hash == info.nar_hash


def test_file_cache_syncs_nars_before_linking_narinfos(tmp_path, monkeypatch):
    """The file backend's durability order: every NAR's data (and its directory entry)
    is fsynced before the first narinfo naming it is linked; no temp file is left."""
    import storekeeper.cache.backends as backends
    events: list[tuple[str, str]] = []
    real_fsync, real_dir, real_link = backends._fsync_file, backends.fsync_dir, os.link
    monkeypatch.setattr(backends, "_fsync_file", lambda p: (events.append(("fsync", p)), real_fsync(p)))
    monkeypatch.setattr(backends, "fsync_dir", lambda p: (events.append(("dirsync", p)), real_dir(p)))
    monkeypatch.setattr(backends.os, "link", lambda a, b: (events.append(("link", b)), real_link(a, b)))
    store = store_for(tmp_path, "/nix/store")
    _nix_paths_into(store)
    out = tmp_path / "cache"
    copy_to_cache(store, open_cache(f"file://{out}?compression=xz"), [B, HELLO])
    first_link = next(i for i, (e, p) in enumerate(events) if e == "link" and p.endswith(".narinfo"))
    nars = {str(out / "nar" / n) for n in os.listdir(out / "nar")}
    synced = {p for e, p in events[:first_link] if e == "fsync"}
    assert nars <= synced
    assert ("dirsync", str(out / "nar")) in events[:first_link]
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert not [n for n in os.listdir(out / "nar") if ".tmp-" in n]


def test_http_absolute_nar_urls_are_followed(http_dir, tmp_path):
    """Spec §7.1: an http(s) cache uses an absolute URL in a narinfo as it is (a file://
    cache does not)."""
    root, url, server = http_dir
    shutil.copytree(os.path.join(VECTORS, "nix28-file-none"), root / "c")
    shutil.copytree(os.path.join(VECTORS, "nix28-file-none", "nar"), root / "elsewhere")
    key = root / "c" / f"{HELLO.hash_part}.narinfo"
    key.write_text(key.read_text().replace("URL: nar/", f"URL: {url}/elsewhere/"))
    store = store_for(tmp_path, "/nix/store")
    assert copy_from_cache(open_cache(f"{url}/c"), store, [HELLO], keys={}).copied == [HELLO]
    assert ("GET", "/elsewhere/12kn72kmqja4c7x6a57wi7y4q3ilkw0rr8n37wzjcsrx5kwri6l1.nar") in server.log
    with pytest.raises(CacheError, match="only an http"):
        copy_from_cache(open_cache(f"file://{root}/c"), store_for(tmp_path / "2", "/nix/store"),
                        [HELLO], keys={})
