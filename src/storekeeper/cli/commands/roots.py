"""GC roots: ``roots`` (every root, read-only) and the per-user roots commands
``add-root``, ``remove-root``, ``sync-roots``, with the client's part of ``gc`` (see
:mod:`storekeeper.client.rootsync`)."""

from __future__ import annotations

import sys
import time

from ..common import UsageError, age, daemon_of, is_local, open_store, resolve_path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    import argparse

    from ...store.gc.rootlist import RootInfo
    from ..common import Store

#: hidden ``--skip-step`` values: a test hook that shows what each step is for
_STEPS = ("clean", "runtime", "sync")


def _api(store):
    return user_roots_api(store)


def _say(lines) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def cmd_add_root(store, args: argparse.Namespace) -> int:
    from ...client.rootsync import add_root
    sp = resolve_path(store, args.path)
    print(add_root(store, _api(store), args.link, sp))
    return 0


def cmd_remove_root(store, args: argparse.Namespace) -> int:
    from ...client.rootsync import remove_root
    removed = remove_root(store, _api(store), args.link)
    if not removed:
        print(f"note: no root of yours was registered as '{args.link}'", file=sys.stderr)
    for name in removed:
        print(f"unregistered '{name}'", file=sys.stderr)
    return 0


def sync_for(store, skip=()) -> None:
    """Steps 1–3 (:func:`~storekeeper.client.rootsync.sync_roots`), told on stderr."""
    from ...client.rootsync import sync_roots
    _say(sync_roots(store, _api(store), skip=skip).lines())


def cmd_sync_roots(store, args: argparse.Namespace) -> int:
    sync_for(store, args.skip_step or ())
    return 0


def before_gc(url: str | None, skip=()) -> None:
    """The client's steps before a daemon collects, on a connection of their own (a
    nix-daemon closes the connection on our operations; the collection still runs)."""
    from ...client.userroots import NotStorekeeperDaemon
    store = open_store(url)
    try:
        sync_for(store, skip)
    except NotStorekeeperDaemon as e:
        print(f"note: {e}; collecting with the daemon's own roots only", file=sys.stderr)
    finally:
        store.close()


def cmd_roots(store: Store, args: argparse.Namespace) -> int:
    if not is_local(store):
        return remote_roots(store, args.store, args.json)
    if args.no_size:  # (without the reference graph's modules: cold start)
        from ...store.gc.rootlist import list_roots
        infos = list_roots(store)
    else:
        from ...store.gc.inspect import list_roots as with_sizes
        infos = with_sizes(store)
    print_root_infos(infos, args.json)
    if not args.json:
        from .policy import print_policy_plan
        print_policy_plan(store, with_bytes=False)
    return 0


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC"


def print_root_infos(infos: list[RootInfo], as_json: bool) -> None:
    if as_json:
        import json  # (only here: the plain listing starts without it)
        json.dump([r.to_json() for r in infos], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    for r in infos:
        shown_age = "-" if r.age_seconds is None else age(r.age_seconds)
        flag = "" if r.valid or not r.target else "  (invalid target)"
        detail = r.detail()
        size = "-" if r.closure_size is None else f"{r.closure_size / 2**20:.2f}"
        print(f"{r.kind:9} {r.owner or '-':10} {shown_age:>6} {size:>10} MiB  "
              f"{r.link} -> {r.target or '?'}{flag}" + (f"  [{detail}]" if detail else ""))


def remote_roots(store, url: str | None, as_json: bool) -> int:
    """Through storekeeper's daemon: every root with its kind and details (ListRoots);
    through another daemon: links and targets (FindRoots)."""
    from ...client.userroots import NotStorekeeperDaemon
    from ...store.gc.rootlist import RootInfo
    try:
        overview = store.list_roots()
    except NotStorekeeperDaemon:
        print("note: not storekeeper's daemon (the real nix-daemon?): roots shown as links and "
              "targets only, without kinds, owners and closure sizes", file=sys.stderr)
        other = daemon_of(open_store(url))  # (it was a daemon a moment ago)
        if other is None:
            raise UsageError(f"store '{url}' is no longer a daemon's") from None
        try:
            pairs = [(link, other.print_path(sp)) for link, sp in other.find_roots()]
        finally:
            other.close()
        if as_json:
            import json
            json.dump([{"link": link, "target": target} for link, target in pairs], sys.stdout,
                      indent=1)
            sys.stdout.write("\n")
        else:
            for link, target in pairs:
                print(f"{link} -> {target}")
        return 0
    print_root_infos([RootInfo.from_json(o) for o in overview["roots"]], as_json)
    return 0


def user_roots_api(store):
    """The calling user's roots: through storekeeper's daemon, or on a local store directly."""
    from ...client.userroots import RemoteUserRoots
    from ...store.gc.inspect import LocalUserRoots
    return LocalUserRoots(store) if is_local(store) else RemoteUserRoots(store)
