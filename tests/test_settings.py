"""The one settings table (storekeeper.config.settings): every view and SetOptions obey it."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import fields, is_dataclass

import pytest

from storekeeper.build import BuildSettings, SubstituteSettings
from storekeeper.config import SETTINGS, SettingError, lookup
from storekeeper.config.settings import (
    ALWAYS,
    BUILD,
    DAEMON,
    EMPTY,
    LOWER,
    NEVER,
    STORE,
    SUBSTITUTE,
    TRUSTED_SUBSTITUTERS,
    client_may_set,
)
from storekeeper.daemon import DaemonConfig, Session
from storekeeper.daemon.ops.build import build_settings
from storekeeper.errors import StoreError
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import WireWriter
from storekeeper.store.local import LocalStore
from storekeeper.store.settings import StoreSettings

VIEWS = {STORE: StoreSettings, BUILD: BuildSettings, DAEMON: DaemonConfig,
         SUBSTITUTE: SubstituteSettings}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_setting_parses_its_default_and_its_view_starts_there(name):
    s = SETTINGS[name]
    value = s.default_value()
    assert s.client in (NEVER, ALWAYS, EMPTY, LOWER, TRUSTED_SUBSTITUTERS)
    for component in s.components:
        view = VIEWS[component]()
        assert hasattr(view, s.attr), f"{component} view has no '{s.attr}'"
        if name != "build-users-group":  # (the views keep None: "Nix's default, decided when used")
            assert getattr(view, s.attr) == value
        # the view applies its own default unchanged
        assert getattr(view.with_settings([(name, s.default_text())]), s.attr) == value
    for alias in s.aliases:
        assert lookup(alias)[0] is s


def test_every_field_of_every_view_is_in_the_table():
    known = {s.attr for s in SETTINGS.values()}
    for cls in VIEWS.values():
        # (StoreSettings is a plain class with _fields: cold start, storekeeper.formats.frozen)
        names = [f.name for f in fields(cls)] if is_dataclass(cls) else list(cls._fields)
        assert "keep_outputs" in names or cls is not StoreSettings
        for name in names:
            # (client_may_build_as_daemon: set per connection by the daemon, never from nix.conf)
            assert name in known | {"unknown", "nix_version", "client_may_build_as_daemon"}, \
                f"{cls.__name__}.{name}"


def test_bad_values_are_one_line_errors_and_unknown_names_are_kept():
    for view in (StoreSettings(), BuildSettings(), DaemonConfig()):
        with pytest.raises(StoreError, match="setting 'max-jobs': 'many' is not an integer|"
                                             "setting 'min-free': 'x' is not a size|"
                                             "setting 'max-connections': 'x' is not an integer"):
            view.with_settings([("max-jobs", "many"), ("min-free", "x"), ("max-connections", "x")])
    s = StoreSettings().with_settings([("no-such-thing", "1"), ("keep-outputs", "true"), ("sandbox", "true")])
    assert s.unknown == ("no-such-thing",) and s.keep_outputs
    assert BuildSettings().with_settings([("extra-system-features", "gpu")]).system_features[-1] == "gpu"
    with pytest.raises(SettingError):
        SETTINGS["runtime-roots"].parse("runtime-roots", "sometimes")


def test_untrusted_rules():
    daemon = {"max-jobs": 2, "cores": 4, "timeout": 0, "max-silent-time": 600,
              "trusted-substituters": ("https://ok",), "substituters": ()}
    warnings: list[str] = []

    def may(name, value, trusted=False):
        return client_may_set(name, value, trusted, daemon.__getitem__, warnings.append)
    assert may("max-jobs", "1") == "1" and may("max-jobs", "3") is None
    assert may("cores", "4") == "4" and may("cores", "8") is None
    assert may("cores", "0") == ("0" if (os.cpu_count() or 1) <= 4 else None)  # 0: all cores
    assert may("timeout", "5") == "5"                 # the daemon has none: any limit is lower
    assert may("max-silent-time", "0") is None        # 0 would lift the daemon's limit
    assert may("max-silent-time", "60") == "60"
    assert may("keep-failed", "true") is None and may("keep-failed", "true", trusted=True) == "true"
    assert may("sandbox", "false") is None and may("allowed-users", "*") is None
    assert may("builders", "") == "" and may("builders", "ssh://x") is None
    assert may("substituters", "https://ok http://bad") == "https://ok"
    assert warnings == ["ignoring untrusted substituter 'http://bad'"]
    assert may("repeat", "2") == "2" and may("no-such-setting", "1") is None


def _session_after(store, request: bytes, trusted: bool, config: DaemonConfig) -> Session:
    """Run a real session over a socketpair on ``request`` and return it (to inspect)."""
    ours, theirs = socket.socketpair()
    session = Session(store, ours.makefile("rb"), ours.sendall, trusted=trusted, config=config,
                      build=BuildSettings(max_jobs=2, cores=2, max_silent_time=600))
    def serve() -> None:
        try:
            session.run()
        finally:
            ours.shutdown(socket.SHUT_RDWR)  # (the session's reader still holds the fd)
            ours.close()
    t = threading.Thread(target=serve)
    t.start()
    theirs.settimeout(20)
    theirs.sendall(request)
    theirs.shutdown(socket.SHUT_WR)
    while theirs.recv(65536):
        pass
    t.join(20)
    theirs.close()
    return session


def test_untrusted_set_options_cannot_set_what_the_table_forbids(tmp_path):
    """Over the wire: the fixed fields (keepFailed, maxBuildJobs, maxSilentTime, buildCores)
    and the overrides of an untrusted client go through the table; a trusted one's do not."""
    store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    try:
        w = WireWriter().u64(0x6E697863).u64(0x122).u64(0).u64(0).u64(19)
        # keepFailed, keepGoing, tryFallback, verbosity, maxBuildJobs, maxSilentTime,
        # useBuildHook, verboseBuild, logType, printBuildTrace, buildCores, useSubstitutes
        for v in (1, 1, 0, 3, 64, 0, 1, 0, 0, 0, 64, 1):
            w.u64(v)
        request = w.string_map({"sandbox": "false", "timeout": "7", "max-build-log-size": "1",
                                "allowed-users": "*", "build-users-group": "",
                                "post-build-hook": "/tmp/hook", "diff-hook": "/tmp/diff",
                                "run-diff-hook": "true"}).take()
        config = DaemonConfig(build_users_group="")
        s = _session_after(store, request, trusted=False, config=config)
        b = build_settings(s)
        assert (b.keep_failed, b.max_jobs, b.cores, b.max_silent_time) == (False, 2, 2, 600)
        assert b.keep_going and b.timeout == 7 and b.max_build_log_size == 0
        assert (b.post_build_hook, b.diff_hook, b.run_diff_hook) == ("", "", False)
        assert set(s.options.overrides) == {"keep-going", "timeout"}
        s = _session_after(store, request, trusted=True, config=config)
        b = build_settings(s)
        assert (b.keep_failed, b.max_jobs, b.cores, b.max_silent_time) == (True, 64, 64, 0)
        assert b.max_build_log_size == 1
        assert (b.post_build_hook, b.diff_hook, b.run_diff_hook) == ("/tmp/hook", "/tmp/diff", True)
    finally:
        store.close()


def test_impure_env_setting_parses_and_is_never_an_untrusted_clients():
    """``impure-env`` (tests/test_impure_env.py has what builds do with it)."""
    setting, _ = lookup("impure-env")
    assert setting is not None and setting.is_list
    assert setting.parse("impure-env", " A=1 B= A=2 ") == (("A", "1"), ("B", ""), ("A", "2"))
    with pytest.raises(SettingError, match="'B' is not of the form NAME=VALUE"):
        setting.parse("impure-env", "A=1 B")
    never = lambda name: ()  # noqa: E731
    assert client_may_set("impure-env", "A=1", False, never, print) is None
    assert client_may_set("impure-env", "A=1", True, never, print) == "A=1"
