"""storekeeper's own operations for TCP keys (not Nix's: numbers from 1100 on).

* ``IssueTcpKey`` (1100), no fields → string user, u64 uid, string key (32 bytes).
* ``RevokeTcpKey`` (1101), no fields → u64 1 if a key was revoked, else 0.

Both act for the connection's peer only, and only when the kernel vouches for
it (a Unix-socket peer, or ``--stdio`` serving the store itself): a key cannot
mint or revoke keys, so a stolen key cannot lock its owner out, and nobody acts
for another user.  See ``store.tcpkeys`` for where the keys live.
"""

from __future__ import annotations

import logging

from ...formats.wire import ExtOp
from ...store.tcpkeys import TcpKeys
from ..errors import OpError
from ..registry import op
from ..session import Session

log = logging.getLogger("storekeeper.daemon")

def _local_peer(s: Session, what: str):
    peer = s.peer
    if peer is None or not peer.kernel_attested:
        raise OpError(f"{what} needs a connection to the daemon's Unix socket on its own host "
                      f"(the kernel vouches for who you are there)")
    return peer


@op(ExtOp.IssueTcpKey)
def issue_tcp_key(s: Session) -> None:
    s.start_work()
    peer = _local_peer(s, "issuing a TCP key")
    key = TcpKeys(s.store.state_dir).issue(peer.uid, peer.user)
    log.info("issued a TCP key to %s", peer.describe())
    s.stop_work()
    s.w.string(peer.user).u64(peer.uid).string(key)


@op(ExtOp.RevokeTcpKey)
def revoke_tcp_key(s: Session) -> None:
    s.start_work()
    peer = _local_peer(s, "revoking a TCP key")
    revoked = TcpKeys(s.store.state_dir).revoke(peer.uid)
    if revoked:
        log.info("revoked the TCP key of %s", peer.describe())
    s.stop_work()
    s.w.u64(1 if revoked else 0)

