"""BinaryCache: the narinfo/NAR layer over a backend (spec binary-cache.md §1–§6, §10).

Invariants a cache written by storekeeper keeps (the writer's side; readers rely on
them, Nix's clients too):

* **I1 closure**: a ``<hash>.narinfo`` is written only after the narinfos of all
  of the path's references are in the cache (:meth:`BinaryCache.commit` checks,
  callers write references first).
* **I2 content**: a narinfo is written only after its NAR file is complete
  (atomic backend writes; the NAR is uploaded first and never half-visible).
* **I3 immutability**: narinfos are created with create-if-absent; one that is
  already there with the same NarHash is taken as success, one with another
  NarHash is an error, never an overwrite.
* The NAR's NarHash/NarSize are checked against the source's while it is
  compressed (Nix 2.8 does not check), so a damaged source path never reaches
  the cache (the NAR is parsed too only when its listing is wanted or the
  source's hash is not sha256: a NAR with the recorded sha256 is the one the
  store validated when it took the path).

Reading checks everything while streaming: the compressed bytes against
FileHash/FileSize (when given), the decoded NAR against NarHash/NarSize.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Mapping

from ..errors import StoreError, UsageError
from ..formats import nar as narfmt
from ..formats.errors import FormatError
from ..formats.hashes import Hash, new_hasher
from ..formats.narinfo import (
    DEFAULT_COMPRESSION,
    WRITABLE,
    CacheInfo,
    NarInfo,
    listing_key,
    nar_url,
    narinfo_key,
)
from ..formats.narlisting import ListingSink
from ..formats.pathinfo import ValidPathInfo
from ..formats.signatures import SecretKey, sign_info
from ..formats.storepath import StoreDir, StorePath
from ..formats.streams import Readable, SelfChecking
from ..fs.atomic import temp_name
from .backends import Backend, CacheError
from .compression import CHUNK, Compressor, Decompressing, compressor
from .http import HttpBackend


class NarMissing(CacheError):
    """The narinfo is there, its NAR is not (Nix's SubstituteGone: try the next cache)."""


class NarCorrupt(CacheError):
    """The NAR does not match its narinfo (hash or size)."""


def _flag(v: str | None) -> bool:
    return v in ("1", "true")


@dataclass
class CacheParams:
    """The URL query parameters a cache store understands (spec §4.1, §9.1, §11)."""

    compression: str = DEFAULT_COMPRESSION
    compression_level: int = -1
    parallel_compression: bool = False
    write_nar_listing: bool = False
    secret_key: str = ""
    priority: int | None = None
    want_mass_query: bool | None = None
    trusted: bool = False

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> "CacheParams":
        p = cls()
        if "compression" in params:
            p.compression = params["compression"]
            if p.compression not in WRITABLE:
                raise UsageError(f"unknown compression method '{p.compression}' "
                                 f"(storekeeper writes {', '.join(WRITABLE)})")
        try:
            if "compression-level" in params:
                p.compression_level = int(params["compression-level"])
            if "priority" in params:
                p.priority = int(params["priority"])
        except ValueError as e:
            raise UsageError(f"bad cache URL parameter: {e}") from None
        p.parallel_compression = _flag(params.get("parallel-compression"))
        p.write_nar_listing = _flag(params.get("write-nar-listing"))
        p.secret_key = params.get("secret-key", "")
        if "want-mass-query" in params:
            p.want_mass_query = _flag(params["want-mass-query"])
        p.trusted = _flag(params.get("trusted"))
        return p


@dataclass
class Prepared:
    """A path's NAR, compressed into a local temp file, ready to upload and commit."""

    info: ValidPathInfo
    narinfo: NarInfo
    tmp: str
    listing: str | None


class BinaryCache:
    """One binary cache: its backend, its parameters and its nix-cache-info."""

    def __init__(self, backend: Backend, params: CacheParams, threads: int = 16) -> None:
        self.backend = backend
        self.params = params
        self.url = backend.url
        self.threads = threads
        self._info: CacheInfo | None = None
        self._key: SecretKey | None = None

    def close(self) -> None:
        self.backend.close()

    # --- nix-cache-info --------------------------------------------------------------

    def info(self) -> CacheInfo | None:
        if self._info is None:
            data = self.backend.get("nix-cache-info")
            if data is None:
                return None
            self._info = CacheInfo.parse(data, f"'{self.url}/nix-cache-info'")
        return self._info

    @property
    def priority(self) -> int:
        info = self.info()
        if self.params.priority is not None:
            return self.params.priority
        return info.priority if info else 0

    @property
    def want_mass_query(self) -> bool:
        if self.params.want_mass_query is not None:
            return self.params.want_mass_query
        info = self.info()
        return bool(info and info.want_mass_query)

    def check_store_dir(self, store_dir: StoreDir, create: bool = False) -> None:
        """Refuse a cache made for another store dir; ``create``: make nix-cache-info."""
        info = self.info()
        if info is None:
            if not create:
                raise CacheError(f"'{self.url}' does not appear to be a binary cache")
            self.backend.create("nix-cache-info", CacheInfo(store_dir.path).render().encode())
            self._info = None
            info = self.info()
            assert info is not None
        if info.store_dir != store_dir.path:
            raise CacheError(f"binary cache '{self.url}' is for Nix stores with prefix "
                             f"'{info.store_dir}', not '{store_dir.path}'")

    # --- reading ------------------------------------------------------------------------

    def narinfo(self, store_dir: StoreDir, sp: StorePath) -> NarInfo | None:
        key = narinfo_key(sp)
        data = self.backend.get(key)
        if data is None:
            return None
        ni = NarInfo.parse(data, store_dir, f"'{self.url}/{key}'")
        if ni.path != sp:
            return None  # Nix: "asked … for P but got Q" — not valid here
        return ni

    def narinfos(self, store_dir: StoreDir, paths: Iterable[StorePath]) -> dict[StorePath, NarInfo]:
        """The narinfos present among ``paths``, looked up in parallel."""
        paths = list(paths)
        if len(paths) <= 1 or self.threads <= 1:
            found = [self.narinfo(store_dir, p) for p in paths]
        else:
            with ThreadPoolExecutor(min(self.threads, len(paths))) as pool:
                found = list(pool.map(lambda p: self.narinfo(store_dir, p), paths))
        return {p: ni for p, ni in zip(paths, found) if ni is not None}

    def has(self, paths: Iterable[StorePath]) -> set[StorePath]:
        paths = list(paths)
        with ThreadPoolExecutor(max(1, min(self.threads, len(paths)))) as pool:
            present = list(pool.map(lambda p: self.backend.exists(narinfo_key(p)), paths))
        return {p for p, ok in zip(paths, present) if ok}

    def open_nar(self, ni: NarInfo) -> "VerifiedNar":
        """The decoded NAR of ``ni`` as a stream, checked while read (see VerifiedNar)."""
        key = ni.url
        raw: Readable | None
        if key.startswith(("http://", "https://")) and isinstance(self.backend, HttpBackend):
            raw = self.backend.open_url(key)  # an HTTP cache uses absolute URLs as they are
        elif "://" in key or key.startswith("/"):
            raise CacheError(f"narinfo of '{ni.store_dir.print(ni.path)}' in '{self.url}' has "
                             f"the absolute URL '{ni.url}', which only an http(s) cache follows")
        else:
            raw = self.backend.open(key.removeprefix("./"))
        if raw is None:
            raise NarMissing(f"file '{ni.url}' does not exist in binary cache '{self.url}'")
        return VerifiedNar(self, raw, ni)

    # --- writing ------------------------------------------------------------------------

    def secret_key(self) -> SecretKey | None:
        if self.params.secret_key and self._key is None:
            try:
                with open(self.params.secret_key) as f:
                    self._key = SecretKey.parse(f.read())
            except OSError as e:
                raise UsageError(f"cannot read secret key '{self.params.secret_key}': "
                                 f"{e.strerror}") from None
        return self._key

    def prepare(self, store_dir: StoreDir, info: ValidPathInfo, chunks: Iterable[bytes | memoryview],
                tmp_dir: str | None = None) -> Prepared:
        """Compress a path's NAR into a temp file, hashing both sides, checking the NAR
        against ``info`` (and building its listing when asked).  Thread-safe."""
        p = self.params
        comp = compressor(p.compression, p.compression_level,
                          os.cpu_count() or 1 if p.parallel_compression else 1)
        tmp = temp_name(tmp_dir or self.backend.scratch_dir() or tempfile.gettempdir(), ".sk-nar.tmp-")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                tee = _Tee(iter(chunks), comp, out)
                listing = ListingSink(lambda: tee.nar_size)
                if p.write_nar_listing or info.nar_hash.algo != "sha256":
                    try:
                        narfmt.read_nar(tee, listing)
                    except FormatError as e:
                        raise StoreError(f"NAR of '{store_dir.print(info.path)}': {e}") from None
                    if tee.read(1):
                        raise StoreError(f"NAR of '{store_dir.print(info.path)}' has data after its end")
                else:
                    # no listing wanted: the sha256 check below is the check (a NAR with
                    # the store's NarHash is the one the store took), no Python parse
                    tee.drain()
                tee.finish()
            nar_hash = Hash("sha256", tee.nar_hasher.digest())
            where = store_dir.print(info.path)
            if info.nar_hash.algo == "sha256" and nar_hash != info.nar_hash:
                raise StoreError(f"path '{where}' is corrupt: its NAR hash is "
                                 f"{nar_hash.typed('nix32')}, the store says "
                                 f"{info.nar_hash.typed('nix32')}")
            if info.nar_size and tee.nar_size != info.nar_size:
                raise StoreError(f"path '{where}' is corrupt: its NAR has {tee.nar_size} bytes, "
                                 f"the store says {info.nar_size}")
            info = info.with_(nar_hash=nar_hash, nar_size=tee.nar_size)
            file_hash = Hash("sha256", tee.file_hasher.digest())
            ni = NarInfo.from_path_info(store_dir, info, nar_url(file_hash, p.compression),
                                        p.compression, file_hash, tee.file_size)
            text = (json.dumps({"version": 1, "root": listing.root}, separators=(",", ":"))
                    if p.write_nar_listing else None)
            return Prepared(info, ni, tmp, text)
        except BaseException:
            os.unlink(tmp)
            raise

    def upload(self, prep: Prepared) -> bool:
        """Upload a prepared NAR unless the same file is there; True if uploaded."""
        key = prep.narinfo.url
        if self.backend.exists(key):
            os.unlink(prep.tmp)
            return False
        self.backend.put_file(key, prep.tmp)
        return True

    def commit_batch(self, preps: list[Prepared], present: set[StorePath]) -> list[bool]:
        """Write the listings and narinfos of ``preps`` (in order, references first; each
        NAR uploaded already): one durability barrier makes the NARs (and the narinfo
        texts) durable before any narinfo appears.  True for each written, False for one
        that was there with the same NarHash."""
        items = []
        added = set(present)
        for prep in preps:
            ni = self._final(prep, added)
            added.add(ni.path)
            if prep.listing is not None:
                self.backend.put(listing_key(ni.path), prep.listing.encode())
            items.append((ni, (narinfo_key(ni.path), ni.render().encode())))
        written = self.backend.create_many([item for _, item in items])
        for (ni, _), w in zip(items, written):
            if not w:
                there = self.narinfo(ni.store_dir, ni.path)
                if there is None or there.nar_hash != ni.nar_hash:
                    raise CacheError(f"binary cache '{self.url}' already has another narinfo "
                                     f"for '{ni.store_dir.print(ni.path)}'")
        present |= added
        return written

    def commit(self, prep: Prepared, present: set[StorePath]) -> bool:
        """:meth:`commit_batch` of one."""
        return self.commit_batch([prep], present)[0]

    def _final(self, prep: Prepared, present: set[StorePath]) -> NarInfo:
        """The narinfo to write (signed when ``secret-key`` is set), once every reference
        is in ``present``."""
        ni = prep.narinfo
        sd = ni.store_dir
        for ref in ni.references:
            if ref != ni.path and ref not in present:
                raise CacheError(f"cannot add '{sd.print(ni.path)}' to the binary cache because "
                                 f"the reference '{sd.print(ref)}' is not valid")
        key = self.secret_key()
        if key is not None:
            ni = ni.with_(sigs=ni.sigs | {sign_info(sd, prep.info, key)})
        return ni


class _Tee:
    """Reads NAR chunks for the NAR parser while compressing them into ``out`` and
    hashing both sides."""

    def __init__(self, chunks: Iterator[bytes | memoryview], comp: Compressor, out: BinaryIO) -> None:
        self._chunks = chunks
        self._comp = comp
        self._out = out
        self._buf = memoryview(b"")
        self.nar_hasher = new_hasher("sha256")
        self.file_hasher = new_hasher("sha256")
        self.nar_size = 0
        self.file_size = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self.file_hasher.update(data)
            self.file_size += len(data)
            self._out.write(data)

    def read(self, n: int) -> bytes:
        if not self._buf:
            chunk = next(self._chunks, b"")
            if not chunk:
                return b""
            self.nar_hasher.update(chunk)
            self._emit(self._comp.compress(chunk))
            self._buf = memoryview(chunk)
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        self.nar_size += len(out)
        return out

    def drain(self) -> None:
        """Take every chunk left, unparsed (compressed and hashed as :meth:`read` does)."""
        assert not self._buf
        update, compress, emit = self.nar_hasher.update, self._comp.compress, self._emit
        for chunk in self._chunks:
            update(chunk)
            self.nar_size += len(chunk)
            emit(compress(chunk))

    def finish(self) -> None:
        self._emit(self._comp.flush())


class VerifiedNar(SelfChecking):
    """The decoded NAR of a narinfo, checked while read: the compressed bytes against
    FileHash/FileSize, the decoded ones against NarHash/NarSize.  The check happens as
    the last byte is read (NarSize reached), so a consumer that stops exactly at the
    NAR's end, as the NAR parser does, still gets the error before it commits; one that
    stops earlier (a shorter NAR in the file) must call :meth:`finish`, or check the
    NarHash itself as ``add_nar`` does."""

    def __init__(self, cache: BinaryCache, raw: Readable, ni: NarInfo) -> None:
        self._cache = cache
        self._raw_stream = raw
        self.ni = ni
        self._where = f"'{ni.store_dir.print(ni.path)}' from '{cache.url}'"
        self._raw = _Counting(raw)
        self._dec = Decompressing(self._raw, ni.compression)
        self._hasher = new_hasher(ni.nar_hash.algo)
        self.size = 0
        self._checked = False

    @property
    def checks(self) -> tuple[object, int]:
        """(NarHash, NarSize): what this stream checks itself, by its last byte or by
        :meth:`finish` (a store unpacking it need not hash it a second time)."""
        return self.ni.nar_hash, self.ni.nar_size

    def read(self, n: int = -1) -> bytes:
        if self._checked or n == 0:
            return b""
        want = self.ni.nar_size - self.size
        data = self._dec.read(min(n, want) if n >= 0 else want)
        self._hasher.update(data)
        self.size += len(data)
        if self.size >= self.ni.nar_size or not data:
            self._check()
        return data

    def finish(self) -> None:
        """Read to the end and check (a consumer that stopped early, e.g. at the end of a
        NAR shorter than NarSize, learns here that it was not the NAR it should be)."""
        while not self._checked:
            self.read(CHUNK)

    def _check(self) -> None:
        self._checked = True
        ni = self.ni
        if self.size != ni.nar_size:
            raise NarCorrupt(f"NAR of {self._where} is {self.size} bytes, its narinfo says "
                             f"{ni.nar_size}")
        got = Hash(ni.nar_hash.algo, self._hasher.digest())
        if got != ni.nar_hash:
            raise NarCorrupt(f"hash mismatch importing path {self._where};\n"
                             f"  specified: {ni.nar_hash.typed('nix32')}\n"
                             f"  got:       {got.typed('nix32')}")
        if self._dec.read(1):
            raise NarCorrupt(f"NAR of {self._where} has data after its end")
        while self._raw.read(CHUNK):
            pass
        if ni.file_size is not None and self._raw.size != ni.file_size:
            raise NarCorrupt(f"file '{ni.url}' of {self._where} is {self._raw.size} bytes, "
                             f"its narinfo says {ni.file_size}")
        if ni.file_hash is not None:
            fh = Hash(ni.file_hash.algo, self._raw.digest(ni.file_hash.algo))
            if fh != ni.file_hash:
                raise NarCorrupt(f"file '{ni.url}' of {self._where} has hash "
                                 f"{fh.typed('nix32')}, its narinfo says "
                                 f"{ni.file_hash.typed('nix32')}")

    def close(self) -> None:
        self._cache.backend.close_stream(self._raw_stream)


class _Counting:
    def __init__(self, raw: Readable) -> None:
        self._raw = raw
        self.size = 0
        self._sha256 = new_hasher("sha256")

    def read(self, n: int) -> bytes:
        data = self._raw.read(n)
        if data:
            self.size += len(data)
            self._sha256.update(data)
        return bytes(data) if data else b""

    def digest(self, algo: str) -> bytes:
        if algo != "sha256":
            raise CacheError(f"FileHash of algorithm {algo} is not supported")
        return self._sha256.digest()
