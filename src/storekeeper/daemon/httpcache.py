"""``storekeeper serve``: the local store as a read-only HTTP binary cache (spec
binary-cache.md §1–§7), for Nix's ``substituters = http://HOST:PORT`` and
``nix copy --from``.

Keys served (relative to ``/``):

* ``nix-cache-info``: the store dir, ``WantMassQuery: 1``, ``Priority`` (default 30);
* ``<hashpart>.narinfo``: made from the store's row when asked, with a signature by
  the ``--sign-key`` added on the fly (the store's own signatures are kept);
  ``URL: nar/<hashpart>-<nix32 NarHash>.nar<ext>``;
* ``nar/<hashpart>-<nix32 NarHash>.nar<ext>``: the path's NAR, streamed from the
  store (chunked), compressed on the fly when ``--compression`` asks (``FileHash`` /
  ``FileSize`` are then left out of the narinfo, which Nix accepts);
* ``<hashpart>.ls``: the NAR listing; ``log/<drv basename>``: a build log.

Invariant, **what a narinfo names is what is served**: a NAR URL carries both the
hash part and the NarHash it was announced with; a request whose path is no longer
valid, or whose contents' NarHash is another, gets 404 (the client moves on to its
next substituter) rather than other bytes.  Nothing is ever written: every
method but GET and HEAD is refused with 405.

Each request has its own thread (``ThreadingHTTPServer``), so a slow download does
not hold up anyone else; the store is reached through calls that are safe from
several threads (the database connection is shared, reads only).  Each request is
logged on stderr in the common log format.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

from ..build.logs import read_build_log
from ..cache.compression import compressor
from ..errors import StoreError, UsageError
from ..formats import nar as narfmt
from ..formats.errors import FormatError
from ..formats.narinfo import EXTENSIONS, CacheInfo, NarInfo
from ..formats.narlisting import ListingSink
from ..formats.signatures import SecretKey, sign_info

#: what ``--compression`` may ask for: methods that stream with the standard library
#: or the optional zstd codec
SERVE_COMPRESSION = ("none", "xz", "zstd")

_NARINFO = re.compile(r"^/([0-9a-df-np-sv-z]{32})\.narinfo$")
_LISTING = re.compile(r"^/([0-9a-df-np-sv-z]{32})\.ls$")
_NAR = re.compile(r"^/nar/([0-9a-df-np-sv-z]{32})-([0-9a-df-np-sv-z]{52})\.nar(\.xz|\.zst)?$")
_LOG = re.compile(r"^/log/([0-9a-df-np-sv-z]{32}-[^/]+\.drv)$")
_CHUNK = 1 << 16


class CacheServer(ThreadingHTTPServer):
    """The server: one store, an optional signing key, one compression method."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], store, key: SecretKey | None = None,
                 compression: str = "none", priority: int = 30,
                 log: Callable[[str], None] | None = None) -> None:
        if compression not in SERVE_COMPRESSION:
            raise UsageError(f"cannot serve NARs compressed with '{compression}' "
                             f"(choose one of {', '.join(SERVE_COMPRESSION)})")
        if compression == "zstd":
            compressor("zstd")  # one clear error now when the codec is missing
        self.store = store
        self.key = key
        self.compression = compression
        self.priority = priority
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.store_lock = threading.Lock()  # store look-ups; NAR streaming runs outside it
        super().__init__(address, _Handler)

    # --- what is served -------------------------------------------------------------

    def cache_info(self) -> bytes:
        info = CacheInfo(self.store.store_dir.path, want_mass_query=True, priority=self.priority)
        return info.render().encode()

    def lookup(self, hash_part: str):
        """(path, info) of the valid path with ``hash_part``, or None."""
        with self.store_lock:
            sp = self.store.query_path_from_hash_part(hash_part)
            if sp is None:
                return None
            info = self.store.query_path_info(sp)
        return (sp, info) if info is not None else None

    def narinfo(self, hash_part: str) -> bytes | None:
        found = self.lookup(hash_part)
        if found is None:
            return None
        sp, info = found
        sd = self.store.store_dir
        if self.key is not None:
            info = info.with_(sigs=info.sigs | {sign_info(sd, info, self.key)})
        ext = EXTENSIONS[self.compression]
        url = f"nar/{sp.hash_part}-{info.nar_hash.nix32}.nar{ext}"
        if self.compression == "none":
            ni = NarInfo.from_path_info(sd, info, url, "none", info.nar_hash, info.nar_size)
        else:
            ni = NarInfo.from_path_info(sd, info, url, self.compression, None, None)
        return ni.render().encode()

    def nar(self, hash_part: str, nar_hash: str, ext: str) -> Iterator[bytes] | None:
        if ext != EXTENSIONS[self.compression]:
            return None
        found = self.lookup(hash_part)
        if found is None or found[1].nar_hash.nix32 != nar_hash:
            return None
        with self.store_lock:
            chunks = self.store.dump_path(found[0])
        if self.compression == "none":
            return chunks
        return _compressed(chunks, self.compression)

    def listing(self, hash_part: str) -> bytes | None:
        found = self.lookup(hash_part)
        if found is None:
            return None
        with self.store_lock:
            reader = _ChunkReader(self.store.dump_path(found[0]))
        sink = ListingSink(lambda: reader.pos)
        narfmt.read_nar(reader, sink)
        return json.dumps({"version": 1, "root": sink.root}, separators=(",", ":")).encode()

    def build_log(self, drv_base: str) -> bytes | None:
        layout = getattr(self.store, "layout", None)
        if layout is None:
            return None
        return read_build_log(layout.log_dir, drv_base)


