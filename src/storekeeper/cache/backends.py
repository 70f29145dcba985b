"""Where a binary cache's keys live: a directory, an HTTP prefix, an S3 bucket.

A backend is a flat key space (``nix-cache-info``, ``<hash>.narinfo``,
``nar/<file>``, ``<hash>.ls``, ``log/<drv>``) with five operations.  Every write
is atomic: a reader sees the old object or the new one, never part of one.

* ``file://DIR``: temp file in the key's directory, fsync, ``rename`` (``put``)
  or ``link`` (``create``: fails if the key exists).  The directories changed are
  synced by :meth:`Backend.barrier` (and at close), not after each write, so a
  writer orders durability where it matters (NARs before the narinfos naming them)
  at one directory sync per batch.
* ``http(s)://`` is in :mod:`storekeeper.cache.http`.
* ``s3://`` is in :mod:`storekeeper.cache.s3`.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import threading
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
    narinfo temp files costs about one journal commit instead of one per file.  Not
    one ``syncfs``: it waits for every dirty page of the file system, other
    processes' too (35-500 ms on a busy shared disk where such an fsync took 1-20 ms:
    bench/RESULTS.md "cache-to")."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        self.url = f"file://{self.root}"
        self._dirty: set[str] = set()      # directories with new entries
        self._unsynced: list[str] = []     # files whose data is not synced yet
        self._dirty_lock = threading.Lock()
        self._made: set[str] = set()       # directories known to exist

    def _makedirs(self, d: str, again: bool = False) -> None:
        if again or d not in self._made:
            os.makedirs(d, exist_ok=True)
            self._made.add(d)

    def scratch_dir(self) -> str:
        d = os.path.join(self.root, "nar")
        if not os.path.isdir(d):  # (one stat: makedirs raises and catches when it exists)
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
        self._makedirs(directory)
        tmp = temp_name(directory, "." + os.path.basename(path) + ".tmp-")
        try:
            try:
                fd = os.open(tmp, _O_NEW, 0o644)
            except FileNotFoundError:  # the directory was removed since we made it
                self._makedirs(directory, again=True)
                fd = os.open(tmp, _O_NEW, 0o644)
            try:
                os.fchmod(fd, 0o644)  # (whatever the umask)
                if isinstance(data, bytes):
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                else:
                    with os.fdopen(fd, "wb", closefd=False) as f:
                        shutil.copyfileobj(data, f, 1 << 20)
            finally:
                os.close(fd)
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


#: a temp file of ours: new, never through a link
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

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
