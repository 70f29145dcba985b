"""``why-alive PATH``: the shortest chain from a GC root to a path.

Its own module, with no import beyond what it runs: on a small store the command
is mostly start-up (issue 20)."""

from __future__ import annotations

from ..common import daemon_of, local_of, valid

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    import argparse

    from ..common import Store


def cmd_why_alive(store: Store, args: argparse.Namespace) -> int:
    sp = valid(store, args.path)
    local = local_of(store)
    if local is not None:
        from ...store.gc.chain import why_alive
        chain = why_alive(local, sp)
    else:
        daemon = daemon_of(store)
        assert daemon is not None
        chain = daemon.why_alive(sp)
    if chain is None:
        print(f"{store.print_path(sp)} is not reachable from any root: the next GC deletes it")
        return 1
    (root_label, first), *rest = chain
    print(f"{root_label}")
    print(f"  -> {first}")
    for kind, path in rest:
        print(f"  -> {path}   [{kind}]")
    return 0
