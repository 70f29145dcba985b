"""systemd readiness notification (``Type=notify``), without libsystemd.

One datagram to ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract
socket); nothing happens when the variable is unset, and a failure to notify
never stops the daemon.
"""

from __future__ import annotations

import os
import socket


def sd_notify(state: str, env: dict[str, str] | None = None) -> bool:
    target = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):
        target = "\0" + target[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), target)
        return True
    except OSError:
        return False
