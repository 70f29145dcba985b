"""``storekeeper tcp-key issue|revoke``: your key for a daemon's TCP listener.

The daemon issues the key to whoever the kernel says is on its Unix socket,
so this runs on the daemon's host; the file is then copied (mode 0600) to
the hosts that connect with ``tcp://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import socket
import sys

from ..common import UsageError


def cmd_tcp_key(store, args: argparse.Namespace) -> int:
    from ...client.keys import issue_tcp_key, revoke_tcp_key, save_tcp_key
    from ...client.remote import RemoteStore
    from ...client.transports import default_tcp_key_path
    if not isinstance(store, RemoteStore):
        raise UsageError("tcp-key asks the daemon, which keeps the keys: use --store daemon "
                         "or --store unix://SOCKET on the daemon's host")
    if args.action == "revoke":
        revoked = revoke_tcp_key(store)
        print("revoked your TCP key" if revoked else "you had no TCP key", file=sys.stderr)
        return 0
    user, uid, key = issue_tcp_key(store)
    path = args.output or default_tcp_key_path()
    save_tcp_key(path, user, key, f"storekeeper TCP key of {user} (uid {uid}) on {socket.gethostname()}"
                                  f"\nkeep it private (mode 0600); 'storekeeper tcp-key issue' "
                                  f"again replaces it")
    print(path)
    print(f"issued a TCP key for user '{user}' (uid {uid}), replacing any earlier one; copy "
          f"'{path}' to ~/.config/storekeeper/tcp-key (mode 0600) on the hosts you connect from",
          file=sys.stderr)
    return 0
