"""Where a binary cache's keys live: a directory, an HTTP prefix, an S3 bucket.

A backend is a flat key space (``nix-cache-info``, ``<hash>.narinfo``,
``nar/<file>``, ``<hash>.ls``, ``log/<drv>``) with five operations.  Every write
is atomic: a reader sees the old object or the new one, never part of one.

* ``file://DIR``: temp file in the key's directory, fsync, ``rename`` (``put``)
  or ``link`` (``create``: fails if the key exists).  The directories changed are
  synced by :meth:`Backend.barrier` (and at close), not after each write, so a
  writer orders durability where it matters (NARs before the narinfos naming them)
  at one directory sync per batch.
* ``http(s)://``: one keep-alive connection per thread; GET/HEAD/PUT; 404, 410,
  401, 403 and 407 are "absent" (spec §7.1); 5xx, 408, 429 and connection
  failures are retried (``download-attempts``, 5) with Nix's back-off.
  ``create`` is a PUT with ``If-None-Match: *`` (a server that ignores it
  overwrites, as Nix always does).
* ``s3://`` is in :mod:`storekeeper.cache.s3`.
"""

from __future__ import annotations

import errno
import http.client
import io
import os
import random
import shutil
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

from .. import fs
from ..errors import StoreError
from ..formats.streams import Readable
from ..fs.atomic import fsync_dir, temp_name
from .compression import Decompressing

#: Content-Type of each kind of key when uploading (spec §7.1)
CONTENT_TYPES = {".narinfo": "text/x-nix-narinfo", ".ls": "application/json",
                 "nix-cache-info": "text/x-nix-cache-info"}


#: Content-Encoding values a reader decodes (spec §4.3: S3's narinfo-/ls-/log-compression)
_ENCODINGS = {"gzip": "gzip", "x-gzip": "gzip", "br": "br", "xz": "xz", "bzip2": "bzip2",
              "zstd": "zstd"}


def decode_content(data: bytes, encoding: str | None, where: str) -> bytes:
    """A small object's bytes, decoded by its Content-Encoding (identity or none: as is)."""
    if not encoding or encoding.strip().lower() in ("identity", ""):
        return data
    method = _ENCODINGS.get(encoding.strip().lower())
    if method is None:
        raise CacheError(f"'{where}' has the unknown Content-Encoding '{encoding}'")
    return Decompressing(io.BytesIO(data), method).read(-1)


def content_type(key: str) -> str:
    if key.startswith("nar/"):
        return "application/x-nix-nar"
    if key.startswith("log/"):
        return "text/plain; charset=utf-8"
    for suffix, ct in CONTENT_TYPES.items():
        if key.endswith(suffix):
            return ct
    return "application/octet-stream"


class CacheError(StoreError):
    """A binary cache could not be read or written (the message names the cache)."""


class Entry(NamedTuple):
    """One listed key: its size in bytes and its modification time (Unix seconds)."""

    key: str
    size: int
    mtime: float


class Backend(ABC):
    """A flat key space; see the module docstring."""

    url: str

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when absent."""

    @abstractmethod
    def open(self, key: str) -> Readable | None:
        """A stream of the object (closed by :meth:`close_stream`), or None when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def put(self, key: str, data: bytes | BinaryIO) -> None:
        """Write (or overwrite) ``key`` atomically; ``data`` may be a file opened for reading."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` unless it exists: True if written, False if it was there."""

    def list_keys(self, prefix: str = "") -> Iterator[Entry]:
        """Every key starting with ``prefix`` (a directory prefix ending in ``/`` or ``""``),
        with its size and modification time; only where the key space can be listed."""
        raise CacheError(f"binary cache '{self.url}' cannot be listed")

    def delete_many(self, keys: list[str]) -> None:
        """Delete ``keys`` (an absent one is not an error)."""
        raise CacheError(f"binary cache '{self.url}' does not support deletion")

    def close_stream(self, stream: Any) -> None:
        close = getattr(stream, "close", None)
        if close is not None:
            close()

    def create_many(self, items: list[tuple[str, bytes]]) -> list[bool]:
        """:meth:`create` each, in order; everything written before is durable before
        any of them appears (the file backend syncs once for the whole batch)."""
        self.barrier()
        return [self.create(k, d) for k, d in items]

    def scratch_dir(self) -> str | None:
        """Where a writer's temp files go (None: the system's temp dir); a file backend
        gives one on its own file system, so :meth:`put_file` renames instead of copying."""
        return None

    def put_file(self, key: str, path: str) -> None:
        """:meth:`put` of the temp file ``path``, which is gone afterwards."""
        try:
            with open(path, "rb") as f:
                self.put(key, f)
        finally:
            os.unlink(path)  # (our own temp file, not a tree of anyone's)

    def barrier(self) -> None:  # noqa: B027 -- remote stores are durable once they answer
        """Make every write so far durable before any later one (the file backend's
        directory syncs; a no-op where a write is durable when acknowledged)."""
        return None

    def close(self) -> None:  # noqa: B027 -- most backends hold nothing to close
        return None


# --- file:// -------------------------------------------------------------------------

