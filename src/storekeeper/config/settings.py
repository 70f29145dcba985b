"""The one table of settings: every nix.conf name storekeeper knows, in one place.

Each :class:`Setting` says:

* ``name`` and ``aliases`` (Nix's old names, e.g. ``build-max-jobs``);
* ``parse``: text -> value, raising :class:`SettingError` with a one-line message;
* ``default``: the default *as nix.conf text* (a callable for defaults that
  depend on the machine); every default parses (a test checks);
* ``components``: which typed view obeys it -- ``store``
  (``store.settings.StoreSettings``), ``build`` (``build.BuildSettings``),
  ``daemon`` (``daemon.trust.DaemonConfig``), ``substitute``
  (``build.substitute.SubstituteSettings``), or none (a client-side setting
  the daemon accepts from clients but does not use itself);
* ``attr``: the attribute of those views (``name`` with ``_`` for ``-``);
* ``is_list``: ``extra-NAME`` appends to it;
* ``client``: what an *untrusted* daemon client may do with it through
  SetOptions (the fixed fields ``keepFailed``, ``maxBuildJobs``,
  ``maxSilentTime`` and ``buildCores`` go through the same rule under the
  names ``keep-failed``, ``max-jobs``, ``max-silent-time`` and ``cores``):

  ``NEVER``   ignored (the default for everything not listed below);
  ``ALWAYS``  accepted as sent (``repeat``, ``connect-timeout``: client-side);
  ``EMPTY``   only the empty value (``builders``: "build locally");
  ``LOWER``   only a value that limits at least as much as the daemon's own
              (``timeout``, ``max-silent-time``: 0 means "none", so an untrusted
              client cannot lift a limit; ``max-jobs``, ``cores``: no more than
              the daemon allows);
  ``TRUSTED_SUBSTITUTERS``  only the substituters listed in
              ``trusted-substituters`` or ``substituters`` (the rest are dropped
              with a warning).

  ``keep-failed`` is ``NEVER``: Nix 2.8 applies the fixed field for every
  client, but a kept build dir is cleaned up by root in a directory the
  builder controlled; an untrusted client's request is ignored (a trusted
  client may set it).  Trusted clients may set anything, as with Nix.

Limits the daemon enforces on its users are settings too (component
``daemon`` unless noted), each with a safe default and 0 meaning "none":
``max-connections`` (256), ``max-connections-per-user`` (32),
``idle-timeout`` (3600 s waiting for the next operation),
``auth-timeout`` (10 s for the whole TCP authentication),
``max-request-size`` (32 MiB of request fields per operation, counted as
string bytes plus 32 per string) and ``max-root-registrations`` (store: 4096
names per user).

Unknown names are kept and reported by the views, never fatal.
"""

from __future__ import annotations

import os

from ..formats.frozen import Frozen
from .nixconf import SettingError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

# --- what an untrusted client may do ---------------------------------------------

NEVER, ALWAYS, EMPTY, LOWER, TRUSTED_SUBSTITUTERS = "never", "always", "empty", "lower", "trusted-substituters"

STORE, BUILD, DAEMON, SUBSTITUTE = "store", "build", "daemon", "substitute"


# --- parsers ------------------------------------------------------------------------

def parse_bool(name: str, value: str) -> bool:
    v = value.strip()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise SettingError(f"setting '{name}': '{value}' is not a Boolean")


def parse_int(name: str, value: str) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise SettingError(f"setting '{name}': '{value}' is not an integer") from None
    if n < 0:
        raise SettingError(f"setting '{name}': '{value}' is negative")
    return n


def parse_size(name: str, value: str) -> int:
    v = value.strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(v[-1:].upper(), 1)
    try:
        n = int(v[:-1] if mult != 1 else v) * mult
    except ValueError:
        raise SettingError(f"setting '{name}': '{value}' is not a size") from None
    if n < 0:
        raise SettingError(f"setting '{name}': '{value}' is negative")
    return n


def parse_str(name: str, value: str) -> str:
    return value.strip()


def parse_optional_str(name: str, value: str) -> str | None:
    return value.strip() or None


