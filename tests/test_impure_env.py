"""``impureEnvVars``: where a fixed-output builder's impure variables come from.

nix-daemon 2.8 (the oracle) takes them from its own environment, never the
client's: the worker protocol carries no environment.  Ours does the same
through the daemon; ``impure-env`` (newer Nix's setting) overrides, from a
trusted client only; a local ``storekeeper build`` takes them from the invoking
process.  Derivations that are not fixed-output never see them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import needs_nix
from daemon_util import Client
from test_build import HELLO_SHA256, SYSTEM, area_factory, drv_expr  # noqa: F401 -- fixture
from test_sandbox import BUSYBOX, add_drv

from storekeeper.build import sandbox as sandbox_mod
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import WireWriter
from storekeeper.store.local import LocalStore

pytestmark = pytest.mark.slow

SHOW = r"echo \"seen: imp=[\${SK_IMP-unset}] other=[\${SK_OTHER-unset}]\""
IMPURE = 'impureEnvVars = ["SK_IMP" "SK_OTHER"];'
FIXED = drv_expr("impure-fixed", SHOW + r"; printf hello > $out",
                 f'outputHash = "{HELLO_SHA256}"; outputHashAlgo = "sha256"; {IMPURE}')
PLAIN = drv_expr("impure-plain", SHOW + r"; echo x > $out", IMPURE)


def seen(stderr: bytes) -> list[str]:
    return re.findall(r"seen: .*", stderr.decode())


def session(a) -> tuple[list[str], list[str]]:
    """The lines the fixed-output and the plain builder printed, built through ``a``'s
    daemon by the real nix-build, whose own SK_IMP differs from the daemon's."""
    out = []
    for expr in (FIXED, PLAIN):
        p = a.run(["nix-build", "--no-out-link", "-E", expr])
        assert p.returncode == 0, p.stderr.decode()
        out.append(seen(p.stderr))
    return out[0], out[1]


def with_envs(a, daemon: str, client: str) -> None:
    plain = a.env

    def env(remote: bool = True) -> dict[str, str]:
        e = plain(remote)
        e["SK_IMP"] = client if remote else daemon
        e.pop("SK_OTHER", None)
        return e
    a.env = env


@needs_nix
def test_a_daemon_passes_its_own_environment_as_nix_daemon_2_8_does(area_factory):
    results = {}
    for kind in ("nix", "ours"):
        a = area_factory()
        with_envs(a, daemon="from-the-daemon", client="from-the-client")
        a.start(kind)
        try:
            results[kind] = session(a)
        finally:
            a.stop()
    assert results["ours"] == results["nix"]
    fixed, plain = results["nix"]
    assert fixed == ["seen: imp=[from-the-daemon] other=[]"]  # (unset: empty, not absent)
    assert plain == ["seen: imp=[unset] other=[unset]"]


def build_with_options(a, expr: str, options: dict[str, str]) -> list[str]:
    """Build ``expr`` through ``a``'s daemon from a worker-protocol client whose
    SetOptions carry ``options`` (nix-build 2.8 sends no setting it does not know,
    and ``impure-env`` is newer); the ``seen:`` lines of the build log."""
    drv = a.run(["nix-instantiate", "-E", expr], check=True).stdout.decode().strip()
    c = Client.connect(a.socket, timeout=60).handshake(set_options=False)
    try:
        c.op(WireWriter().u64(19).u64(0).u64(0).u64(0).u64(3).u64(1).u64(0).u64(1).u64(0)
             .u64(0).u64(0).u64(1).u64(1).string_map(options), 19)
        msgs, _ = c.op(WireWriter().u64(9).strings([drv + "!out"]).u64(0), 9)
    finally:
        c.close()
    return re.findall(r"seen: imp=\[[^]]*\] other=\[[^]]*\]", repr(msgs))


@needs_nix
def test_impure_env_from_a_trusted_client_only(area_factory):
    """A trusted client's ``impure-env`` wins over the daemon's environment; an
    untrusted one's is ignored; the daemon's own nix.conf may set it too."""
    for conf, option, want in (
            ("", "SK_IMP=from-the-option", "from-the-option"),
            ("trusted-users =\n", "SK_IMP=from-the-option", "from-the-daemon"),
            ("impure-env = SK_IMP=from-the-conf SK_OTHER=o\n", None, "from-the-conf")):
        a = area_factory(conf=conf)
        with_envs(a, daemon="from-the-daemon", client="from-the-client")
        a.start("ours")
        try:
            opts = {"impure-env": option} if option else {}
            fixed, plain = (build_with_options(a, e, opts) for e in (FIXED, PLAIN))
        finally:
            a.stop()
        other = "o" if "SK_OTHER" in conf else ""
        assert fixed == [f"seen: imp=[{want}] other=[{other}]"], conf
        assert plain == ["seen: imp=[unset] other=[unset]"], conf


@pytest.mark.skipif(not os.path.exists(BUSYBOX) or sandbox_mod.unavailable() is not None,
                    reason="needs a static busybox and kernel namespaces")
def test_a_local_build_passes_the_invoking_environment(tmp_path):
    """``storekeeper build`` on a chroot store (sandboxed): the invoking process's
    environment, or ``--option impure-env``; not for a derivation that is not
    fixed-output."""
    root = str(tmp_path / "root")
    store = LocalStore(LocalLayout.chroot(root))
    script = 'echo "seen: imp=[${SK_IMP-unset}] other=[${SK_OTHER-unset}]"; '
    env = {"impureEnvVars": "SK_IMP SK_OTHER"}
    try:
        drvs = {name: add_drv(store, f"local-{name}", script + (
            "echo x > $out" if name == "plain" else "printf hello > $out"),
            fixed_hash=None if name == "plain" else HELLO_SHA256, flat=True, env=env)
            for name in ("fixed", "fixed-option", "plain")}
        printed = {k: store.store_dir.print(d) for k, d in drvs.items()}
    finally:
        store.close()
    (tmp_path / "nix.conf").write_text("build-users-group =\nsandbox = true\n")
    base = {k: v for k, v in os.environ.items() if k not in ("SK_IMP", "SK_OTHER")}
    base.update({"NIX_CONF_DIR": str(tmp_path), "NIX_REMOTE": "", "SK_IMP": "from-the-invoker"})
    cli = [sys.executable, "-m", "storekeeper.cli.main", "--store", root, "build"]

    def build(name: str, *extra: str) -> list[str]:
        r = subprocess.run([*cli, printed[name], *extra], capture_output=True, env=base,
                           timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        with open(root + r.stdout.decode().strip(), "rb") as f:
            assert f.read() == (b"x\n" if name == "plain" else b"hello")
        return seen(r.stderr)

    assert build("fixed") == ["seen: imp=[from-the-invoker] other=[]"]
    assert build("fixed-option", "--option", "impure-env", "SK_OTHER=from-the-option") == [
        "seen: imp=[from-the-invoker] other=[from-the-option]"]
    assert build("plain") == ["seen: imp=[unset] other=[unset]"]
