"""Build logs in a binary cache (spec binary-cache.md §1, §6): ``log/<drv basename>``,
the raw log bytes (uncompressed, as ``nix store copy-log`` writes them to a cache; an
S3 cache's ``log-compression`` stores them compressed under a Content-Encoding, which
the backend decodes when reading).

A log is found by the derivation's basename; for any other path, through the
``Deriver`` of its narinfo, as ``nix log --store URL PATH`` does.  Logs are not part of
the closure invariant (a log may be written before or after its paths' narinfos,
and is overwritten by a later copy).
"""

from __future__ import annotations

from ..formats.storepath import StoreDir, StorePath
from .binary import BinaryCache


def log_key(drv: StorePath) -> str:
    return f"log/{drv.base}"


def add_build_log(cache: BinaryCache, drv: StorePath, log: bytes) -> None:
    """Write ``log`` as the build log of ``drv`` (replacing one there)."""
    cache.backend.put(log_key(drv), log)


def build_log(cache: BinaryCache, store_dir: StoreDir, path: StorePath
              ) -> tuple[StorePath, bytes] | None:
    """(the derivation, its log) for ``path`` (a ``.drv``, or a path whose narinfo names
    its deriver), or None when the cache has none."""
    drv: StorePath | None = path
    if not path.is_derivation:
        ni = cache.narinfo(store_dir, path)
        drv = ni.deriver if ni is not None else None
    if drv is None:
        return None
    data = cache.backend.get(log_key(drv))
    return None if data is None else (drv, data)


__all__ = ["add_build_log", "build_log", "log_key"]
