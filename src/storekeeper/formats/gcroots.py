"""Names in the roots directories (pure)."""

from __future__ import annotations

import os

from .hashes import Hash

#: what a link the asker may not see is shown as (FindRoots, ``storekeeper roots``)
CENSORED = "{censored}"


def indirect_root_name(link: str) -> str:
    """``gcroots/auto/<name>`` for a link: nix32 of SHA-1 of the absolute link path."""
    return Hash.of("sha1", os.fsencode(link)).nix32  # (its bytes, as Nix: any file name)