def parse_list(name: str, value: str) -> tuple[str, ...]:
    return tuple(value.split())


def parse_max_jobs(name: str, value: str) -> int:
    return (os.cpu_count() or 1) if value.strip() == "auto" else parse_int(name, value)


def parse_cores(name: str, value: str) -> int:
    # 0 is kept: builders get NIX_BUILD_CORES=0, "use every core" (as Nix 2.8 passes it)
    return (os.cpu_count() or 1) if value.strip() == "" else parse_int(name, value)


def parse_env_list(name: str, value: str) -> tuple[tuple[str, str], ...]:
    """``NAME=VALUE ...`` (``impure-env``) as (name, value) pairs; the last of a name wins."""
    out = []
    for item in value.split():
        var, eq, val = item.partition("=")
        if not eq or not var:
            raise SettingError(f"setting '{name}': '{item}' is not of the form NAME=VALUE")
        out.append((var, val))
    return tuple(out)


def parse_sandbox(name: str, value: str) -> str:
    """``true``, ``false`` or ``relaxed`` (Nix's Boolean spellings accepted)."""
    v = value.strip()
    if v in ("true", "1", "yes"):
        return "true"
    if v in ("false", "0", "no"):
        return "false"
    if v == "relaxed":
        return "relaxed"
    raise SettingError(f"setting '{name}': '{value}' is not one of true, false, relaxed")


def parse_duration(name: str, value: str) -> int:
    """Seconds: ``30d``, ``12h``, ``90m``, ``45s`` or a plain number of seconds."""
    v = value.strip()
    mult = {"d": 86400, "h": 3600, "m": 60, "s": 1}.get(v[-1:], 1)
    digits = v[:-1] if v[-1:] in ("d", "h", "m", "s") else v
    if not digits.isdigit():
        raise SettingError(f"setting '{name}': '{value}' is not a duration (e.g. 30d, 12h, 90m)")
    return int(digits) * mult


#: the root kinds a TTL may apply to: never a profile's generations (their own policies),
#: nor runtime, temp or lease roots (something is using those paths now)
TTL_KINDS = ("indirect",)


def parse_root_ttl(name: str, value: str) -> tuple[tuple[str, int], ...]:
    """``KIND=DURATION ...`` (e.g. ``indirect=14d``)."""
    out = []
    for word in value.split():
        kind, eq, dur = word.partition("=")
        if not eq or kind not in TTL_KINDS:
            raise SettingError(f"setting '{name}': '{word}' is not KIND=DURATION with KIND one "
                               f"of {', '.join(TTL_KINDS)}")
        out.append((kind, parse_duration(name, dur)))
    return tuple(out)


def one_of(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, value: str) -> str:
        v = value.strip()
        if v not in choices:
            raise SettingError(f"setting '{name}': '{value}' is not one of {', '.join(choices)}")
        return v
    return parse


# --- machine-dependent defaults ----------------------------------------------------------

def this_system() -> str:
    machine = os.uname().machine
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{machine}-{os.uname().sysname.lower()}"


def _default_features() -> str:
    features = ["benchmark", "big-parallel", "nixos-test"]
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        features.append("kvm")
    return " ".join(sorted(features))


def _default_extra_platforms() -> str:
    return "i686-linux" if this_system() == "x86_64-linux" else ""


# --- the table --------------------------------------------------------------------------

class Setting(Frozen):
    """One row of the table (a frozen value: :class:`~storekeeper.formats.frozen.Frozen`)."""

    __slots__ = ("name", "parse", "default", "components", "aliases", "client", "is_list", "doc")
    _fields = __slots__
    name: str
    parse: Callable[[str, str], Any]
    default: str | Callable[[], str]
    components: tuple[str, ...]
    aliases: tuple[str, ...]
    client: str
    is_list: bool
    doc: str

    def __init__(self, name: str, parse: Callable[[str, str], Any], default: str | Callable[[], str],
                 components: tuple[str, ...] = (), aliases: tuple[str, ...] = (),
                 client: str = NEVER, is_list: bool = False, doc: str = "") -> None:
        self._init(name=name, parse=parse, default=default, components=components,
                   aliases=aliases, client=client, is_list=is_list, doc=doc)

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    def default_text(self) -> str:
        return self.default() if callable(self.default) else self.default

    def default_value(self) -> Any:
        return self.parse(self.name, self.default_text())


