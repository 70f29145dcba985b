"""``storekeeper serve``: the store as a read-only HTTP binary cache
(:mod:`storekeeper.daemon.httpcache`)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ...daemon.httpcache import CacheServer, parse_listen
from ...errors import UsageError
from ...formats.signatures import SecretKey

if TYPE_CHECKING:
    from ..common import Store


def cmd_serve(store: Store, args: argparse.Namespace) -> int:
    if not hasattr(store, "layout"):
        raise UsageError("storekeeper serve serves a local store (give --store DIR or a "
                         "local?… URL, not a daemon)")
    key = None
    if args.sign_key:
        try:
            with open(args.sign_key) as f:
                key = SecretKey.parse(f.read())
        except OSError as e:
            raise UsageError(f"cannot read secret key file '{args.sign_key}': {e.strerror}") from None
    host, port = parse_listen(args.listen)
    try:
        server = CacheServer((host, port), store, key, args.compression, args.priority)
    except OSError as e:
        raise UsageError(f"cannot listen on {args.listen}: {e.strerror}") from None
    print(f"storekeeper serve: serving '{store.store_dir.path}' on http://{host}:{server.server_port}",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
