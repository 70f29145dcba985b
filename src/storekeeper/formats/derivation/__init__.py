"""Store derivations: the ATerm ``.drv`` format, hashDerivationModulo, output paths.

Spec §3.  Pure: files are never read here; whoever needs an input derivation
passes ``read_drv(drv_path) -> Derivation``.

String representation
    A ``.drv`` is a byte string and its strings may hold any byte (Nix strings
    are byte strings; env values are often not UTF-8).  Every string in the
    model is the *unescaped* byte string decoded as UTF-8 with
    ``surrogateescape``, and is encoded back the same way when printed.  That
    mapping is a bijection between all byte strings and the strs it produces,
    so ``print_derivation(parse_derivation(b)) == b`` holds for every ``b`` the
    parser accepts.  Strs holding surrogates outside U+DC80..U+DCFF cannot be
    printed (FormatError).

Canonical form
    The parser accepts exactly the texts that Nix 2.8's printer produces, so
    that parse → print is the identity.  Nix's own parser is laxer; every text
    it also accepts but we reject is one Nix would print differently, so no
    ``.drv`` written by Nix is affected.  Rejected here, accepted by Nix 2.8:
    trailing bytes after ``)``; env/outputs/input lists out of order or with
    duplicates (Nix keeps the first output, the last env entry); escapes other
    than ``\\" \\\\ \\n \\r \\t`` and raw LF/CR/TAB in escaped strings; any
    backslash in the fields Nix writes unescaped (output tuples, input paths and
    output names, input sources, platform); a fixed-output hash that is not
    lower-case base16; a hash field given without an algorithm (Nix ignores it).
"""

from __future__ import annotations

from .aterm import parse_derivation, print_derivation
from .hashing import (
    check_derivation_outputs,
    derivation_output_paths,
    derivation_store_path,
    fill_output_paths,
    fixed_output,
    hash_derivation_modulo,
)
from .model import (
    Derivation,
    DerivationOutput,
    DerivationParseError,
    DerivationType,
    OutputKind,
    derivation_type,
)

__all__ = [
    "DerivationParseError",
    "OutputKind",
    "DerivationType",
    "DerivationOutput",
    "Derivation",
    "parse_derivation",
    "print_derivation",
    "derivation_type",
    "hash_derivation_modulo",
    "derivation_output_paths",
    "fill_output_paths",
    "fixed_output",
    "derivation_store_path",
    "check_derivation_outputs",
]