def _s(name, parse, default, components=(), aliases=(), client=NEVER, doc=""):
    return Setting(name, parse, default, tuple(components), tuple(aliases), client,
                   parse is parse_list, doc)


_TABLE = [
    # --- the store (GC, optimise, roots) ---
    _s("keep-outputs", parse_bool, "false", [STORE], ["gc-keep-outputs"]),
    _s("keep-derivations", parse_bool, "true", [STORE], ["gc-keep-derivations"]),
    _s("min-free", parse_size, "0", [STORE], doc="auto-GC below this many free bytes (0: off)"),
    _s("max-free", parse_size, str(2**64 - 1), [STORE]),
    _s("min-free-check-interval", parse_int, "5", [STORE]),
    _s("fsync-store-paths", parse_bool, "true", [STORE],
       doc="sync new store paths' files to disk before registering them (Nix 2.12+: false)"),
    _s("gc-reserved-space", parse_size, str(8 * 2**20), [STORE],
       doc="bytes kept in <state>/db/reserved so a GC can start on a full disk"),
    _s("auto-optimise-store", parse_bool, "false", [STORE]),
    _s("indirect-root-grace", parse_size, str(14 * 86400), [STORE],
       doc="seconds an unreadable indirect root keeps what it last pointed at"),
    _s("runtime-roots", one_of("proc", "client", "both"), "both", [STORE]),
    _s("runtime-root-lease", parse_size, "3600", [STORE]),
    _s("max-root-registrations", parse_int, "4096", [STORE],
       doc="root names one user may register with the daemon (0: no limit)"),
    # --- binary caches and signatures (spec binary-cache.md §5) ---
    _s("trusted-public-keys", parse_list,
       "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=", [STORE, SUBSTITUTE],
       ["binary-cache-public-keys"]),
    _s("secret-key-files", parse_list, "", [STORE, SUBSTITUTE],
       doc="sign paths with these keys (`storekeeper sign`); their public halves are trusted"),
    # --- retention policies, applied by every GC (storekeeper.store.policy); 0: off ---
    _s("keep-generations", parse_int, "0", [STORE],
       doc="keep the last N generations of each profile (and the current one)"),
    _s("delete-generations-older-than", parse_duration, "0", [STORE],
       doc="delete generations older than this (the one live then, and the current, stay)"),
    _s("root-ttl", parse_root_ttl, "", [STORE],
       doc="KIND=DURATION: roots of that kind older than this stop counting (indirect=14d)"),
    _s("user-quota", parse_size, "0", [STORE],
       doc="warn when one user's roots hold more than this many bytes"),
    _s("keep-recently-used", parse_duration, "0", [STORE],
       doc="keep paths used (through the daemon, or seen as runtime roots) this recently"),
    # --- builds ---
    # (the views keep None for "not set": Nix's default, decided when used)
    _s("build-users-group", parse_str, lambda: "nixbld" if os.geteuid() == 0 else "", [BUILD, DAEMON]),
    _s("max-jobs", parse_max_jobs, "1", [BUILD], ["build-max-jobs"], LOWER),
    _s("cores", parse_cores, lambda: str(os.cpu_count() or 1), [BUILD], ["build-cores"], LOWER),
    _s("timeout", parse_int, "0", [BUILD], ["build-timeout"], LOWER),
    _s("max-silent-time", parse_int, "0", [BUILD], ["build-max-silent-time"], LOWER),
    _s("keep-failed", parse_bool, "false", [BUILD]),
    _s("keep-going", parse_bool, "false", [BUILD], client=ALWAYS),
    # sandbox settings are never an untrusted client's to change (NEVER), as in Nix
    _s("sandbox", parse_sandbox, "true", [BUILD], ["build-use-sandbox"],
       doc="true|false|relaxed: builds in namespaces and a chroot (build.sandbox); a store "
           "whose store dir is not real always builds sandboxed"),
    _s("sandbox-fallback", parse_bool, "true", [BUILD],
       doc="build unsandboxed (one warning) when the kernel refuses the namespaces"),
    _s("sandbox-paths", parse_list, "", [BUILD], ["build-chroot-dirs", "build-sandbox-paths"],
       doc="host paths bound into every sandbox: PATH, TARGET=SOURCE, a trailing '?': optional"),
    _s("sandbox-build-dir", parse_str, "/build", [BUILD],
       doc="where the build dir appears inside the sandbox"),
    _s("sandbox-dev-shm-size", parse_str, "50%", [BUILD]),
    _s("allowed-impure-host-deps", parse_list, "", [BUILD],
       doc="macOS only in Nix (__impureHostDeps); accepted and unused on Linux"),
    _s("compress-build-log", parse_bool, "true", [BUILD], ["build-compress-log"]),
    _s("keep-build-log", parse_bool, "true", [BUILD], ["build-keep-log"]),
    _s("log-lines", parse_int, "10", [BUILD]),
    _s("max-build-log-size", parse_size, "0", [BUILD], ["build-max-log-size"],
       doc="bytes of output after which a builder is killed (0: no limit)"),
    _s("system", parse_str, this_system, [BUILD]),
    _s("extra-platforms", parse_list, _default_extra_platforms, [BUILD], ["build-extra-platforms"]),
    _s("system-features", parse_list, _default_features, [BUILD]),
    _s("build-dir", parse_optional_str, "", [BUILD]),
    # hooks run programs as the daemon (post-build-hook) or the build user (diff-hook):
    # never set by an untrusted client (NEVER, the default)
    _s("post-build-hook", parse_str, "", [BUILD],
       doc="program run as the daemon after each successful build (DRV_PATH, OUT_PATHS)"),
    _s("diff-hook", parse_str, "", [BUILD],
       doc="program run on an output that --check found different (with run-diff-hook)"),
    _s("run-diff-hook", parse_bool, "false", [BUILD]),
    _s("filter-syscalls", parse_bool, "true", [BUILD],
       doc="NO_NEW_PRIVS and a seccomp filter for builders (build.confine)"),
    # (newer Nix's, behind its experimental feature configurable-impure-env; NEVER:
    # an untrusted client's is ignored, as there)
    Setting("impure-env", parse_env_list, "", (BUILD,), (), NEVER, True,
            "NAME=VALUE ...: what a fixed-output build's impureEnvVars get instead of the "
            "value in the building process's environment (build.environment)"),
    # --- the daemon: who may connect, and its limits ---
    _s("trusted-users", parse_list, "root", [DAEMON]),
    _s("allowed-users", parse_list, "*", [DAEMON]),
    _s("substituters", parse_list, "", [DAEMON, SUBSTITUTE], ["binary-caches"],
       client=TRUSTED_SUBSTITUTERS),
    _s("trusted-substituters", parse_list, "", [DAEMON], ["trusted-binary-caches"]),
    _s("require-sigs", parse_bool, "true", [DAEMON, SUBSTITUTE]),
    # Nix 2.8 substitutes max-jobs paths at a time; later Nix has this setting (same default)
    _s("max-substitution-jobs", parse_int, "16", [DAEMON, SUBSTITUTE], client=LOWER,
       doc="paths downloaded and unpacked at once when substituting (1: one after the other)"),
    # --- substitution (spec binary-cache.md §8, §9); SetOptions' useSubstitutes and
    # tryFallback set the first two for every client ---
    _s("substitute", parse_bool, "true", [SUBSTITUTE], ["build-use-substitutes"], ALWAYS),
    _s("fallback", parse_bool, "false", [SUBSTITUTE], ["build-fallback"], ALWAYS),
    _s("narinfo-cache-negative-ttl", parse_int, "3600", [SUBSTITUTE],
       doc="seconds an http(s)/s3 cache's 'no such narinfo' is believed"),
    _s("narinfo-cache-positive-ttl", parse_int, "2592000", [SUBSTITUTE],
       doc="seconds an http(s)/s3 cache's narinfo is believed"),
    _s("max-connections", parse_int, "256", [DAEMON]),
    _s("max-connections-per-user", parse_int, "32", [DAEMON]),
    _s("idle-timeout", parse_int, "3600", [DAEMON],
       doc="seconds a connection may wait for its next operation (0: forever)"),
    _s("auth-timeout", parse_int, "10", [DAEMON],
       doc="seconds a TCP peer has for the whole authentication"),
    _s("max-request-size", parse_size, "32M", [DAEMON],
       doc="bytes of request fields one operation may send (framed payloads not counted)"),
    # --- client-side settings a daemon accepts from clients (no view uses them) ---
    _s("repeat", parse_int, "0", client=ALWAYS),
    _s("connect-timeout", parse_int, "0", client=ALWAYS),
    _s("builders", parse_str, "", client=EMPTY),
    _s("store", parse_str, "auto"),
]

