"""A test hook: the process SIGKILLs itself at a named step.

``STOREKEEPER_CRASH_AT=<point>`` (or ``<point>:<n>``, the n-th time the point is
reached, default the first) makes :func:`crash_point` kill the process there,
with no clean-up of any kind: what a power cut or the OOM killer leaves behind.
Tests use it to check that every step of add, register, GC, optimise, build
registration, substitution and profile changes leaves a store that both our
verify and Nix's accept.  Unset (the normal case), a crash point costs one
comparison.

``STOREKEEPER_CRASH_LOG=<file>`` instead appends the name of every point reached
to ``file`` (one line each, ``O_APPEND``: several processes and threads may share
it), so a driver can run an operation once, count the arrivals (:func:`arrivals`)
and then kill it at every ``(point, n)`` it really reaches.

The points (``POINTS``) are named ``<operation>.<step>``.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter

ENV = "STOREKEEPER_CRASH_AT"
LOG_ENV = "STOREKEEPER_CRASH_LOG"

#: every crash point in the code, in the order an operation reaches them
POINTS = (
    "add.copied",            # one more file of the input copied into the scratch dir
    "add.hashed",            # the input staged and hashed, its store path known, nothing locked
    "add.staged",            # the path locked, any stale leftover at its final name removed
    "add.moved",             # renamed to its final name, not yet canonical
    "add.canonicalised",     # canonical (modes, mtimes, owner), not yet optimised
    "add.canonical",         # canonical (and optimised if auto-optimise), not registered
    "register.synced",       # the file system synced, the transaction not begun
    "register.written",      # rows written, the transaction not committed
    "register.committed",    # committed, the path's lock still held
    "gc.invalidated",        # a batch's rows deleted and committed, no file unlinked
    "gc.deleted",            # one more dead path's tree removed (the batch's others not yet)
    "gc.unlinked",           # a batch's files unlinked, the next batch not begun
    "gc.junk",               # one more leftover (not a valid path) removed from the store dir
    "gc.pool",               # one more unused .links entry removed
    "fs.removed",            # one more file or dir of a tree being deleted removed
    "optimise.pooled",       # a file became a new .links entry (a second name for it)
    "optimise.linked",       # a temp hard link to the pool entry made in the store
    "optimise.renamed",      # the link renamed over a file, its dir not restored
    "optimise.restored",     # a dir's mode and mtime put back, its journal entry still there
    "build.output",          # a build output moved (from the sandbox) or rewritten to its final name
    "build.moved",           # a build's outputs in place, not registered
    "build.registered",      # a build's outputs registered
    "substitute.fetched",    # a path's narinfo checked and the path pinned, its NAR not read
    "substitute.registered",  # a substituted path registered, its referrers not yet
    "profile.linked",        # a new profile symlink made at a temp name, not renamed
    "profile.switched",      # the profile renamed to point at another generation
    "profile.deleted",       # one more generation link of a profile deleted
)

_target, _, _nth = (os.environ.get(ENV) or "").partition(":")
_arrivals = itertools.count(1)  # next() is atomic: GC unlinks in several threads
_kill_at = int(_nth) if _nth.isdigit() else 1
_log = os.environ.get(LOG_ENV) or ""


def crash_point(name: str) -> None:
    """Kill this process here if ``STOREKEEPER_CRASH_AT`` names ``name`` (see module doc)."""
    if name == _target:
        if next(_arrivals) >= _kill_at:
            os.kill(os.getpid(), 9)  # SIGKILL (the signal module is left out of cold starts)
    elif _log:
        fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, name.encode() + b"\n")
        finally:
            os.close(fd)


def arrivals(log_path: str) -> Counter[str]:
    """How often each point was reached in a run with ``STOREKEEPER_CRASH_LOG=log_path``."""
    try:
        with open(log_path, encoding="ascii") as f:
            return Counter(line.strip() for line in f if line.strip())
    except FileNotFoundError:
        return Counter()