def _compressed(chunks: Iterator[bytes], method: str) -> Iterator[bytes]:
    comp = compressor(method)
    for chunk in chunks:
        out = comp.compress(chunk)
        if out:
            yield out
    yield comp.flush()


class _ChunkReader:
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buf = b""
        self.pos = 0

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            nxt = next(self._chunks, None)
            if nxt is None:
                break
            self._buf += nxt
        out, self._buf = self._buf[:n], self._buf[n:]
        self.pos += len(out)
        return out


class _Handler(BaseHTTPRequestHandler):
    server: CacheServer
    protocol_version = "HTTP/1.1"  # keep-alive: Nix fetches many narinfos per connection
    server_version = "storekeeper-serve"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without NODELAY, Nagle and the
        # client's delayed ACK hold every keep-alive answer back by ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 -- the base class's name
        self.server.log(f"{self.address_string()} - - [{self.log_date_time_string()}] "
                        f"{format % args}")

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def _refuse(self) -> None:
        self._reply(405, b"storekeeper serve is read-only\n", "text/plain", extra={"Allow": "GET, HEAD"})

    do_PUT = do_POST = do_DELETE = do_PATCH = _refuse

    def _reply(self, status: int, body: bytes, ctype: str, head: bool = False,
               extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _get(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        srv = self.server
        try:
            if path == "/nix-cache-info":
                return self._reply(200, srv.cache_info(), "text/x-nix-cache-info", head)
            if m := _NARINFO.match(path):
                return self._maybe(srv.narinfo(m[1]), "text/x-nix-narinfo", head)
            if m := _LISTING.match(path):
                return self._maybe(srv.listing(m[1]), "application/json", head)
            if m := _LOG.match(path):
                return self._maybe(srv.build_log(m[1]), "text/plain; charset=utf-8", head)
            if m := _NAR.match(path):
                chunks = srv.nar(m[1], m[2], m[3] or "")
                if chunks is None:
                    return self._maybe(None, "", head)
                return self._stream(chunks, head)
            return self._maybe(None, "", head)
        except (StoreError, FormatError, OSError) as e:
            if isinstance(e, (BrokenPipeError, ConnectionResetError)):
                return
            self.log_error("error: %s", e)
            self._reply(500, f"error: {e}\n".encode(), "text/plain", head)

    def _maybe(self, body: bytes | None, ctype: str, head: bool) -> None:
        if body is None:
            self._reply(404, b"not found\n", "text/plain", head)
        else:
            self._reply(200, body, ctype, head)

    def _stream(self, chunks: Iterator[bytes], head: bool) -> None:
        it = iter(chunks)
        # the first chunk before the status line: a path gone since the look-up is a
        # 404 (or 500), not a broken 200
        first = next(it, b"")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-nix-nar")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if head:
            return
        self._chunk(first)
        for chunk in it:
            self._chunk(chunk)
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--listen '{text}': expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


__all__ = ["CacheServer", "SERVE_COMPRESSION", "parse_listen"]