#: name -> setting (canonical names only)
SETTINGS: dict[str, Setting] = {s.name: s for s in _TABLE}
_BY_NAME: dict[str, Setting] = {**{a: s for s in _TABLE for a in s.aliases}, **SETTINGS}


def lookup(name: str) -> tuple[Setting | None, bool]:
    """The setting ``name`` (or ``extra-NAME``, or an alias) stands for, and whether it
    appends (``extra-``); (None, …) for a name nobody knows."""
    if name.startswith("extra-") and name not in _BY_NAME:
        s = _BY_NAME.get(name[len("extra-"):])
        return (s, True) if s is not None and s.is_list else (None, True)
    return _BY_NAME.get(name), False


def default_of(name: str) -> Callable[[], Any]:
    """A ``default_factory`` for a view's field: the table's default, parsed."""
    setting = SETTINGS[name]
    return setting.default_value


def apply(view: Any, component: str, pairs: Iterable[tuple[str, str]],
          unknown: list[str] | None = None) -> dict[str, Any]:
    """The changes ``pairs`` make to ``view`` (a typed view of ``component``), in order.

    Names of other components are skipped; names nobody knows are appended to
    ``unknown`` (when given).  Raises :class:`SettingError` for a bad value.
    """
    changes: dict[str, Any] = {}
    for name, value in pairs:
        setting, extra = lookup(name)
        if setting is None:
            if unknown is not None:
                unknown.append(name)
            continue
        if component not in setting.components:
            continue
        parsed = setting.parse(name, value)
        if extra:
            parsed = tuple(changes.get(setting.attr, getattr(view, setting.attr))) + parsed
        changes[setting.attr] = parsed
    return changes


