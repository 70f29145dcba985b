"""``s3://bucket?endpoint=…&region=…&profile=…&scheme=…`` through boto3 (the ``[s3]`` extra).

The bucket root is the cache root (spec §11).  With ``endpoint`` set, addressing is
path-style and the URL scheme is ``scheme`` (default https).  ``NoSuchKey``, 404
and 403/``AccessDenied`` are "absent", as in Nix.  ``create`` is a conditional
``PutObject`` (``If-None-Match: *``): a server that honours it (AWS, MinIO, moto)
never lets two writers overwrite each other's narinfo.

``narinfo-compression``, ``ls-compression`` and ``log-compression`` (spec §11) compress
narinfos, ``.ls`` listings and ``log/`` objects with that method and name it in the
object's ``Content-Encoding``, which every reader (ours, Nix's over http(s) or S3)
decodes by; NARs are never content-encoded.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Iterator, Mapping

from ..errors import UsageError
from ..formats.streams import Readable
from .backends import Backend, CacheError, Entry, content_type, decode_content
from .compression import compressor

#: the parameter that content-encodes each kind of key (spec §11)
_ENCODED_BY = (("narinfo-compression", lambda key: key.endswith(".narinfo")),
               ("ls-compression", lambda key: key.endswith(".ls")),
               ("log-compression", lambda key: key.startswith("log/")))

_ABSENT_CODES = frozenset({"NoSuchKey", "404", "NotFound", "403", "AccessDenied"})


def _boto3() -> Any:
    try:
        import boto3  # noqa: PLC0415 -- optional: the [s3] extra
        import botocore.config  # noqa: PLC0415
    except ImportError:
        raise UsageError("s3:// binary caches need the Python package 'boto3': "
                         "pip install 'storekeeper[s3]'") from None
    return boto3, botocore.config


class S3Backend(Backend):
    def __init__(self, bucket: str, params: Mapping[str, str]) -> None:
        if not bucket:
            raise UsageError("s3:// URL names no bucket")
        boto3, bconfig = _boto3()
        self.bucket = bucket
        self.url = f"s3://{bucket}"
        region = params.get("region") or params.get("aws-region") or "us-east-1"
        endpoint = params.get("endpoint", "")
        scheme = params.get("scheme") or "https"
        session = boto3.session.Session(profile_name=params.get("profile") or None)
        config = bconfig.Config(
            region_name=region, connect_timeout=5, read_timeout=600,
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=32,
            s3={"addressing_style": "path" if endpoint else "auto"})
        url = None
        if endpoint:
            url = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
        self._s3 = session.client("s3", endpoint_url=url, config=config)
        self._errors = self._s3.exceptions.ClientError
        self._encodings = []
        for name, applies in _ENCODED_BY:
            method = params.get(name, "")
            if method and method != "none":
                compressor(method)  # an unknown method: one clear error now
                self._encodings.append((applies, method))

    def _body(self, key: str, data: bytes | BinaryIO) -> tuple[bytes | BinaryIO, dict[str, str]]:
        """What to upload for ``key``, and its extra headers: compressed, with its
        ``Content-Encoding``, when a ``*-compression`` parameter covers the key."""
        for applies, method in self._encodings:
            if applies(key):
                raw = data if isinstance(data, bytes) else data.read()
                comp = compressor(method)
                return comp.compress(raw) + comp.flush(), {"ContentEncoding": method}
        return data, {}

    def _absent(self, e: Any) -> bool:
        err = getattr(e, "response", {}).get("Error", {})
        return str(err.get("Code")) in _ABSENT_CODES

    def _fail(self, what: str, key: str, e: Exception) -> CacheError:
        return CacheError(f"unable to {what} '{self.url}/{key}': {e}")

    def get(self, key: str) -> bytes | None:
        try:
            obj = self._s3.get_object(Bucket=self.bucket, Key=key)
        except self._errors as e:
            if self._absent(e):
                return None
            raise self._fail("download", key, e) from None
        try:
            data = bytes(obj["Body"].read())
        finally:
            obj["Body"].close()
        return decode_content(data, obj.get("ContentEncoding"), f"{self.url}/{key}")

    def open(self, key: str) -> Readable | None:
        try:
            obj = self._s3.get_object(Bucket=self.bucket, Key=key)
        except self._errors as e:
            if self._absent(e):
                return None
            raise self._fail("download", key, e) from None
        body: Readable = obj["Body"]
        return body

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=key)
        except self._errors as e:
            if self._absent(e):
                return False
            raise self._fail("query", key, e) from None
        return True

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        try:
            body, extra = self._body(key, data)
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=body,
                                ContentType=content_type(key), **extra)
        except self._errors as e:
            raise self._fail("upload", key, e) from None

    def create(self, key: str, data: bytes) -> bool:
        try:
            body, extra = self._body(key, data)
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=body,
                                ContentType=content_type(key), IfNoneMatch="*", **extra)
        except self._errors as e:
            code = str(getattr(e, "response", {}).get("Error", {}).get("Code"))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise self._fail("upload", key, e) from None
        return True

    def list_keys(self, prefix: str = "") -> Iterator[Entry]:
        """ListObjectsV2, 1000 keys a request."""
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for o in page.get("Contents", ()):
                    yield Entry(o["Key"], int(o["Size"]), o["LastModified"].timestamp())
        except self._errors as e:
            raise self._fail("list", prefix, e) from None

    def delete_many(self, keys: list[str]) -> None:
        """DeleteObjects, 1000 keys a request."""
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            try:
                out = self._s3.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in chunk], "Quiet": True})
            except self._errors as e:
                raise self._fail("delete", chunk[0], e) from None
            errors = [e for e in out.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise CacheError(f"unable to delete '{self.url}/{errors[0]['Key']}': "
                                 f"{errors[0].get('Code')} {errors[0].get('Message', '')}")

    def close(self) -> None:
        self._s3.close()
