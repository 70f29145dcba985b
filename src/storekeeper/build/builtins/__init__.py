"""Nix's builtin builders (``builder = "builtin:NAME"``): ``buildenv`` (nix-env's
user environments), ``fetchurl`` (``<nix/fetchurl.nix>``) and ``unpack-channel``
(``nix-channel --update``).

A builtin runs as a child process, ``python -I -m storekeeper.build.builtins
NAME``, spawned by the builder exactly where a derivation's own builder program
would be: same environment (the derivation's variables, input rewrites
applied), same build directory, same build user, same confinement (seccomp
trampoline, namespaces when the sandbox is on), same log pipe, timeouts and
kill on cancel.  It is *not* called inside the daemon process, because there it
would run as root, with the daemon's open database and sockets: a crafted
``derivations`` or ``url`` attribute could make root write through a symlink a
build user planted in the store or the build directory, and a hung download
would hang a daemon thread.  As a child, the worst it can do is what the build
user could do with a builder of its own, and it fails by exit status and log
lines like any builder (its output then goes through the same output checks:
fixed-output hash, references, canonicalisation).  ``-I`` keeps the build
directory (the child's working directory, writable by the build user) and
``PYTHON*`` variables off the import path.

Each builtin reads its attributes from the environment (:class:`Attrs`), writes
only inside ``$out`` and reports failure as :class:`BuiltinError`, printed as
Nix prints it (``common.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from . import buildenv, fetchurl, unpackchannel
from .common import Attrs, BuiltinError, error_text, shown

#: name (after ``builtin:``) -> the builder
BUILTINS: dict[str, Callable[[Attrs], None]] = {
    "buildenv": buildenv.run,
    "fetchurl": fetchurl.run,
    "unpack-channel": unpackchannel.run,
}
MODULE = __name__


def command(name: str) -> list[str]:
    """The program (argv) that runs builtin ``name`` as a child process."""
    return [sys.executable, "-I", "-m", MODULE, name]


def run(name: str, env: Mapping[str, str]) -> int:
    """Run builtin ``name`` in this process: 0, or 1 after printing the error to stderr."""
    try:
        builder = BUILTINS.get(name)
        if builder is None:
            raise BuiltinError(f"unsupported builtin builder '{shown(name)}'")
        builder(Attrs(env))
        return 0
    except BuiltinError as e:
        message = str(e)
    except OSError as e:
        # (Nix's system errors: "<what>: <strerror>")
        message = f"'{shown(e.filename)}': {e.strerror}" if e.filename else str(e)
    sys.stderr.write(error_text(message) + "\n")
    sys.stderr.flush()
    return 1


__all__ = ["BUILTINS", "Attrs", "BuiltinError", "command", "run"]
