"""What the CLI's commands share: opening a store, naming paths, one-line errors.

Heavy modules (the store, the client) are imported when a command needs them, so
``storekeeper --help`` and ``--version`` start fast.
"""

from __future__ import annotations

import os
import sys

from ..errors import InvalidPath, UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import cast

    from ..client.remote import RemoteStore
    from ..formats.storepath import StorePath
    from ..store.local import LocalStore
    from ..store.reader import StoreReader

    #: what a command is given: a local store or a daemon's
    Store = LocalStore | RemoteStore
    #: what a queries-only command is given (``queries_only=True`` in its parser)
    QueryStore = StoreReader | RemoteStore
else:
    def cast(_type: object, value: object) -> object:  # typing.cast, without typing
        return value


def open_store(url: str | None) -> Store:
    """The store a URL names (``NIX_REMOTE`` when None): local, or a daemon's."""
    return cast("Store", _open(url, False))


def open_query_store(url: str | None) -> Store | QueryStore:
    """:func:`open_store` for a command that only queries (``queries_only=True`` in its
    parser): a local store is opened as a :class:`StoreReader` (the same store, opened
    the same way), which spares the import of the collector, the optimiser and the NAR
    and derivation code."""
    return _open(url, True)


def _open(url: str | None, queries_only: bool) -> Store | QueryStore:
    from ..formats.url import DaemonAddress, LocalLayout, parse_store_url
    from ..store.settings import StoreSettings
    address = parse_store_url(url)
    if isinstance(address, DaemonAddress):
        from ..client import open_remote
        return open_remote(address, log=lambda m: print(m, file=sys.stderr))
    assert isinstance(address, LocalLayout)
    if queries_only:
        from ..store.reader import StoreReader
        return StoreReader(address, settings=StoreSettings.from_nix_conf())
    from ..store.local import LocalStore
    return LocalStore(address, settings=StoreSettings.from_nix_conf())


def is_local(store: Store | QueryStore) -> bool:
    """A store on this machine's files (checked without importing the client)."""
    from ..store.reader import StoreReader
    return isinstance(store, StoreReader)


def local_of(store: Store) -> LocalStore | None:
    """The local store a command was given, or None for a daemon's."""
    return cast("LocalStore", store) if is_local(store) else None


def daemon_of(store: Store | QueryStore) -> RemoteStore | None:
    """The daemon's store a command was given, or None for a local one."""
    return None if is_local(store) else cast("RemoteStore", store)


def needs_local(store: Store, what: str) -> LocalStore:
    local = local_of(store)
    if local is None:
        raise UsageError(f"{what} needs a local store (it reads the store's files and database "
                         f"directly), not the daemon at '{cast('RemoteStore', store).socket_path}'")
    return local


def resolve_path(store: Store, arg: str) -> StorePath:
    """A store path from an argument: a store path, a path inside one, or a link to one."""
    sd = store.store_dir
    path = os.path.abspath(arg) if not arg.startswith("/") else os.path.normpath(arg)
    for _ in range(40):
        if sd.is_in_store(path):
            sp, _rest = sd.split(path)
            return sp
        if not os.path.islink(path):
            break
        target = os.readlink(path)
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    raise UsageError(f"path '{arg}' is not in the Nix store")


def valid(store: Store, arg: str) -> StorePath:
    sp = resolve_path(store, arg)
    if not store.is_valid(sp):
        raise InvalidPath(f"path '{store.print_path(sp)}' is not valid")
    return sp


def print_paths(store: Store, paths: Iterable[StorePath]) -> None:
    out = sys.stdout
    for p in paths:
        out.write(store.print_path(p) + "\n")


def age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{int(seconds // n)}{unit}"
    return f"{int(seconds)}s"
