"""storekeeper's client: the store API over a daemon (Nix worker protocol 1.38, 1.34 against Nix 2.8).

Layering: beside :mod:`storekeeper.daemon`; imports ``store`` and ``formats``
only.  :func:`open_remote` turns a :class:`~storekeeper.formats.url.DaemonAddress`
(a Unix socket, ``ssh-ng://`` or ``tcp://``) into a connected :class:`RemoteStore`.
"""

from ..formats.url import DaemonAddress
from .connection import client_store_dir
from .errors import ConnectionLost, DaemonError
from .remote import RemoteStore
from .transports import transport_for


def open_remote(address: DaemonAddress, **kw) -> RemoteStore:
    """Connect to the daemon at ``address`` with the client store dir it names."""
    return RemoteStore(transport_for(address), address.store_dir, **kw)


__all__ = ["ConnectionLost", "DaemonError", "RemoteStore", "client_store_dir", "open_remote"]
