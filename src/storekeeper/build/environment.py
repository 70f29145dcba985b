"""The builder's environment: Nix's variables for one derivation in one build dir.

:func:`builder_environment` is a function of its arguments only (the derivation,
the build dir, the store dir, ``cores`` and the scratch rewrites), apart from
writing the ``passAsFile`` files into the build dir and reading the daemon's own
environment for a fixed output's ``impureEnvVars``.

Invariants: the derivation's variables come after Nix's fixed ones (``PATH``,
``HOME``, ``NIX_STORE``, ``NIX_BUILD_CORES``) and before the build dir ones, so
they can override the former but not the latter; every value naming an output
that is built at a scratch path names the scratch path (:mod:`.rewrite`); no
variable the builder gets can contain a NUL (or ``=`` in its name).
"""

from __future__ import annotations

import os
from typing import Mapping

from ..formats.derivation import Derivation, DerivationType, derivation_type
from .results import BuildStatus, Failure
from .rewrite import rewrite_str


def builder_environment(drv: Derivation, tmpdir: str, *, store_dir: str, cores: int,
                        rewrites: Mapping[str, str]) -> dict[str, str]:
    """Nix's builder environment (the derivation's variables come first, then these).

    ``rewrites`` maps hash parts of outputs to those of their scratch paths
    (:func:`~storekeeper.build.rewrite.input_rewrites`).
    """
    env: dict[str, str] = {
        "PATH": "/path-not-set",
        "HOME": "/homeless-shelter",
        "NIX_STORE": store_dir,
        "NIX_BUILD_CORES": str(cores),
    }
    if "__json" in drv.env:
        raise Failure(BuildStatus.MISC_FAILURE, "structured attributes (__structuredAttrs) "
                      "are not supported by storekeeper's builder")
    pass_as_file = set(drv.env.get("passAsFile", "").split())
    n = 0
    for key, value in drv.env.items():
        value = rewrite_str(value, rewrites)
        if key in pass_as_file:
            fn = f".attr-{n}"
            n += 1
            path = os.path.join(tmpdir, fn)
            with open(path, "wb") as f:
                f.write(value.encode("utf-8", "surrogateescape"))
            env[key + "Path"] = path
        else:
            env[key] = value
    for var in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
        env[var] = tmpdir
    if derivation_type(drv) is DerivationType.CA_FIXED:
        # Fixed outputs are checked by hash, so they may see the network
        # settings of the daemon (impureEnvVars).
        for var in drv.env.get("impureEnvVars", "").split():
            env[var] = os.environ.get(var, "")
    env["NIX_LOG_FD"] = "2"
    env["TERM"] = "xterm-256color"
    for key in list(env):
        if "\0" in key or "=" in key or "\0" in env[key]:
            raise Failure(BuildStatus.MISC_FAILURE,
                          f"environment variable '{key}' cannot be passed to the builder")
    return env
