"""The build sandbox (``sandbox = true``): what a builder can and cannot do inside it.

Builders are a static busybox copied into the store (as Nix's own tests do), on
chroot stores (logical ``/nix/store`` kept under a temp dir: only the sandbox
makes that store dir exist for the builder).  Each "cannot" test also runs the
same builder unsandboxed on a store with a real store dir, where it *can*: so
every such test fails without the sandbox.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import threading

import pytest

from storekeeper.build import Builder, BuildSettings, BuildStatus
from storekeeper.build import sandbox as sandbox_mod
from storekeeper.config.settings import this_system
from storekeeper.formats.derivation import (
    Derivation,
    DerivationOutput,
    derivation_store_path,
    fill_output_paths,
    print_derivation,
)
from storekeeper.formats.storepath import StorePath
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import DerivedPath
from storekeeper.store.local import LocalStore

SYSTEM = this_system()
BUSYBOX = shutil.which("busybox") or "/bin/busybox"

needs_sandbox = pytest.mark.skipif(
    not os.path.exists(BUSYBOX) or sandbox_mod.unavailable() is not None,
    reason=f"needs a static busybox and kernel namespaces ({sandbox_mod.unavailable()})")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (build users)")

pytestmark = [needs_sandbox, pytest.mark.slow]

SANDBOXED = [("sandbox", "true"), ("build-users-group", "")]
UNSANDBOXED = [("sandbox", "false"), ("build-users-group", "")]


def shell_path(store: LocalStore) -> StorePath:
    """A store path holding ``bin/busybox`` and ``bin/sh -> busybox``."""
    src = os.path.join(store.real_store_dir, "..", "bb-src")
    os.makedirs(os.path.join(src, "bin"), exist_ok=True)
    if not os.path.exists(os.path.join(src, "bin", "busybox")):
        shutil.copy(BUSYBOX, os.path.join(src, "bin", "busybox"))
        os.symlink("busybox", os.path.join(src, "bin", "sh"))
    return store.add_path(src, name="busybox").path


def add_drv(store: LocalStore, name: str, script: str, *, fixed_hash: str | None = None,
            env: dict[str, str] | None = None, srcs: tuple[StorePath, ...] = ()) -> StorePath:
    sd = store.store_dir
    bb = shell_path(store)
    sh = sd.print(bb) + "/bin/sh"
    out = DerivationOutput(hash_algo="r:sha256", hash=fixed_hash) if fixed_hash \
        else DerivationOutput()
    drv = Derivation(outputs={"out": out}, platform=SYSTEM, builder=sh,
                     args=["-e", "-c", script],
                     env={"builder": sh, "name": name, "system": SYSTEM, **(env or {})},
                     input_srcs=sorted([sd.print(bb), *(sd.print(s) for s in srcs)]))
    drv = fill_output_paths(drv, sd, read_drv=None)
    info = store.add_text(name + ".drv", print_derivation(drv), references=[bb, *srcs])
    assert info.path == derivation_store_path(drv, sd)
    return info.path


def build(store: LocalStore, drv: StorePath, settings) -> tuple[object, str]:
    """(result, output's real path) of building ``drv``; the log lines are in result.log."""
    lines: list[str] = []

    class Log:
        def __getattr__(self, name):
            return lambda *a, **k: 0

        def result(self, act, kind, fields):
            lines.append(str(fields[0]))

        def log(self, level, msg):
            lines.append(msg)

    st = BuildSettings().with_settings(settings)
    [res] = Builder(store, st, logger=Log()).build([DerivedPath(drv, ("out",))])
    res.log = "\n".join(lines)
    outs = store.query_derivation_outputs(drv)
    return res, store.real_path(outs["out"])


@pytest.fixture
def chroot_store(tmp_path):
    root = tmp_path / "root"
    s = LocalStore(LocalLayout.chroot(str(root)))
    yield s
    s.close()


@pytest.fixture
def real_store(tmp_path):
    base = str(tmp_path / "real")
    s = LocalStore(LocalLayout.custom(base + "/store", base + "/state", base + "/log"))
    yield s
    s.close()


def read_out(path: str) -> str:
    with open(path) as f:
        return f.read()


# --- a plain sandboxed build ----------------------------------------------------------------

def test_builds_on_a_chroot_store_with_the_logical_store_dir_inside(chroot_store):
    drv = add_drv(chroot_store, "hello", 'echo "$NIX_BUILD_TOP $PWD $TMPDIR $HOME" > $out; '
                  'id -u >> $out; id -g >> $out; echo $$ >> $out; hostname >> $out; '
                  'cat /etc/passwd >> $out; ls /etc >> $out')
    res, out = build(chroot_store, drv, SANDBOXED)
    assert res.status in (BuildStatus.BUILT,), res.error_msg
    lines = read_out(out).splitlines()
    assert lines[0] == "/build /build /build /homeless-shelter"
    assert lines[1:5] == ["1000", "100", "1", "localhost"]
    assert lines[5:8] == ["root:x:0:0:Nix build user:/build:/noshell",
                          "nixbld:x:1000:100:Nix build user:/build:/noshell",
                          "nobody:x:65534:65534:Nobody:/:/noshell"]
    assert lines[8:] == ["group", "hosts", "passwd"]
    assert chroot_store.is_valid(chroot_store.query_derivation_outputs(drv)["out"])
    # the chroot dir is gone
    assert not [n for n in os.listdir(chroot_store.real_store_dir) if n.endswith(".chroot")]
