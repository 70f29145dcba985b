"""The retention policies' plan as ``gc --dry-run`` and ``roots`` show it."""

from __future__ import annotations

import sys


def print_policy_plan(local, with_bytes: bool = True) -> None:
    """What each policy would drop now, and the bytes that frees (stderr)."""
    if not local.settings.policies_active():
        return  # (without importing the policies' modules: `roots` starts faster)
    from ...store.policy import plan
    p = plan(local, with_bytes=with_bytes)
    for d in p.drops:
        print(f"policy {d.policy} would drop {d.link} -> {d.target} ({d.detail})", file=sys.stderr)
    for name, b in p.freed.items():
        print(f"policy {name}: would free {b} more bytes ({b / 2**20:.2f} MiB; its roots' "
              "exclusive bytes, on top of what is dead now)", file=sys.stderr)
    if p.keep_recent:
        print(f"policy keep-recently-used keeps {len(p.keep_recent)} paths", file=sys.stderr)
    for w in p.warnings:
        print(f"warning: {w}", file=sys.stderr)
