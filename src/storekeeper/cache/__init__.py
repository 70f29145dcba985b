"""Binary caches (spec binary-cache.md): reading, writing and copying closures.

Layer: beside ``store`` (it imports ``formats``, ``fs``, ``api`` and ``errors``, never
``store`` or ``build``).  Stores come in as :class:`storekeeper.api.Store`, so the
daemon, the client side and the CLI can all use it.

* :mod:`.backends`: the key spaces (``file://``), :mod:`.http` (``http(s)://``),
  :mod:`.s3` (``s3://``);
* :mod:`.compression`: NAR codecs, streamed, Nix's sniffing rules;
* :mod:`.binary`: :class:`BinaryCache` (narinfo/NAR reading, verified while streamed;
  writing with the closure and atomicity invariants in its module docstring);
* :mod:`.copy`: closures to and from a cache.
"""

from __future__ import annotations

from ..errors import UsageError
from ..formats.url import parse_qsl, unquote
from .backends import Backend, CacheError, FileBackend
from .binary import BinaryCache, CacheParams, NarCorrupt, NarMissing
from .http import HttpBackend
from .s3 import S3Backend

__all__ = ["BinaryCache", "CacheError", "CacheParams", "NarCorrupt", "NarMissing", "open_cache",
           "split_url"]


def split_url(url: str) -> tuple[str, str, dict[str, str]]:
    """(scheme, rest without the query, parameters) of a cache URL."""
    base, _, query = url.partition("?")
    scheme, sep, rest = base.partition("://")
    if not sep:
        raise UsageError(f"'{url}' is not a binary cache URL (file://DIR, http(s)://…, s3://BUCKET)")
    return scheme, rest, dict(parse_qsl(query))


def open_cache(url: str, threads: int = 16) -> BinaryCache:
    """The cache a URL names, as Nix spells them: ``file://DIR``, ``http(s)://HOST/PREFIX``,
    ``s3://BUCKET?endpoint=…&region=…&profile=…&scheme=…``, each with the cache
    parameters of :class:`CacheParams`."""
    scheme, rest, params = split_url(url)
    backend: Backend
    if scheme == "file":
        path = unquote(rest)
        if not path.startswith("/"):
            raise UsageError(f"file:// cache URL '{url}' needs an absolute path")
        backend = FileBackend(path)
        threads = 1
    elif scheme in ("http", "https"):
        if not rest or rest.startswith("/"):
            raise UsageError(f"cache URL '{url}' names no host")
        backend = HttpBackend(f"{scheme}://{rest}")
    elif scheme == "s3":
        backend = S3Backend(rest.strip("/"), params)
    else:
        raise UsageError(f"don't know how to open binary cache '{url}' "
                         "(storekeeper knows file://, http://, https://, s3://)")
    return BinaryCache(backend, CacheParams.from_query(params), threads)
