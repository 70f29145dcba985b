"""Shared by the bench scripts: an environment in which real Nix never touches /nix."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import storekeeper


def isolated_nix_env(scratch: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    # Time storekeeper as installed, with its bytecode cached, not compiling
    # its modules on every start.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.dirname(storekeeper.__file__)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    env.update(HOME=os.path.join(scratch, "home"), NIX_CONF_DIR=os.path.join(scratch, "etc"),
               NIX_REMOTE=os.path.join(scratch, "unused"))
    os.makedirs(env["NIX_CONF_DIR"], exist_ok=True)
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "w") as f:
        f.write("substituters =\n")
    return env


def copy(src: str, dst: str) -> None:
    subprocess.run(["cp", "-a", src, dst], check=True)


def rmtree(path: str) -> None:
    """Remove a copy of a store (its files and dirs are read-only)."""
    subprocess.run(["chmod", "-R", "u+w", path], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until a daemon started as ``proc`` accepts on ``path`` (RuntimeError if it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    raise RuntimeError(f"daemon did not listen on {path} within {timeout} s")
