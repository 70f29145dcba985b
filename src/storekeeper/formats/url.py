"""Store URLs, and where a store lives: logical store dir, physical store dir, state and
log dirs (values only: nothing here opens a file; ``auto`` asks a ``socket_exists``
the caller may pass).

Two layouts exist, as in Nix:

* **custom store dir** – the logical store dir *is* the physical one
  (``local?store=/x/store&state=/x/state``, or ``NIX_STORE_DIR``): paths are
  real on this machine.
* **chroot root** – ``--store DIR`` or ``local?root=DIR``: the logical store
  dir stays ``/nix/store`` (so hashes equal real ``/nix/store`` hashes), the
  files live in ``DIR/nix/store``, state in ``DIR/nix/var/nix``.

Store URLs are spelled as Nix spells them (``local``, ``local?…``, a bare
absolute path, ``unix://SOCKET``, ``daemon``, ``auto``), plus the daemon on
another host: ``ssh-ng://[USER@]HOST[:PORT]`` (also ``ssh://``: both run
``daemon --stdio`` there) and ``tcp://HOST:PORT`` (storekeeper's own).  With nothing given
the embedded default store is a chroot root under the user's data dir; the
machine's ``/nix/store`` is only ever used when asked for (``--store /`` or
``local``).
"""

from __future__ import annotations

import os

from .errors import FormatError
from .frozen import Frozen
from .storepath import DEFAULT_STORE_DIR, StoreDir

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


class StoreUrlError(FormatError):
    """A store URL that does not parse (a usage error at the command line)."""

    exit_code = 2


# --- percent-decoding: urllib.parse's unquote and parse_qsl, spelt out (importing
# urllib.parse, and ipaddress with it, cost ~1.8 ms of every command's start) ---------

_HEX = frozenset("0123456789ABCDEFabcdef")


def _unquote_ascii(run: str) -> str:
    parts = run.split("%")
    out = bytearray(parts[0].encode("ascii"))
    for part in parts[1:]:
        if len(part) >= 2 and part[0] in _HEX and part[1] in _HEX:
            out.append(int(part[:2], 16))
            out += part[2:].encode("ascii")
        else:
            out += b"%" + part.encode("ascii")
    return out.decode("utf-8", "replace")


def unquote(s: str) -> str:
    """``urllib.parse.unquote``: ``%XX`` escapes decoded as UTF-8 (bad bytes become U+FFFD)."""
    if "%" not in s:
        return s
    # runs of ASCII are decoded, the rest kept as it is (what urllib's regex split does)
    out = []
    i, n = 0, len(s)
    while i < n:
        ascii_run = s[i] < "\x80"
        j = i + 1
        while j < n and (s[j] < "\x80") == ascii_run:
            j += 1
        out.append(_unquote_ascii(s[i:j]) if ascii_run else s[i:j])
        i = j
    return "".join(out)


def parse_qsl(query: str) -> list[tuple[str, str]]:
    """``urllib.parse.parse_qsl(query, keep_blank_values=True)``: ``&``-separated
    ``name=value`` pairs, ``+`` for a space, percent-decoded; a bare ``name`` has value ''."""
    pairs = []
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((unquote(name.replace("+", " ")), unquote(value.replace("+", " "))))
    return pairs

DEFAULT_STATE_DIR = "/nix/var/nix"
DEFAULT_LOG_DIR = "/nix/var/log/nix"


class LocalLayout(Frozen):
    """The directories of one local store."""

    __slots__ = ("store_dir", "real_store_dir", "state_dir", "log_dir", "root", "read_only")
    _fields = __slots__
    store_dir: StoreDir
    real_store_dir: str
    state_dir: str
    log_dir: str
    root: str | None  # the chroot root, if this is a chroot layout
    read_only: bool

    def __init__(self, store_dir: StoreDir, real_store_dir: str, state_dir: str, log_dir: str,
                 root: str | None = None, read_only: bool = False) -> None:
        self._init(store_dir=store_dir, real_store_dir=real_store_dir, state_dir=state_dir,
                   log_dir=log_dir, root=root, read_only=read_only)

    @property
    def db_dir(self) -> str:
        return os.path.join(self.state_dir, "db")

    @classmethod
    def chroot(cls, root: str, store_dir: str = DEFAULT_STORE_DIR,
               read_only: bool = False) -> "LocalLayout":
        root = os.path.abspath(root)
        sd = StoreDir(store_dir)

        def join(p: str) -> str:
            return os.path.normpath(root + p) if root != "/" else p

        return cls(sd, join(sd.path), join(DEFAULT_STATE_DIR), join(DEFAULT_LOG_DIR),
                   root=root, read_only=read_only)

    @classmethod
    def custom(cls, store_dir: str, state_dir: str, log_dir: str, real_store_dir: str | None = None,
               read_only: bool = False) -> "LocalLayout":
        sd = StoreDir(os.path.normpath(store_dir))
        return cls(sd, os.path.abspath(real_store_dir or sd.path), os.path.abspath(state_dir),
                   os.path.abspath(log_dir), read_only=read_only)


