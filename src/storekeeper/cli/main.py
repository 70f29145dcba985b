"""The ``storekeeper`` command line: the parser and the dispatch.

Output follows nix-store: store paths one a line; ``--json`` where a script
would read a table.  Errors are one line on stderr (``error: …``) naming the
path or argument at fault, with no traceback and the exit code of its kind (``storekeeper.errors``: usage 2,
not found 3, refused 4, conflict 5, bad input 65, I/O 74, anything else 1).

Every command takes a local store or a daemon (``--store unix://SOCKET``,
``daemon``, ``NIX_REMOTE``) and answers the same through either; the ones
that read the store's files (``stats``, ``gc --dry-run``, ``why-alive``,
``roots`` details) ask storekeeper's daemon with its own operations, and say
in one line when the daemon is not storekeeper's.

The commands live in :mod:`storekeeper.cli.commands` (one module per group);
a parser names its command as ``"group.cmd_name"`` and only the group of the
command being run is imported, which imports the store or the client in turn.
So ``--version`` and ``--help`` import neither; and the argparse parser
(:mod:`storekeeper.cli.parser`) is imported only for command lines the hand parser
of the hot path (:mod:`storekeeper.cli.quick`: ``--version``, plain ``query``) leaves.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

from ..errors import EXIT_IO, StorekeeperError
from ..formats.errors import FormatError
from . import quick
from .common import open_query_store, open_store

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `daemon` has its own parser (it also serves as the nix-daemon drop-in)
    store_args: list[str] = []
    if len(argv) >= 2 and argv[0] == "--store":
        store_args, argv = argv[:2], argv[2:]
    elif argv and argv[0].startswith("--store="):
        store_args, argv = ["--store", argv[0].split("=", 1)[1]], argv[1:]
    if argv and argv[0] == "daemon":
        from ..daemon.cli import main_daemon
        return main_daemon(store_args + argv[1:])
    argv = store_args + argv
    # the hot path's command lines skip argparse (see storekeeper.cli.quick)
    quick_args = quick.parse(argv)
    if isinstance(quick_args, str):
        print(quick_args)
        return 0
    if quick_args is None:
        from .parser import parse_args
        args = parse_args(argv)
    else:
        args = quick_args
    group, _, name = args.func.partition(".")
    command = getattr(importlib.import_module(f"{__package__}.commands.{group}"), name)
    store = None
    try:
        if not getattr(args, "no_store", False):
            opener = open_query_store if getattr(args, "queries_only", False) else open_store
            store = opener(args.store)
        return int(command(store, args))
    except (StorekeeperError, FormatError) as e:
        # one line, even for a daemon's multi-line message; the exit code says what kind
        print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        return 1
    except OSError as e:
        where = f" '{os.fsdecode(e.filename)}':" if e.filename else ""
        hint = (" (a store on a read-only file system is queried with '?read-only=true', e.g. "
                "--store 'local?root=DIR&read-only=true')" if e.errno == errno.EROFS else "")
        print(f"error:{where} {e.strerror or e}{hint}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        return 130
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    sys.exit(main())
