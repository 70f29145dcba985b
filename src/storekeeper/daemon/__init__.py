"""The store daemon: the Nix worker protocol (1.32 .. 1.38) over a Unix socket, TCP or stdio.

Layering: imports ``store`` and ``formats`` only.  Entry points:
:func:`serve` (Unix socket and optional TCP listeners, a forked process per
connection, kept for the same user's next ones: :mod:`.workers`), :func:`serve_stdio` (one connection on stdin/stdout: relayed to
the running daemon, else served as the invoking user) and :class:`Session`
(one connection on any pair of streams, used by all and by tests).
"""

from .errors import NotSupported, OpError
from .server import default_socket_path, serve, serve_stdio
from .session import ClientOptions, Session
from .trust import DaemonConfig, PeerInfo, parse_nix_conf, read_nix_conf

__all__ = [
    "ClientOptions", "DaemonConfig", "NotSupported", "OpError", "PeerInfo", "Session",
    "default_socket_path", "parse_nix_conf", "read_nix_conf", "serve", "serve_stdio",
]