class FileBackend(Backend):
    """Durability without an fsync per write: new files are written without one and
    listed; :meth:`barrier` fsyncs all of them, then their directories, from a few
    threads at once (the file system commits them together), so a batch of NARs and
    narinfo temp files costs about one journal commit instead of one per file."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        self.url = f"file://{self.root}"
        self._dirty: set[str] = set()      # directories with new entries
        self._unsynced: list[str] = []     # files whose data is not synced yet
        self._dirty_lock = threading.Lock()

    def scratch_dir(self) -> str:
        d = os.path.join(self.root, "nar")
        os.makedirs(d, exist_ok=True)
        return d

    def put_file(self, key: str, path: str) -> None:
        try:
            os.chmod(path, 0o644)
            os.replace(path, self._path(key))
        except BaseException:
            _unlink(path)
            raise
        self._changed(self._path(key), data=True)

    def _parallel(self, fn: Callable[[str], None], items: list[str]) -> None:
        if len(items) == 1:
            fn(items[0])
            return
        # a pool per barrier (one per batch of narinfos), gone when it returns: no
        # thread outlives the call in a process that may fork
        with ThreadPoolExecutor(min(8, len(items)), thread_name_prefix="sk-fsync") as pool:
            list(pool.map(fn, items))

    def _changed(self, path: str, data: bool) -> None:
        with self._dirty_lock:
            self._dirty.add(os.path.dirname(path))
            if data:
                self._unsynced.append(path)

    def barrier(self) -> None:
        with self._dirty_lock:
            files, self._unsynced = self._unsynced, []
            dirs, self._dirty = self._dirty, set()
        if files:
            self._parallel(_fsync_file, files)
        if dirs:
            self._parallel(fsync_dir, sorted(dirs))

    def close(self) -> None:
        self.barrier()

    def create_many(self, items: list[tuple[str, bytes]]) -> list[bool]:
        tmps = [self._temp(k, d) for k, d in items]
        try:
            with self._dirty_lock:
                self._unsynced.extend(tmps)
            self.barrier()  # earlier writes and these temp files: durable before any link
            out = []
            for (key, _), tmp in zip(items, tmps):
                try:
                    os.link(tmp, self._path(key))
                    out.append(True)
                    self._changed(self._path(key), data=False)
                except FileExistsError:
                    out.append(False)
            return out
        finally:
            for tmp in tmps:
                _unlink(tmp)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise CacheError(f"key '{key}' escapes the cache '{self.url}'")
        return os.path.join(self.root, key)

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def open(self, key: str) -> Readable | None:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def _temp(self, key: str, data: bytes | BinaryIO) -> str:
        path = self._path(key)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = temp_name(directory, "." + os.path.basename(path) + ".tmp-")
        try:
            with open(tmp, "xb") as f:
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f, 1 << 20)
            os.chmod(tmp, 0o644)
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        tmp = self._temp(key, data)
        try:
            os.replace(tmp, self._path(key))
        except BaseException:
            _unlink(tmp)
            raise
        self._changed(self._path(key), data=True)

    def create(self, key: str, data: bytes) -> bool:
        return self.create_many([(key, data)])[0]

    def list_keys(self, prefix: str = "") -> Iterator[Entry]:
        # A fleet's cache dir is shared: whoever may write to it may swap a directory
        # in it for a symlink.  Only the cache's own dir is opened by path; below it
        # fs.walk opens everything fd-relative, never following a link.
        base = prefix.rstrip("/") + "/" if prefix else ""
        if prefix:
            self._path(prefix.rstrip("/"))  # (refuses a prefix that escapes the cache)
        try:
            top = os.open(self.root, _TOP_DIR)
            if prefix:
                root, top = top, -1
                try:
                    top = _open_below(root, prefix.rstrip("/"))
                finally:
                    os.close(root)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            if e.errno == errno.ELOOP:
                return  # (a prefix that is a link lists nothing, as a missing one)
            raise
        try:
            for event, node in fs.walk(".", top):
                if event != fs.ENTRY or node.kind != fs.REG:
                    continue
                try:
                    st = node.lstat()
                except FileNotFoundError:
                    continue  # deleted while listed
                yield Entry(base + node.path, st.st_size, st.st_mtime)
        finally:
            os.close(top)

    def delete_many(self, keys: list[str]) -> None:
        """Unlinks from a few threads at once: an unlink waits on the file system's
        journal, not on the CPU (4000 unlinks: 1.65 s alone, 0.37 s from 4 threads)."""
        paths = [self._path(key) for key in keys]  # (checked: no key escapes the cache)
        top = os.open(self.root, _TOP_DIR)
        try:
            if len(keys) > 64:
                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(lambda key: _unlink_key(top, key), keys, chunksize=64))
            else:
                for key in keys:
                    _unlink_key(top, key)
        finally:
            os.close(top)
        with self._dirty_lock:
            self._dirty.update({os.path.dirname(p) for p in paths})


def _fsync_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # deleted since (a collection, or a replaced lease): nothing to make durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    """Remove a temp file this process made itself (not a walk of anyone's tree)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


#: the cache's own directory, named by the URL: the one open that follows links
_TOP_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _open_below(top: int, rel: str) -> int:
    """The directory ``rel`` below the fd ``top``, each step opened relative to its
    parent and never through a link (ELOOP/ENOTDIR where one is)."""
    fd = top
    try:
        for d in rel.split("/"):
            nxt = fs.open_dir(d, fd)
            if fd != top:
                os.close(fd)
            fd = nxt
    except BaseException:
        if fd != top:
            os.close(fd)
        raise
    return fd


def _unlink_key(top: int, key: str) -> None:
    """Unlink ``key`` below the cache's fd ``top`` through :func:`_open_below` (the
    cache dir may be shared, and a directory in it swapped for a link elsewhere)."""
    d, _, name = key.rpartition("/")
    try:
        fd = _open_below(top, d) if d else top
    except (FileNotFoundError, NotADirectoryError):
        return  # gone already, or not a directory now: nothing of ours to delete
    except OSError as e:
        if e.errno == errno.ELOOP:
            return  # a link where a directory was: never followed
        raise
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    finally:
        if fd != top:
            os.close(fd)


# --- http(s):// ----------------------------------------------------------------------

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