def unknown_names(pairs: Iterable[tuple[str, str]]) -> list[str]:
    return [name for name, _ in pairs if lookup(name)[0] is None]


# --- untrusted clients -------------------------------------------------------------------

def _limit(n: int) -> float:
    return float("inf") if n == 0 else n


def client_may_set(name: str, value: str, trusted: bool, current: Callable[[str], Any],
                   warn: Callable[[str], None]) -> str | None:
    """What of ``name = value`` a daemon client may set: the value to apply, or None
    (ignored).  ``current(name)`` is the daemon's own value of a setting; ``warn``
    tells the client about a substituter it may not use."""
    setting, extra = lookup(name)
    if trusted:
        return value
    if setting is None:
        return None
    rule = setting.client
    if rule == ALWAYS:
        return value
    if rule == EMPTY:
        return value if value.strip() == "" else None
    if rule == LOWER:
        try:
            asked = setting.parse(name, value)
        except SettingError:
            return None
        mine = current(setting.name)
        if setting.name in ("timeout", "max-silent-time"):
            return value if _limit(asked) <= _limit(mine) else None
        if setting.name == "cores":  # 0: every core of the machine
            cpus = os.cpu_count() or 1
            return value if (asked or cpus) <= (mine or cpus) else None
        return value if asked <= mine else None
    if rule == TRUSTED_SUBSTITUTERS:
        allowed = set(current("trusted-substituters")) | set(current("substituters"))
        kept = []
        for sub in value.split():
            if sub in allowed or sub + "/" in allowed:  # by string, as Nix (spec §9.1)
                kept.append(sub)
            else:
                warn(f"ignoring untrusted substituter '{sub}'")
        return " ".join(kept)
    return None
