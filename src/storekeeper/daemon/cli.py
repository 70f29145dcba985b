"""Command lines that start the daemon.

* ``storekeeper daemon [--socket PATH] [--stdio] [--listen-tcp HOST:PORT] [--store URL]
  [--trusted-users U…] [--allowed-users U…] [--config FILE]`` — :func:`main_daemon`.
  With ``--stdio`` it relays to the daemon listening on the store's socket (or
  ``--socket``, or a ``daemon``/``unix://`` store URL) if there is one, else
  serves the store itself (see :func:`serve_stdio`).
* ``storekeeper-nix-daemon`` — :func:`main_nix_daemon`, a drop-in for
  ``nix-daemon``: the store, state and log dirs come from ``NIX_STORE_DIR``,
  ``NIX_STATE_DIR``, ``NIX_LOG_DIR``; settings from ``$NIX_CONF_DIR/nix.conf``
  (default ``/etc/nix``), then ``NIX_CONFIG``, then ``--option``; the socket
  is ``NIX_DAEMON_SOCKET_PATH`` or ``$NIX_STATE_DIR/daemon-socket/socket``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from typing import Mapping, Sequence

from ..build import BuildSettings
from ..config.nixconf import SettingError
from ..config.settings import unknown_names
from ..errors import StoreError
from ..formats.errors import FormatError
from ..formats.url import DaemonAddress, LocalLayout, daemon_socket_path, parse_store_url
from ..store.settings import StoreSettings, environment_settings, nix_conf_path, read_nix_conf
from .server import default_socket_path, serve, serve_stdio
from .session import error_message
from .tcp import parse_listen_address
from .trust import DaemonConfig

NIX_VERSION_LINE = "nix-daemon (Nix) 2.8.0"


def _user_list(values: list[str] | None) -> tuple[str, ...] | None:
    if values is None:
        return None
    return tuple(u for v in values for u in v.replace(",", " ").split())


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="storekeeper-daemon[%(process)d]: %(message)s")


def _report_unknown(pairs: Sequence[tuple[str, str]]) -> None:
    for name in dict.fromkeys(unknown_names(pairs)):
        print(f"warning: unknown setting '{name}'", file=sys.stderr)


def _local_layout(url: str | None, env: Mapping[str, str]) -> LocalLayout:
    address = parse_store_url(url, env)
    if isinstance(address, DaemonAddress):
        raise StoreError(f"the daemon serves a local store, but '{url}' is a daemon "
                         + (f"socket ('{address.socket_path}')" if address.socket_path else "elsewhere"))
    return address


def main_daemon(argv: Sequence[str] | None = None) -> int:
    """``storekeeper daemon``: serve a local store over a socket (or stdio)."""
    p = argparse.ArgumentParser(
        prog="storekeeper daemon",
        description="Serve a store over the Nix worker protocol (up to 1.38), for real Nix clients: "
                    "NIX_REMOTE='unix://SOCKET?root=ROOT' nix-store …")
    p.add_argument("--store", metavar="URL", help="the local store to serve (default: as for "
                   "every storekeeper command)")
    p.add_argument("--socket", metavar="PATH",
                   help="socket to listen on (default: <state dir>/daemon-socket/socket)")
    p.add_argument("--stdio", action="store_true",
                   help="serve one connection on stdin/stdout (for ssh): relayed to the daemon "
                        "on the store's socket when one is running (it sees this user), else "
                        "served here with this user's rights")
    p.add_argument("--listen-tcp", action="append", default=[], metavar="HOST:PORT",
                   help="also accept TCP connections, authenticated with keys from "
                        "'storekeeper tcp-key issue' (HOST defaults to 127.0.0.1; repeatable)")
    p.add_argument("--config", metavar="FILE", help="read trusted-users, allowed-users, "
                   "build-users-group, require-sigs, … from a nix.conf-style file "
                   "(default: $NIX_CONF_DIR/nix.conf, /etc/nix/nix.conf)")
    p.add_argument("--trusted-users", action="extend", nargs="+", metavar="USER",
                   help="users (NAME, @GROUP or *) whose connections are trusted (default: root)")
    p.add_argument("--allowed-users", action="extend", nargs="+", metavar="USER",
                   help="users who may connect at all (default: *)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log connections (-vv: more)")
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.stdio and args.listen_tcp:
            raise StoreError("--stdio and --listen-tcp do not go together")
        tcp = [parse_listen_address(a) for a in args.listen_tcp]
        address = parse_store_url(args.store, os.environ)
        if args.stdio and isinstance(address, DaemonAddress):
            if type(address) is not DaemonAddress:
                raise StoreError(f"--stdio relays to a daemon's Unix socket, not to '{args.store}'")
            layout = None
        else:
            layout = _local_layout(args.store, os.environ)
        if args.config and not os.path.isfile(args.config):
            raise StoreError(f"config file '{args.config}' does not exist")
        # Without --config, nix.conf (as Nix reads it): builds and the refusal
        # of build users must agree on build-users-group.
        pairs = read_nix_conf(args.config or nix_conf_path(os.environ))
        _report_unknown(pairs)
        config = DaemonConfig().with_settings(pairs)
        # --config FILE is the whole configuration: the store and builds obey it too.
        store_settings = StoreSettings().with_settings(pairs) if args.config else None
        build = BuildSettings().with_settings(pairs) if args.config else None
        trusted, allowed = _user_list(args.trusted_users), _user_list(args.allowed_users)
        if trusted is not None:
            config = replace(config, trusted_users=trusted)
        if allowed is not None:
            config = replace(config, allowed_users=allowed)
        if args.stdio:
            if layout is None:
                serve_stdio(None, config, address.socket_path, require_daemon=True)  # type: ignore[union-attr]
            else:
                serve_stdio(layout, config, args.socket, require_daemon=args.socket is not None,
                            settings=store_settings, build=build)
        else:
            assert layout is not None
            socket_path = args.socket or default_socket_path(layout)
            print(f"storekeeper daemon: serving '{layout.real_store_dir}' on '{socket_path}'",
                  file=sys.stderr)
            serve(layout, socket_path, config, tcp=tcp, settings=store_settings, build=build,
                  on_listening=lambda where: print(f"storekeeper daemon: listening on tcp {where}",
                                                   file=sys.stderr, flush=True))
    except (StoreError, FormatError, SettingError, OSError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)  # (an OSError: its path too)
        return 1
    return 0


def main_nix_daemon(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """``storekeeper-nix-daemon``: behaves like ``nix-daemon`` (see module docstring)."""
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="nix-daemon", add_help=True)
    p.add_argument("--stdio", action="store_true", help="serve one connection on stdin/stdout")
    p.add_argument("--daemon", action="store_true", help=argparse.SUPPRESS)  # accepted, as by Nix
    p.add_argument("--version", action="store_true", help="print the version")
    p.add_argument("--store", metavar="URL", help="the local store to serve")
    p.add_argument("--option", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="set a nix.conf setting")
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    if args.version:
        print(NIX_VERSION_LINE)
        return 0
    _setup_logging(args.verbose)
    try:
        # nix.conf, NIX_CONFIG, then --option: one list, applied by every view
        # through the settings table (config.settings).
        settings = environment_settings(env)
        settings += [(name, value) for name, value in args.option]
        _report_unknown(settings)
        config = DaemonConfig().with_settings(settings)
        store_settings = StoreSettings().with_settings(settings)
        build = BuildSettings().with_settings(settings)
        store_url = args.store or dict(settings).get("store") or "local"
        address = parse_store_url(store_url, env)
        if args.stdio and type(address) is DaemonAddress:
            serve_stdio(None, config, address.socket_path, require_daemon=True)
            return 0
        layout = _local_layout(store_url, env)
        if args.stdio:
            # As nix-daemon --stdio: a local store URL is served here; with none
            # given (Nix's default, "auto") relay to the daemon if one is listening.
            explicit = args.store or dict(settings).get("store")
            serve_stdio(layout, config, daemon_socket_path(env), relay=not explicit,
                        settings=store_settings, build=build)
        else:
            serve(layout, daemon_socket_path(env), config, settings=store_settings, build=build)
    except (StoreError, FormatError, SettingError, OSError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)  # (an OSError: its path too)
        return 1
    return 0


def nix_daemon_entry() -> None:
    """Console-script entry for ``storekeeper-nix-daemon``."""
    sys.exit(main_nix_daemon(sys.argv[1:]))


def daemon_entry() -> None:
    sys.exit(main_daemon(sys.argv[1:]))
