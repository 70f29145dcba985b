"""s3:// caches against moto in server mode on loopback (an S3-compatible server the test
starts; moto 5 enforces ``If-None-Match: *`` on PutObject).  Skipped when moto or boto3
is missing or the server does not come up.  Also: real Nix reads the same bucket over
its plain HTTP path-style URL (Debian's Nix 2.8 has no S3 support, spec §11)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import HAVE_NIX, run_nix
from test_cache import HELLO, KEYS, VECTORS, A, B, _nix_paths_into, store_for

from storekeeper.cache import CacheError, open_cache
from storekeeper.cache.copy import copy_from_cache, copy_to_cache
from storekeeper.formats.narinfo import narinfo_key
from storekeeper.formats.storepath import StoreDir

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto():
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        pytest.skip("moto[server] or boto3 not installed")
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "MOTO_ALLOW_NONEXISTENT_REGION": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip("moto server did not start")
            time.sleep(0.2)
    yield port
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def bucket(moto, monkeypatch):
    import boto3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    name = f"cache-{os.urandom(4).hex()}"
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto}", region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    # anonymous reads, so real Nix can use the bucket as a plain http:// cache
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject"],
         "Resource": f"arn:aws:s3:::{name}/*"}]}))
    return name, f"s3://{name}?endpoint=127.0.0.1:{moto}&scheme=http&region=us-east-1", s3


def test_s3_copy_to_and_from(bucket, tmp_path):
    name, url, s3 = bucket
    src = store_for(tmp_path / "src", "/nix/store")
    _nix_paths_into(src)
    secret = os.path.join(VECTORS, "keys", "research-bc-1.secret")
    cache = open_cache(f"{url}&compression=zstd&secret-key={secret}&write-nar-listing=1")
    r = copy_to_cache(src, cache, [B, HELLO])
    assert set(r.copied) == {A, B, HELLO}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=name)["Contents"]}
    assert {"nix-cache-info", narinfo_key(A), narinfo_key(B), f"{B.hash_part}.ls"} <= keys
    assert sum(k.startswith("nar/") and k.endswith(".nar.zst") for k in keys) == 3
    head = s3.head_object(Bucket=name, Key=narinfo_key(B))
    assert head["ContentType"] == "text/x-nix-narinfo"
    # create-if-absent is enforced by the server: a second writer cannot overwrite
    assert not cache.backend.create(narinfo_key(B), b"junk")
    assert cache.narinfo(StoreDir(), B) is not None
    dest = store_for(tmp_path / "dest", "/nix/store")
    r2 = copy_from_cache(open_cache(url), dest, [B, HELLO], keys=KEYS)
    assert set(r2.copied) == {A, B, HELLO}
    assert dest.path_info(B).nar_hash == src.path_info(B).nar_hash
    # absent keys: None, not an error
    assert open_cache(url).narinfo(StoreDir(), B.__class__("0" * 32 + "-x")) is None


def test_s3_missing_bucket_is_a_clear_error(moto, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    cache = open_cache(f"s3://no-such-bucket?endpoint=127.0.0.1:{moto}&scheme=http")
    with pytest.raises(CacheError, match="s3://no-such-bucket/nix-cache-info"):
        cache.info()


@pytest.mark.skipif(not HAVE_NIX, reason="real Nix (nix-bin) not installed")
@pytest.mark.nix
def test_nix_substitutes_from_the_bucket_over_http(bucket, tmp_path):
    name, url, _s3 = bucket
    src = store_for(tmp_path / "src", "/nix/store")
    _nix_paths_into(src)
    copy_to_cache(src, open_cache(f"{url}&compression=xz"), [B])
    port = url.split("127.0.0.1:")[1].split("&")[0]
    nixroot = str(tmp_path / "nix")
    run_nix(["nix-store", "--store", nixroot, "-r", src.print_path(B), "--option", "substituters",
             f"http://127.0.0.1:{port}/{name}"], str(tmp_path))
    assert os.path.exists(os.path.join(nixroot, "nix", "store", B.base))


def test_s3_content_encoded_narinfo_is_decoded(bucket, tmp_path):
    """Spec §4.3/§11: a bucket written with narinfo-compression has narinfos with a
    Content-Encoding; readers decode them by that header."""
    import gzip
    name, url, s3 = bucket
    text = open(os.path.join(VECTORS, "nix28-file-none", narinfo_key(A)), "rb").read()
    s3.put_object(Bucket=name, Key="nix-cache-info", Body=b"StoreDir: /nix/store\n")
    s3.put_object(Bucket=name, Key=narinfo_key(A), Body=gzip.compress(text),
                  ContentEncoding="gzip", ContentType="text/x-nix-narinfo")
    ni = open_cache(url).narinfo(StoreDir(), A)
    assert ni is not None and ni.render().encode() == text
    s3.put_object(Bucket=name, Key=narinfo_key(A), Body=b"junk", ContentEncoding="snappy")
    with pytest.raises(CacheError, match="unknown Content-Encoding 'snappy'"):
        open_cache(url).narinfo(StoreDir(), A)


def test_s3_narinfo_ls_and_log_compression(bucket, tmp_path):
    """``narinfo-/ls-/log-compression`` (spec §11): those objects are stored compressed
    with their method as ``Content-Encoding``; our reader and real Nix (over the bucket's
    HTTP URL) decode them by it; NARs stay as they are."""
    import gzip
    import lzma

    import brotli

    from storekeeper.cache.logs import add_build_log, build_log
    name, url, s3 = bucket
    src = store_for(tmp_path / "src", "/nix/store")
    _nix_paths_into(src)
    writer = open_cache(f"{url}&compression=zstd&write-nar-listing=1&narinfo-compression=xz"
                        "&ls-compression=br&log-compression=gzip")
    copy_to_cache(src, writer, [B])
    drv = StoreDir().parse("/nix/store/" + B.hash_part + "-b.drv")
    log = b"building b\n" * 200
    add_build_log(writer, drv, log)

    def raw(key):
        obj = s3.get_object(Bucket=name, Key=key)
        return obj.get("ContentEncoding"), obj["Body"].read()
    enc, body = raw(narinfo_key(B))
    assert enc == "xz" and lzma.decompress(body) == writer.narinfo(StoreDir(), B).render().encode()
    enc, body = raw(f"{B.hash_part}.ls")
    assert enc == "br" and json.loads(brotli.decompress(body))["root"]["type"]
    enc, body = raw(f"log/{drv.base}")
    assert enc == "gzip" and gzip.decompress(body) == log
    nar = writer.narinfo(StoreDir(), B).url
    assert raw(nar)[0] is None  # NARs: never content-encoded
    reader = open_cache(url)
    assert build_log(reader, StoreDir(), drv) == (drv, log)
    dest = store_for(tmp_path / "dest", "/nix/store")
    assert set(copy_from_cache(reader, dest, [B], keys=KEYS).copied) == {A, B}
    with pytest.raises(Exception, match="unknown compression method 'lzma'"):
        open_cache(f"{url}&log-compression=lzma")
    if HAVE_NIX:  # Nix 2.8 decodes the narinfo by its Content-Encoding too
        port = url.split("127.0.0.1:")[1].split("&")[0]
        nixroot = str(tmp_path / "nix")
        run_nix(["nix-store", "--store", nixroot, "-r", src.print_path(B), "--option",
                 "substituters", f"http://127.0.0.1:{port}/{name}"], str(tmp_path))
        assert os.path.exists(os.path.join(nixroot, "nix", "store", B.base))
