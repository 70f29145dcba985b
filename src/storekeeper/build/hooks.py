"""The programs nix.conf may hook into builds: ``post-build-hook`` and ``diff-hook``.

Both come only from the daemon's own configuration or a trusted client (the
settings table never lets an untrusted client set them), because they run
with the daemon's rights:

* ``post-build-hook`` runs as the daemon after every successful build, its
  outputs registered and still locked, with the daemon's environment plus
  ``DRV_PATH`` and ``OUT_PATHS`` (the outputs, space-separated).  Its output
  (stdout and stderr together) goes to the client line by line, as Nix's
  ``PostBuildHook`` activity; if it fails, the whole request fails with
  Nix's ``program '…' failed with …`` (the outputs stay valid).  Nix 2.8.0
  hands the hook an empty ``OUT_PATHS``; we give the outputs, as documented.
* ``diff-hook`` (with ``run-diff-hook``) runs when ``--check`` found an output
  different: as the builder's user, in ``/``, with the output, its ``.check``
  copy, the ``.drv`` and the build dir as arguments.  Its stdout is shown to
  the client as an error-level message; its failure is only reported.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any, Iterable

from ..formats.storepath import StoreDir, StorePath
from ..formats.wire import ActivityType, ResultType, Verbosity
from .logger import BuildLogger, format_error
from .results import BuildError


def status_text(status: int) -> str:
    """How Nix says how a program ended (``statusToString``)."""
    if status < 0:
        return f"failed due to signal {-status} ({signal.strsignal(-status)})"
    return f"failed with exit code {status}"


def run_post_build_hook(hook: str, logger: BuildLogger, sd: StoreDir, drv_path: StorePath,
                        outputs: Iterable[StorePath]) -> None:
    """Run ``post-build-hook`` (module docstring); raises :class:`BuildError` if it fails."""
    printed = sd.print(drv_path)
    act = logger.start_activity(Verbosity.INFO, ActivityType.POST_BUILD_HOOK,
                                f"running post-build-hook '{hook}'", [printed])
    try:
        env = dict(os.environ, DRV_PATH=printed,
                   OUT_PATHS=" ".join(sd.print(p) for p in sorted(outputs)))

        def line(text: bytes) -> None:
            logger.result(act, ResultType.POST_BUILD_LOG_LINE,
                          [text.decode("utf-8", "surrogateescape")])

        try:
            proc = subprocess.Popen([hook], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    close_fds=True)
        except OSError as e:
            # (Nix's child says so on its output and exits 1)
            line(f"error: executing '{hook}': {e.strerror}".encode())
            status = 1
        else:
            assert proc.stdout is not None
            pending = b""
            with proc.stdout:
                while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for text in lines:
                        line(text)
            if pending:
                line(pending)
            status = proc.wait()
        if status != 0:
            raise BuildError(f"program '{hook}' {status_text(status)}")
    finally:
        logger.stop_activity(act)


def run_diff_hook(hook: str, logger: BuildLogger, args: list[str],
                  uid: int | None, gid: int | None) -> None:
    """Run ``diff-hook`` on a ``--check`` mismatch (module docstring); never raises."""
    ids: dict[str, Any] = {} if uid is None else {"user": uid, "group": gid, "extra_groups": []}
    try:
        p = subprocess.run([hook, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           cwd="/", close_fds=True, **ids)
        out, status = p.stdout, p.returncode
    except OSError:
        out, status = b"", 1
    if status != 0:
        logger.log(Verbosity.ERROR, format_error(
            f"diff hook execution failed: diff-hook program '{hook}' {status_text(status)}"))
        return
    text = out.decode("utf-8", "surrogateescape").rstrip("\n")
    if text:
        logger.log(Verbosity.ERROR, text)
