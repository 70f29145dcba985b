"""The real-client matrix (issue 13, "Must show"): the real Nix 2.8 clients against our
daemon, with the store wiped and re-created under the running daemon before every step,
as Nix's own test scripts do (``rm -rf`` the store and state dirs, ``mkdir`` them again).

Each step asserts the client succeeded and that its result is there: paths exist and are
valid in the store our daemon serves (asked through the daemon with ``--check-validity``).

Nix 2.8's ``nix-copy-closure`` only speaks the legacy ``ssh://`` protocol (the remote side
is ``nix-store --serve --write``, here a client of our daemon); ssh-ng is covered by
``nix copy --to ssh-ng://…`` with ``storekeeper-nix-daemon`` as the remote program.  Both
go through a substitute ``ssh`` that runs the command on this machine.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import traceback

import pytest
from conftest import needs_nix
from test_build import CHAIN, NIX_CMD, Area, area_factory, drv_expr  # noqa: F401 -- (a fixture)
from test_protocol_versions import wipe

TRIVIAL = drv_expr("triv", r"echo hi > $out")
WITH_BIN = drv_expr("hello-env", r"PATH=/bin:/usr/bin; mkdir -p $out/bin; "
                    r"printf '#!/bin/sh\necho hello\n' > $out/bin/hello; chmod +x $out/bin/hello")
BINDIR = os.path.dirname(sys.executable)


def fake_ssh(a: Area) -> str:
    """``ssh HOST [-x -a -o … -p …] COMMAND`` as Nix 2.8 runs it: runs COMMAND here, as
    a client of our daemon (so ``nix-store --serve`` on the "remote" side writes to it)."""
    bindir = os.path.join(a.base, "bin")
    os.makedirs(bindir, exist_ok=True)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in a.env().items()
                   if k.startswith("NIX_") or k in ("HOME", "XDG_CACHE_HOME", "PATH"))
    script = os.path.join(bindir, "ssh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\n"
                f"echo \"$1\" >> {a.base}/ssh-logins\n"
                "shift\n"
                "while [ $# -gt 0 ]; do case \"$1\" in -x|-a|-v|-T) shift;; "
                "-o|-p|-i|-S|-F|-l) shift 2;; --) shift; break;; *) break;; esac; done\n"
                f"exec env {env} sh -c \"$*\"\n")
    os.chmod(script, 0o755)
    return bindir


class Matrix:
    """The steps; each runs against a store just wiped under the running daemon."""

    def __init__(self, a: Area) -> None:
        self.a = a
        self.src = os.path.join(a.work, "hello.txt")
        with open(self.src, "w") as f:
            f.write("hello\n")
        self.other = os.path.join(a.base, "other")     # a second store: a local chroot store
        self.other_url = f"local?root={self.other}"
        self.ssh_path = f"{fake_ssh(a)}:{os.environ['PATH']}"

    def other_real(self, path: str) -> str:
        """Where a path of the chroot store really is (Nix 2.8: ROOT/nix/store/…)."""
        return os.path.join(self.other, "nix", "store", os.path.basename(path))

    def run(self, *args: str, **env: str) -> str:
        p = subprocess.run(list(args), env={**self.a.env(), **env}, cwd=self.a.work,
                           capture_output=True, timeout=60)
        assert p.returncode == 0, f"{list(args)} failed ({p.returncode}): {p.stderr.decode()}"
        return p.stdout.decode().strip()

    def valid(self, *paths: str) -> None:
        """Each path is there and valid in the store our daemon serves."""
        for p in paths:
            assert os.path.exists(p), p
        assert self.run("nix-store", "--check-validity", "--print-invalid", *paths) == ""

    def add(self) -> str:
        path = self.run("nix-store", "--add", self.src)
        self.valid(path)
        return path

    def run_step(self, name: str) -> None:
        wipe(self.a.store, self.a.state)
        wipe(self.other)
        getattr(self, "step_" + name)()

    # --- the steps ---

    def step_add(self) -> None:
        path = self.add()
        assert path.startswith(self.a.store + "/") and path.endswith("-hello.txt")
        assert open(path).read() == "hello\n"

    def step_query(self) -> None:
        path = self.add()
        assert self.run("nix-store", "-q", "--hash", path).startswith("sha256:")
        assert self.run("nix-store", "-q", "--references", path) == ""
        b = self.run("nix-build", "--no-out-link", "-E", CHAIN)
        refs = self.run("nix-store", "-q", "--references", b).split()
        assert len(refs) == 1 and refs[0].endswith("-chain-a"), refs
        reqs = self.run("nix-store", "-q", "--requisites", b).split()
        assert sorted(reqs) == sorted([refs[0], b])
        self.valid(b, *reqs)

    def step_verify(self) -> None:
        self.add()
        self.run("nix-store", "--verify", "--check-contents")

    def step_gc(self) -> None:
        path = self.add()
        self.run("nix-store", "--gc")
        assert not os.path.lexists(path)
        assert self.run("nix-store", "--check-validity", "--print-invalid", path) == path

    def step_nix_build(self) -> None:
        out = self.run("nix-build", "--no-out-link", "-E", TRIVIAL)
        assert open(out).read() == "hi\n"
        self.valid(out)

    def step_nix_build_path_info(self) -> None:
        res = json.loads(self.run("nix", *NIX_CMD, "build", "--no-link", "--json",
                                  "--expr", TRIVIAL))
        out = res[0]["outputs"]["out"]
        assert open(out).read() == "hi\n"
        info = json.loads(self.run("nix", *NIX_CMD, "path-info", "--json", out))
        assert info[0]["path"] == out and info[0]["narHash"].startswith("sha256")
        self.valid(out, res[0]["drvPath"])

    def step_instantiate(self) -> None:
        drv = self.run("nix-instantiate", "-E", TRIVIAL)
        assert drv.startswith(self.a.store + "/") and drv.endswith("-triv.drv")
        assert open(drv).read().startswith("Derive(")
        self.valid(drv)

    def step_nix_env(self) -> None:
        profile = os.path.join(self.a.work, "profile")
        expr = os.path.join(self.a.work, "env.nix")
        with open(expr, "w") as f:
            f.write(WITH_BIN)
        self.run("nix-env", "-p", profile, "-f", expr, "-i")
        assert self.run(os.path.join(profile, "bin", "hello")) == "hello"
        assert self.run("nix-env", "-p", profile, "-q") == "hello-env"
        self.valid(os.path.realpath(profile))

    def step_nix_copy(self) -> None:
        out = self.run("nix-build", "--no-out-link", "-E", CHAIN)
        # (a local store requires signatures unless told not to, whoever the source is)
        self.run("nix", *NIX_CMD, "copy", "--no-check-sigs", "--to", self.other_url, out)
        copied = self.run("nix", *NIX_CMD, "path-info", "-r", "--store", self.other_url,
                          out).split()
        assert len(copied) == 2 and out in copied
        assert all(os.path.exists(self.other_real(p)) for p in copied)

    def seed_other(self) -> str:
        """A path only in the second store: the source of copies *to* our daemon."""
        path = self.run("nix-store", "--store", self.other_url, "--add", self.src)
        assert os.path.exists(self.other_real(path))
        assert self.run("nix-store", "--check-validity", "--print-invalid", path) == path
        return path

    def step_nix_copy_closure_ssh(self) -> None:
        path = self.seed_other()
        self.run("nix-copy-closure", "--to", "me@hostA", path,
                 PATH=self.ssh_path, NIX_REMOTE=self.other_url)
        self.valid(path)

    def step_nix_copy_ssh_ng(self) -> None:
        path = self.seed_other()
        url = (f"ssh-ng://me@hostA?remote-program={BINDIR}/storekeeper-nix-daemon"
               f"&remote-store=unix://{self.a.socket}")
        self.run("nix", *NIX_CMD, "copy", "--from", self.other_url, "--to", url, path,
                 PATH=self.ssh_path)
        self.valid(path)


STEPS = ["add", "query", "verify", "gc", "nix_build", "nix_build_path_info", "instantiate",
         "nix_env", "nix_copy", "nix_copy_closure_ssh", "nix_copy_ssh_ng"]


@needs_nix
@pytest.mark.nix
def test_real_client_matrix_with_the_store_recreated_between_steps(area_factory):
    a = area_factory().start("ours")
    m = Matrix(a)
    failed: dict[str, str] = {}
    for name in STEPS:
        try:
            m.run_step(name)
        except Exception:  # noqa: BLE001 -- every step runs; all failures are reported
            failed[name] = traceback.format_exc()
    print(f"real-client matrix: {len(STEPS)} steps, {len(STEPS) - len(failed)} passed")
    assert not failed, "\n".join(f"--- {k}\n{v}" for k, v in failed.items())
    with open(os.path.join(a.base, "ssh-logins")) as f:
        assert f.read().split() == ["me@hostA"] * 2

