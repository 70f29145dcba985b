"""The build layer: derivations realised on a local store (store ← build ← daemon).

Invariants of the layer (each kept, and said in full, by the module named):

* builds run only on a store whose store dir is real and only with the
  confinement the settings ask for (:mod:`.settings`, :mod:`.confine`);
* every path is pinned before its validity is looked at (:mod:`.goals`);
* one builder per output path, store-wide, under its ``.lock``; no builder
  outlives its request (:mod:`.scheduler`);
* a builder runs in a fresh private build dir, as a build user when there are
  some, and nothing of it runs once it is reaped (:mod:`.process`,
  :mod:`.users`);
* outputs are inspected only when nothing can change them and registered all
  in one transaction or not at all (:mod:`.outputs`);
* outputs that are already valid are never written to (:mod:`.rewrite`);
* build logs are where Nix keeps them (:mod:`.logs`); ``@nix`` lines of a
  builder are messages, not log lines (:mod:`.jsonlog`);
* builtin builders (``builtin:buildenv``, ``builtin:fetchurl``) run as the
  builder child process, never in the daemon (:mod:`.builtins`).

Nothing in ``store`` imports this package.
"""

from .missing import query_missing
from .results import BuildError, BuildMode, BuildResult, BuildStatus
from .scheduler import Builder
from .settings import BuildSettings

__all__ = ["Builder", "BuildError", "BuildMode", "BuildResult", "BuildSettings", "BuildStatus",
           "query_missing"]
