"""A test hook: the process SIGKILLs itself at a named step.

``STOREKEEPER_CRASH_AT=<point>`` (or ``<point>:<n>``, the n-th time the point is
reached, default the first) makes :func:`crash_point` kill the process there,
with no clean-up of any kind: what a power cut or the OOM killer leaves behind.
Tests use it to check that every step of add, register, GC, optimise and build
registration leaves a store that both our verify and Nix's accept.  Unset (the
normal case), a crash point costs one comparison.

The points (``POINTS``) are named ``<operation>.<step>``.
"""

from __future__ import annotations

import os

ENV = "STOREKEEPER_CRASH_AT"

#: every crash point in the code, in the order an operation reaches them
POINTS = (
    "add.staged",            # the new content is complete in a scratch dir
    "add.moved",             # renamed to its final name, not yet canonical
    "add.canonical",         # canonical (and optimised if auto-optimise), not registered
    "register.synced",       # the file system synced, the transaction not begun
    "register.written",      # rows written, the transaction not committed
    "register.committed",    # committed, the path's lock still held
    "gc.invalidated",        # a batch's rows deleted and committed, no file unlinked
    "gc.unlinked",           # a batch's files unlinked, the next batch not begun
    "optimise.linked",       # a temp hard link to the pool entry made in the store
    "optimise.renamed",      # the link renamed over a file, its dir not restored
    "build.moved",           # a build's outputs in place, not registered
    "build.registered",      # a build's outputs registered
)

_target, _, _nth = (os.environ.get(ENV) or "").partition(":")
_left = int(_nth) if _nth.isdigit() else 1


def crash_point(name: str) -> None:
    """Kill this process here if ``STOREKEEPER_CRASH_AT`` names ``name`` (see module doc)."""
    global _left
    if name != _target:
        return
    _left -= 1
    if _left <= 0:
        os.kill(os.getpid(), 9)  # SIGKILL (the signal module is left out of cold starts)
