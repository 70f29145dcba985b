"""The client's side of storekeeper's TCP key operations (``daemon.ops.tcp_keys``)."""

from __future__ import annotations

import os

from ..formats.tcpauth import KEY_BYTES, format_key_file
from ..formats.wire import ExtOp, WireWriter
from ..fs.atomic import write_file_atomic
from .remote import RemoteStore


def issue_tcp_key(store: RemoteStore) -> tuple[str, int, bytes]:
    """A new key for the user this connection belongs to: (user, uid, key)."""
    with store._exchange(WireWriter().u64(ExtOp.IssueTcpKey)) as r:
        user = r.string("user name", 256)
        uid = r.u64("uid")
        key = r.bytes("key", KEY_BYTES)
    return user, uid, key


def revoke_tcp_key(store: RemoteStore) -> bool:
    with store._exchange(WireWriter().u64(ExtOp.RevokeTcpKey)) as r:
        return r.boolean("revoked")


def save_tcp_key(path: str, user: str, key: bytes, comment: str = "") -> None:
    """Write a key file readable by its owner only (its directory made 0700 if new)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    write_file_atomic(path, format_key_file(user, key, comment), 0o600)