class DaemonAddress(Frozen):
    """A store reached through a daemon socket.

    ``store_dir`` is the *client's* logical store dir (``?store=``, else
    ``NIX_STORE_DIR``, else ``/nix/store``), as real Nix clients take it: the
    paths the daemon sends are parsed against it.
    """

    __slots__ = ("socket_path", "store_dir")
    _fields: tuple[str, ...] = __slots__
    socket_path: str
    store_dir: str

    def __init__(self, socket_path: str, store_dir: str = DEFAULT_STORE_DIR) -> None:
        self._init(socket_path=socket_path, store_dir=store_dir)


class SshAddress(DaemonAddress):
    """A daemon on another host, reached by running ``REMOTE_PROGRAM --stdio`` there over ssh
    (``socket_path`` is unused).  ``remote_store`` is passed as ``--store``."""

    __slots__ = ("host", "user", "port", "remote_program", "remote_store", "ssh_key")
    _fields = DaemonAddress._fields + __slots__
    host: str
    user: str | None
    port: int | None
    remote_program: str
    remote_store: str | None
    ssh_key: str | None

    def __init__(self, socket_path: str, store_dir: str = DEFAULT_STORE_DIR, host: str = "",
                 user: str | None = None, port: int | None = None,
                 remote_program: str = "storekeeper daemon", remote_store: str | None = None,
                 ssh_key: str | None = None) -> None:
        self._init(socket_path=socket_path, store_dir=store_dir, host=host, user=user,
                   port=port, remote_program=remote_program, remote_store=remote_store,
                   ssh_key=ssh_key)

    @property
    def url(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"ssh-ng://{who}{self.host}" + (f":{self.port}" if self.port else "")


class TcpAddress(DaemonAddress):
    """A storekeeper daemon's TCP listener; ``key_file`` holds the key it issued
    (None: the default, ``$XDG_CONFIG_HOME/storekeeper/tcp-key``).  ``socket_path`` is unused."""

    __slots__ = ("host", "port", "key_file")
    _fields = DaemonAddress._fields + __slots__
    host: str
    port: int
    key_file: str | None

    def __init__(self, socket_path: str, store_dir: str = DEFAULT_STORE_DIR, host: str = "",
                 port: int = 0, key_file: str | None = None) -> None:
        self._init(socket_path=socket_path, store_dir=store_dir, host=host, port=port,
                   key_file=key_file)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


StoreAddress = LocalLayout | DaemonAddress


def default_data_root(env: Mapping[str, str]) -> str:
    base = env.get("XDG_DATA_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"),
                                                     ".local", "share")
    return os.path.join(base, "storekeeper", "root")


def store_dir_setting(env: Mapping[str, str], params: Mapping[str, str]) -> str:
    """The logical store dir: ``?store=``, else ``NIX_STORE_DIR`` (or ``NIX_STORE``), else
    ``/nix/store``."""
    return params.get("store") or env.get("NIX_STORE_DIR") or env.get("NIX_STORE") or DEFAULT_STORE_DIR


def _env_layout(env: Mapping[str, str], params: Mapping[str, str]) -> LocalLayout:
    store = store_dir_setting(env, params)
    if "root" in params:
        return LocalLayout.chroot(params["root"], store_dir=store,
                                  read_only=_flag(params.get("read-only")))
    state = params.get("state") or env.get("NIX_STATE_DIR") or DEFAULT_STATE_DIR
    log = params.get("log") or env.get("NIX_LOG_DIR") or DEFAULT_LOG_DIR
    return LocalLayout.custom(store, state, log, real_store_dir=params.get("real"),
                              read_only=_flag(params.get("read-only")))


def _flag(v: str | None) -> bool:
    return v in ("true", "1")


def daemon_socket_path(env: Mapping[str, str]) -> str:
    if env.get("NIX_DAEMON_SOCKET_PATH"):
        return env["NIX_DAEMON_SOCKET_PATH"]
    state = env.get("NIX_STATE_DIR") or DEFAULT_STATE_DIR
    return os.path.join(state, "daemon-socket", "socket")


_LOCAL_PARAMS = {"root", "store", "state", "log", "real", "read-only"}


