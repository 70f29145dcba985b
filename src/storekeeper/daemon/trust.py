"""Who is on the other end of a daemon connection, and what they may do (spec §11).

A connection's peer is identified by ``SO_PEERCRED`` (pid, uid, gid), never by
anything the client says.  The user name is ``getpwuid(uid)`` (the decimal uid
if there is none) and the group name ``getgrgid(gid)``.  A TCP peer has no
kernel credentials: it proves it holds the key the daemon issued to a local
user (``daemon.tcp``) and then has exactly that user's uid, primary gid and
names, with ``pid`` 0 (unknown); ``via`` says which transport vouched.

A pattern list (``trusted-users``, ``allowed-users``) matches a peer when it
holds ``*``, the peer's user name, or ``@group`` where the group is the peer's
primary group or lists the user as a member.  A peer is *trusted* when it
matches ``trusted-users``; it may connect at all when it is trusted or matches
``allowed-users``, and is not in ``build-users-group`` (build users must never
reach the daemon).
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from ..config import settings as settings_table

# nix.conf syntax; re-exported for the daemon's users.
from ..store.settings import apply_settings, parse_nix_conf, read_nix_conf

__all__ = ["DaemonConfig", "PeerInfo", "matches", "parse_nix_conf", "read_nix_conf"]

_d = settings_table.default_of


@dataclass(frozen=True)
class PeerInfo:
    """The credentials of a connected process, as the kernel reports them."""

    pid: int
    uid: int
    gid: int
    user: str
    group: str | None
    #: how the identity was established: "unix" (SO_PEERCRED), "tcp" (a key the daemon
    #: issued), "stdio" (``daemon --stdio`` serving the store itself: the invoking user)
    via: str = "unix"
    #: the remote address of a TCP peer ("host:port"); None for local peers
    host: str | None = None

    @classmethod
    def from_ids(cls, pid: int, uid: int, gid: int, via: str = "unix",
                 host: str | None = None) -> "PeerInfo":
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        try:
            group: str | None = grp.getgrgid(gid).gr_name
        except KeyError:
            group = None
        return cls(pid, uid, gid, user, group, via, host)

    @classmethod
    def of_socket(cls, sock: socket.socket) -> "PeerInfo":
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls.from_ids(pid, uid, gid)

    @property
    def kernel_attested(self) -> bool:
        """The kernel vouches for this identity (a local peer, not a key)."""
        return self.via in ("unix", "stdio")

    def describe(self) -> str:
        if self.host is not None:
            return f"user '{self.user}' (uid {self.uid}, {self.via} from {self.host})"
        return f"user '{self.user}' (uid {self.uid}, pid {self.pid})"


def matches(patterns: Iterable[str], peer: PeerInfo) -> bool:
    for pat in patterns:
        if pat == "*" or pat == peer.user:
            return True
        if pat.startswith("@") and len(pat) > 1:
            if pat[1:] == peer.group:
                return True
            try:
                if peer.user in grp.getgrnam(pat[1:]).gr_mem:
                    return True
            except KeyError:
                pass
    return False


@dataclass(frozen=True)
class DaemonConfig:
    """The daemon's settings that a client cannot change (nix.conf names in comments)."""

    trusted_users: tuple[str, ...] = field(default_factory=_d("trusted-users"))
    allowed_users: tuple[str, ...] = field(default_factory=_d("allowed-users"))
    # Builds run as members of this group, and connections from it are
    # refused.  None: Nix's default (``nixbld`` when running as root).
    build_users_group: str | None = None
    substituters: tuple[str, ...] = field(default_factory=_d("substituters"))
    trusted_substituters: tuple[str, ...] = field(default_factory=_d("trusted-substituters"))
    # When false, untrusted clients may import unsigned, non-content-addressed
    # paths (nix.conf ``require-sigs = false``).
    require_sigs: bool = field(default_factory=_d("require-sigs"))
    max_substitution_jobs: int = field(default_factory=_d("max-substitution-jobs"))
    # Limits on what users may make the daemon do (0: none); see config.settings.
    max_connections: int = field(default_factory=_d("max-connections"))
    max_connections_per_user: int = field(default_factory=_d("max-connections-per-user"))
    idle_timeout: int = field(default_factory=_d("idle-timeout"))
    auth_timeout: int = field(default_factory=_d("auth-timeout"))
    max_request_size: int = field(default_factory=_d("max-request-size"))
    #: reported to clients at the handshake; clients show it (``nix store ping``)
    nix_version: str = "2.8.0"

    @property
    def effective_build_users_group(self) -> str:
        """The group builds run as ("" = none: builds run as the daemon's user)."""
        if self.build_users_group is None:
            return "nixbld" if os.geteuid() == 0 else ""
        return self.build_users_group

    def is_trusted(self, peer: PeerInfo) -> bool:
        return matches(self.trusted_users, peer)

    def refusal(self, peer: PeerInfo) -> str | None:
        """Why ``peer`` may not connect, or None if it may."""
        group = self.effective_build_users_group
        if group and peer.group == group:
            return f"{peer.describe()} is in the build users group '{group}'"
        if not self.is_trusted(peer) and not matches(self.allowed_users, peer):
            return f"{peer.describe()} is not in allowed-users"
        return None

    def _replace(self, **changes: Any) -> DaemonConfig:
        """``dataclasses.replace``: what :func:`~storekeeper.store.settings.apply_settings` calls."""
        return replace(self, **changes)

    def with_settings(self, settings: Mapping[str, str] | Iterable[tuple[str, str]]) -> "DaemonConfig":
        """Apply nix.conf-style settings in order through the settings table (names the
        daemon does not use are ignored); ``extra-NAME`` appends to ``NAME``."""
        return apply_settings(self, settings_table.DAEMON, settings)

    def value_of(self, name: str, build: "object | None" = None):
        """The daemon's own value of setting ``name`` (a daemon or, given ``build``,
        a build setting); what untrusted clients are measured against."""
        setting = settings_table.SETTINGS[name]
        for view in (self, build):
            if view is not None and hasattr(view, setting.attr):
                return getattr(view, setting.attr)
        return setting.default_value()

    @classmethod
    def from_nix_conf(cls, path: str, base: "DaemonConfig | None" = None) -> "DaemonConfig":
        """Settings from a nix.conf file; a missing file means the defaults."""
        return (base or cls()).with_settings(read_nix_conf(path))
