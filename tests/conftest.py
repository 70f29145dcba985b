"""Shared fixtures: temp stores, and real Nix as an oracle kept off the machine's /nix."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import weakref

import pytest

from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

HAVE_NIX = shutil.which("nix-store") is not None
needs_nix = pytest.mark.skipif(not HAVE_NIX, reason="real Nix (nix-bin) not installed")


@pytest.fixture(autouse=True)
def _stores_closed_after_each_test(monkeypatch):
    """Every LocalStore a test opens (and did not close) is closed when the test ends:
    an open store holds ~6 fds, and the suite's one process would otherwise pass
    1024 of them (where select() stops working, which once hid as test failures)."""
    opened: list[weakref.ref] = []
    init = LocalStore.__init__

    def tracking_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(weakref.ref(self))

    monkeypatch.setattr(LocalStore, "__init__", tracking_init)
    yield
    monkeypatch.setattr(LocalStore, "__init__", init)
    for ref in opened:
        store = ref()
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001 -- a test may have closed or broken it
                pass


def nix_env(tmp: str) -> dict[str, str]:
    """Environment for real Nix that can never touch /nix or the user's config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env.update({
        "HOME": os.path.join(tmp, "home"),
        "XDG_CACHE_HOME": os.path.join(tmp, "home", ".cache"),
        "XDG_CONFIG_HOME": os.path.join(tmp, "home", ".config"),
        "NIX_CONF_DIR": os.path.join(tmp, "etc"),
        "NIX_STATE_DIR": os.path.join(tmp, "nixstate"),
        "NIX_LOG_DIR": os.path.join(tmp, "nixlog"),
        # a command given no --store uses a chroot store under tmp, never /nix
        "NIX_REMOTE": os.path.join(tmp, "default-root"),
    })
    os.makedirs(env["HOME"], exist_ok=True)
    os.makedirs(env["NIX_CONF_DIR"], exist_ok=True)
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "w") as f:
        f.write("substituters =\nsandbox = false\nbuild-users-group =\n")
    return env


def run_nix(args: list[str], tmp: str, input: bytes | None = None, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=input, capture_output=True, check=check,
                          env=env or nix_env(tmp), timeout=120)


@pytest.fixture
def chroot_root(tmp_path):
    return str(tmp_path / "root")


@pytest.fixture
def store(chroot_root):
    s = LocalStore(LocalLayout.chroot(chroot_root))
    yield s
    s.close()


@pytest.fixture
def shared_dir():
    """A temp dir that other (real, unprivileged) users can traverse: pytest's
    tmp_path is private to root."""
    d = tempfile.mkdtemp(prefix="sk-users-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        subprocess.run(["chmod", "-R", "u+w", d], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


# --- test tiers -----------------------------------------------------------------------------
# `pytest -m "not slow"` is the fast tier (formats, unit and single-process store tests):
# anything that needs real Nix or root, or starts daemons, real users or namespaces, is slow.
_SLOW_MODULES = {
    "test_attacks_fs", "test_build", "test_build_confine", "test_cli_daemon", "test_daemon",
    "test_daemon_users", "test_hidepid", "test_interop_nix", "test_multihost", "test_tcp_auth",
    "test_user_registrations", "test_substitute", "test_serve",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.module.__name__ in _SLOW_MODULES or item.get_closest_marker("nix")
                or item.get_closest_marker("root")):
            item.add_marker(pytest.mark.slow)
