"""Which signatures the store trusts (spec binary-cache.md §5.3).

Trusted keys: every ``trusted-public-keys`` entry, plus the public half of each
*readable* ``secret-key-files`` file (unreadable ones are skipped, as Nix does); by
name, the first key of a name wins.  A path info is trusted if its CA field
reproduces its path (its content is checked on import), or one signature by a
trusted key verifies (``formats.signatures``).  ``require-sigs`` is the daemon's
decision (it asks ``add_nar`` to check or not).

Signing keys: what the store builds is signed with every ``secret-key-files`` key
(Nix 2.8 signs built outputs, not paths added with ``add``); there a key file that
cannot be read is an error, as in Nix, not skipped.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Protocol

from ..api import Store
from ..errors import BadArchive, InvalidPath, StoreError
from ..formats.errors import FormatError
from ..formats.pathinfo import ValidPathInfo
from ..formats.signatures import (
    PublicKey,
    SecretKey,
    has_enough_sigs,
    is_trusted,
    parse_public_keys,
    sign_info,
)
from ..formats.storepath import StoreDir, StorePath
from .settings import SettingsError, StoreSettings


class SubstituteKeys(Protocol):
    """The two settings :func:`trusted_keys` reads (also on build's SubstituteSettings)."""

    @property
    def trusted_public_keys(self) -> tuple[str, ...]: ...
    @property
    def secret_key_files(self) -> tuple[str, ...]: ...


def trusted_keys(settings: SubstituteKeys) -> dict[str, PublicKey]:
    """Every trusted key (module docstring); a malformed key is a SettingsError."""
    try:
        keys = parse_public_keys(settings.trusted_public_keys)
    except FormatError as e:
        raise SettingsError(f"trusted-public-keys: {e}") from None
    for path in settings.secret_key_files:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        try:
            pk = SecretKey.parse(text).public()
        except FormatError as e:
            raise SettingsError(f"secret-key-files '{path}': {e}") from None
        keys.setdefault(pk.name, pk)
    return keys


def untrusted_paths(store: Store, paths: Iterable[StorePath] | None,
                    keys: Mapping[str, PublicKey], sigs_needed: int = 0) -> Iterator[StorePath]:
    """The valid ``paths`` (None: all) of ``store`` (any store: local or through a daemon)
    that lack the signatures ``nix store verify --sigs-needed`` asks for
    (``has_enough_sigs``), in path order."""
    sd = store.store_dir
    infos: Iterable[ValidPathInfo]
    bulk = getattr(store, "query_all_infos", None)  # a local store reads them all at once
    if paths is None and bulk is not None:
        infos = sorted(bulk(), key=lambda i: i.path)
    else:
        infos = (_info(store, sp) for sp in sorted(store.query_all_valid_paths()
                                                   if paths is None else paths))
    for info in infos:
        try:
            ok = has_enough_sigs(sd, info, keys, sigs_needed)
        except FormatError as e:
            raise StoreError(f"path '{sd.print(info.path)}': {e}") from None
        if not ok:
            yield info.path


def _info(store: Store, sp: StorePath) -> ValidPathInfo:
    info = store.query_path_info(sp)
    if info is None:
        raise InvalidPath(f"path '{store.store_dir.print(sp)}' is not valid")
    return info


def signing_keys(settings: StoreSettings) -> list[SecretKey]:
    """The ``secret-key-files`` keys (an unreadable or malformed file is a StoreError)."""
    keys = []
    for path in settings.secret_key_files:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise StoreError(f"opening file '{path}': {e.strerror}") from None
        try:
            keys.append(SecretKey.parse(text))
        except FormatError as e:
            raise StoreError(f"secret-key-files '{path}': {e}") from None
    return keys


def signed(store_dir: StoreDir, info: ValidPathInfo, keys: list[SecretKey]) -> ValidPathInfo:
    """``info`` with one more signature per key (none it has already)."""
    if not keys:
        return info
    return info.with_(sigs=info.sigs | {sign_info(store_dir, info, k) for k in keys})


def check_trusted(store_dir: StoreDir, info: ValidPathInfo, settings: StoreSettings) -> None:
    """Raise BadArchive (Nix's words) unless ``info`` is content-addressed or signed by a
    trusted key."""
    try:
        ok = is_trusted(store_dir, info, trusted_keys(settings))
    except FormatError as e:
        raise BadArchive(f"cannot add path '{store_dir.print(info.path)}': {e}") from None
    if not ok:
        raise BadArchive(f"cannot add path '{store_dir.print(info.path)}' because it lacks "
                         "a valid signature")