def parse_store_url(url: str | None, env: Mapping[str, str] | None = None,
                    socket_exists: Callable[[str], bool] = os.path.exists) -> StoreAddress:
    """Resolve ``--store URL`` (or ``NIX_REMOTE``, or nothing) to a store address."""
    env = os.environ if env is None else env
    if url is None or url == "":
        url = env.get("NIX_REMOTE") or ""
        if not url:
            if env.get("NIX_STORE_DIR") or env.get("NIX_STATE_DIR"):
                return _env_layout(env, {})
            return LocalLayout.chroot(default_data_root(env))
    scheme, _, query = url.partition("?")
    params = dict(parse_qsl(query)) if query else {}
    if scheme.startswith("/"):
        if query:
            raise StoreUrlError(f"store URL '{url}': a bare path takes no parameters")
        return LocalLayout.chroot(scheme)
    if scheme in ("local", "auto"):
        if scheme == "auto" and socket_exists(daemon_socket_path(env)):
            return parse_store_url("daemon" + (f"?{query}" if query else ""), env, socket_exists)
        unknown = set(params) - _LOCAL_PARAMS
        if unknown:
            raise StoreUrlError(f"store URL '{url}': unknown parameter '{sorted(unknown)[0]}'")
        return _env_layout(env, params)
    if scheme == "daemon" or scheme.startswith("unix://"):
        path = unquote(scheme[len("unix://"):]) if scheme.startswith("unix://") else ""
        if not path:
            path = daemon_socket_path(env)
        elif not path.startswith("/"):
            raise StoreUrlError(f"store URL '{url}': the socket path must be absolute")
        # root/real/state/log tell a Nix client where to read files itself;
        # storekeeper's client reads everything through the socket.
        return DaemonAddress(path, os.path.normpath(store_dir_setting(env, params)))
    for prefix in ("ssh-ng://", "ssh://"):
        if scheme.startswith(prefix):
            return _ssh_address(url, scheme[len(prefix):], params, env)
    if scheme.startswith("tcp://"):
        return _tcp_address(url, scheme[len("tcp://"):], params, env)
    raise StoreUrlError(f"store URL '{url}' is not supported (use a path, local?…, unix://…, daemon, "
                     f"ssh-ng://…, tcp://…)")


def _host_port(url: str, authority: str, port_required: bool) -> tuple[str, int | None]:
    host, port = authority, ""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise StoreUrlError(f"store URL '{url}': unbalanced '[' in the host")
        host, rest = authority[1:end], authority[end + 1:]
        if rest and not rest.startswith(":"):
            raise StoreUrlError(f"store URL '{url}': unexpected '{rest}' after the host")
        port = rest[1:]
    elif ":" in authority:
        host, _, port = authority.rpartition(":")
    # A host that starts with '-' would be an option to ssh; whitespace would split it.
    if not host or host.startswith("-") or any(c.isspace() or c in "/?#@" for c in host):
        raise StoreUrlError(f"store URL '{url}': '{host}' is not a host name")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreUrlError(f"store URL '{url}': '{port}' is not a port number")
        return host, int(port)
    if port_required:
        raise StoreUrlError(f"store URL '{url}': a port is needed (tcp://HOST:PORT)")
    return host, None


_SSH_PARAMS = {"remote-program", "remote-store", "ssh-key", "store"}


def _ssh_address(url: str, authority: str, params: Mapping[str, str],
                 env: Mapping[str, str]) -> SshAddress:
    unknown = set(params) - _SSH_PARAMS
    if unknown:
        raise StoreUrlError(f"store URL '{url}': parameter '{sorted(unknown)[0]}' is not supported "
                         f"(known: {', '.join(sorted(_SSH_PARAMS))})")
    user, at, rest = authority.rpartition("@")
    if at and (not user or user.startswith("-") or any(c.isspace() or c in "/:" for c in user)):
        raise StoreUrlError(f"store URL '{url}': '{user}' is not a user name")
    host, port = _host_port(url, unquote(rest), port_required=False)
    program = params.get("remote-program") or "storekeeper daemon"
    return SshAddress("", os.path.normpath(store_dir_setting(env, params)), host=host,
                      user=unquote(user) if at else None, port=port, remote_program=program,
                      remote_store=params.get("remote-store") or None,
                      ssh_key=params.get("ssh-key") or None)


def _tcp_address(url: str, authority: str, params: Mapping[str, str],
                 env: Mapping[str, str]) -> TcpAddress:
    unknown = set(params) - {"key", "store"}
    if unknown:
        raise StoreUrlError(f"store URL '{url}': unknown parameter '{sorted(unknown)[0]}' (known: key, store)")
    host, port = _host_port(url, unquote(authority), port_required=True)
    assert port is not None
    return TcpAddress("", os.path.normpath(store_dir_setting(env, params)), host=host, port=port,
                      key_file=params.get("key") or None)
