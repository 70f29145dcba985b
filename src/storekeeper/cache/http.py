"""The ``http(s)://`` backend: one keep-alive connection per thread; GET/HEAD/PUT;
404, 410, 401, 403 and 407 are "absent" (spec §7.1); 5xx, 408, 429 and connection
failures are retried (``download-attempts``, 5) with Nix's back-off.  ``create`` is a
PUT with ``If-None-Match: *`` (a server that ignores it overwrites, as Nix always does).
"""

from __future__ import annotations

import http.client
import os
import random
import threading
import time
from typing import BinaryIO

from ..formats.streams import Readable
from .backends import Backend, CacheError, content_type, decode_content

ABSENT = frozenset({404, 410, 401, 403, 407})
#: not worth a retry (spec §7.1): other 4xx except 408/429, and 501, 505, 511
_FINAL = frozenset({501, 505, 511})


def _retryable(status: int) -> bool:
    if status in (408, 429):
        return True
    if 400 <= status < 500 or status in _FINAL:
        return False
    return status >= 500


class HttpBackend(Backend):
    """An HTTP(S) binary cache; thread-safe.  Connections are kept alive in a pool: a
    request takes an idle one (or opens one) and gives it back once its response is
    read to the end; a NAR stream gives its connection back when it is exhausted, and
    closes it when abandoned."""

    def __init__(self, url: str, attempts: int = 5, timeout: float = 300.0,
                 base_delay: float = 0.25) -> None:
        self.url = url.rstrip("/")
        scheme, _, rest = self.url.partition("://")
        host, slash, prefix = rest.partition("/")
        self._https = scheme == "https"
        self._host = host
        self._prefix = "/" + prefix if slash and prefix else ""
        self._attempts = max(1, attempts)
        self._timeout = timeout
        self._delay = base_delay
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._others: dict[str, HttpBackend] = {}  # hosts of absolute NAR URLs

    def _acquire(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, timeout=self._timeout)

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.append(conn)

    def _request(self, method: str, key: str, body: bytes | BinaryIO | None = None,
                 headers: dict[str, str] | None = None
                 ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """The response, body unread, and its connection (the caller reads the body, then
        :meth:`_release` s the connection); raises CacheError for a final failure after
        the retries."""
        path = f"{self._prefix}/{key}"
        last = ""
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(self._delay * 2 ** (attempt - 1 + random.uniform(0, 0.5)))
                if body is not None and not isinstance(body, bytes):
                    body.seek(0)
            conn = self._acquire()
            try:
                conn.request(method, path, body=body, headers={"User-Agent": "storekeeper",
                                                               **(headers or {})})
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                last = f"{type(e).__name__}: {e}"
                continue
            if _retryable(resp.status):
                self._finish(resp, conn)
                last = f"HTTP {resp.status} {resp.reason}"
                continue
            return resp, conn
        raise CacheError(f"unable to {method} '{self.url}/{key}': {last}")

    def _finish(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection) -> bytes:
        """Read the rest of a response and give its connection back (or close it)."""
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise CacheError(f"reading from '{self.url}' failed: {e}") from None
        if resp.will_close:
            conn.close()
        else:
            self._release(conn)
        return data

    def get(self, key: str) -> bytes | None:
        resp, conn = self._request("GET", key)
        data = self._finish(resp, conn)
        if resp.status in ABSENT:
            return None
        if resp.status != 200:
            raise CacheError(f"unable to download '{self.url}/{key}': HTTP {resp.status} {resp.reason}")
        return decode_content(data, resp.getheader("Content-Encoding"), f"{self.url}/{key}")

    def open(self, key: str) -> Readable | None:
        resp, conn = self._request("GET", key)
        if resp.status in ABSENT:
            self._finish(resp, conn)
            return None
        if resp.status != 200:
            self._finish(resp, conn)
            raise CacheError(f"unable to download '{self.url}/{key}': HTTP {resp.status} {resp.reason}")
        return _Body(self, resp, conn)

    def open_url(self, url: str) -> Readable | None:
        """A NAR named by an absolute ``http(s)://`` URL (spec §7.1: used as it is)."""
        scheme, _, rest = url.partition("://")
        host, _, path = rest.partition("/")
        base = f"{scheme}://{host}"
        with self._lock:
            other = self._others.get(base)
            if other is None:
                other = self._others[base] = HttpBackend(base, self._attempts, self._timeout,
                                                         self._delay)
        return other.open(path)

    def exists(self, key: str) -> bool:
        resp, conn = self._request("HEAD", key)
        self._finish(resp, conn)
        if resp.status in ABSENT:
            return False
        if resp.status // 100 != 2:
            raise CacheError(f"unable to query '{self.url}/{key}': HTTP {resp.status} {resp.reason}")
        return True

    def _put(self, key: str, data: bytes | BinaryIO, extra: dict[str, str]) -> int:
        headers = {"Content-Type": content_type(key), **extra}
        if not isinstance(data, bytes):
            data.seek(0, os.SEEK_END)
            headers["Content-Length"] = str(data.tell())
            data.seek(0)
        resp, conn = self._request("PUT", key, data, headers)
        self._finish(resp, conn)
        return resp.status

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        status = self._put(key, data, {})
        if status // 100 != 2:
            raise CacheError(f"unable to upload '{self.url}/{key}': HTTP {status}")

    def create(self, key: str, data: bytes) -> bool:
        status = self._put(key, data, {"If-None-Match": "*"})
        if status == 412:
            return False
        if status // 100 != 2:
            raise CacheError(f"unable to upload '{self.url}/{key}': HTTP {status}")
        return True

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            others, self._others = list(self._others.values()), {}
        for c in idle:
            c.close()
        for o in others:
            o.close()


class _Body:
    """A NAR being downloaded: its connection goes back to the pool at the end."""

    def __init__(self, backend: HttpBackend, resp: http.client.HTTPResponse,
                 conn: http.client.HTTPConnection) -> None:
        self._backend = backend
        self._resp: http.client.HTTPResponse | None = resp
        self._conn = conn

    def read(self, n: int = -1) -> bytes:
        resp = self._resp
        if resp is None:
            return b""
        try:
            data = resp.read(n) if n >= 0 else resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise CacheError(f"download from '{self._backend.url}' failed: {e}") from None
        if not data or resp.isclosed():
            self._resp = None
            if resp.will_close:
                self._conn.close()
            else:
                self._backend._release(self._conn)
        return data

    def close(self) -> None:
        if self._resp is not None:  # abandoned half-read: the connection is unusable
            self._resp = None
            self._conn.close()
