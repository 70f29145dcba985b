"""Store optimisation (a package: ``hashing``, ``pool``, ``worker``, ``records``, ``driver``): identical files in valid paths become hard links to one pool inode.

The pool is ``<store>/.links/<nix32 sha256 of the single file's NAR>``, the
same pool real Nix keeps, so a store optimised by Nix and by us shares one
``.links`` (regular files and, as Nix on Linux does, symlinks).

Invariants:

* **A name is only ever replaced by an inode with the same NAR.**  A file is
  hashed through an fd opened ``O_NOFOLLOW`` relative to its (``O_NOFOLLOW``)
  parent dir; before it is replaced, its identity (inode, size, mtime) is
  checked again.  Before the first link of a pool entry in a run (whoever
  made it), the file and the entry are compared byte for byte.  On any
  mismatch nothing is linked: the entry is re-hashed and removed (with a
  warning) if its contents do not match its name, else the file is reported
  as changed (#14599).
* **Replacement is atomic.**  ``link(.links/H, <store>/.tmp-link-<pid>-<rand>)``
  then ``rename`` over the file: every reader sees the old or the new inode,
  never a missing file.  A temp link is always removed or renamed before the
  file's turn ends (``rename`` onto a name that already is that inode is a
  no-op that leaves the temp behind: we unlink it).  One left by a crash is
  junk that the GC removes.
* **Metadata stays canonical.**  A parent dir is made writable only when a
  ``rename`` is refused, and is put back to mode 0555 and mtime 1 after its
  files are done (a run killed in between is finished from its journal by the
  next optimise or verify: :mod:`.journal`); file modes and mtimes are untouched (the pool inode carries
  the same canonical metadata, and the executable bit is part of the hash).
* **Pin, then check**: every path is pinned (temp root) and found valid before
  it is touched.  Paths added with ``auto-optimise-store`` are optimised under
  their ``.lock``, before registration (their caller holds them).
* **The pool is a cache.**  ``.links`` missing or partly deleted is rebuilt;
  entries vanishing under us (a GC, a Nix 2.8 optimiser) mean retry; EMLINK
  (too many links to one inode) and ENOSPC on ``.links`` leave the file as it
  is and are counted.
* **Statistics are true.**  ``bytes_freed`` counts ``st_blocks`` of inodes
  whose last link went (an ``O_PATH`` fd kept on the old inode reads
  ``st_nlink == 0`` after the rename), not the sizes of the files relinked;
  what ``.links`` itself grew by is reported beside it (``pool_dir_growth``).

Lock protocol between optimisers and the GC's removal of unused pool entries
(``<state>/optimise.lock`` and ``<state>/optimise.gate``, ``flock``):

* An optimiser holds ``optimise.lock`` **shared** from the moment it looks up
  an existing pool entry until the ``rename`` that gives that entry another
  link.  It may keep it over the next directories for up to 50 ms
  (``worker._HOLD_SECONDS``: a lock per directory cost four ``flock`` calls
  each), so it can be held while small files are read and hashed, but it is
  let go before any file of 256 KiB or more is read and at the end of each
  chunk of paths, and it is never held while pinning or waiting for anything
  else.  It takes it by locking ``optimise.gate`` exclusively, then
  ``optimise.lock`` shared, then releasing the gate.
* The GC (:func:`remove_unused_links`) scans ``.links`` unlocked, then takes
  ``optimise.gate`` exclusively and ``optimise.lock`` exclusively, re-reads
  the link count of each candidate and unlinks it only if it is still 1.
  Holding the gate keeps new optimisers out while it waits, so a stream of
  overlapping shared holders cannot starve it; shared holders never wait for
  the GC, so the wait is bounded by 50 ms plus one directory's small files.
* So an entry with link count 1 is removed either before an optimiser looks
  it up (the optimiser finds it missing and makes the file the new entry) or
  after the optimiser's ``rename`` (count is 2 again: kept).  A Nix 2.8 GC or
  optimiser does not take these locks: against them we retry when an entry or
  our temp link vanishes between ``link`` and ``rename`` (as Nix master
  does); the worst outcome of their race is a pool entry lost, never a file.
"""

from .driver import optimise_path, optimise_store
from .hashing import LINKS_DIR, TMP_LINK_PREFIX, file_nar_hash, nix32_sha256
from .journal import recover as recover_interrupted
from .pool import OptimiseStats, PoolLock, PoolStats, open_pool, pool_stats, remove_unused_links
from .records import DONE_NAME

__all__ = [
    "DONE_NAME", "LINKS_DIR", "OptimiseStats", "PoolLock", "PoolStats", "TMP_LINK_PREFIX",
    "file_nar_hash", "nix32_sha256", "open_pool", "optimise_path", "optimise_store", "pool_stats",
    "recover_interrupted", "remove_unused_links",
]
