"""The builder spawner (build/spawner.py): builders it starts are confined like those a
``preexec_fn`` starts, it keeps nothing of its parent's, reports exec errors and exit
statuses, and leaves no process behind."""

from __future__ import annotations

import errno
import fcntl
import os
import threading

import pytest

from storekeeper.build import Builder, BuildSettings, BuildStatus, confine
from storekeeper.build.spawner import Spawner
from storekeeper.config.settings import this_system
from storekeeper.formats.derivation import (
    Derivation,
    DerivationOutput,
    fill_output_paths,
    print_derivation,
)
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import DerivedPath
from storekeeper.store.local import LocalStore

SYSTEM = this_system()


def _confiner():
    if threading.active_count() != 1:
        pytest.skip("the test process has threads")
    c = confine.preexec_confiner(confine.host_filter())
    if c is None:
        pytest.skip("the test process has threads")
    return c


def _run(sp: Spawner, script: str, cwd: str) -> tuple[int, str]:
    r, w = os.pipe()
    try:
        proc = sp.spawn(w, args=["/bin/sh", "-c", script], executable="/bin/sh",
                        env={"PATH": "/bin:/usr/bin"}, cwd=cwd, umask=0o022)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    code, _times = proc.wait_with_times()
    return code, out


def test_builders_are_confined_and_statuses_come_back(tmp_path):
    sp = Spawner()
    assert sp.start(_confiner())
    try:
        code, out = _run(sp, "grep NoNewPrivs /proc/self/status; touch f; chmod u+s f; "
                         "echo chmod=$?; exit 3", str(tmp_path))
        assert code == 3
        assert "NoNewPrivs:\t1" in out
        assert "chmod=0" not in out and not os.stat(tmp_path / "f").st_mode & 0o4000
        # an exec error is Popen's OSError, as for a direct child
        r, w = os.pipe()
        with pytest.raises(OSError) as e:
            sp.spawn(w, args=["nope"], executable=str(tmp_path / "missing"), env={},
                     cwd=str(tmp_path), umask=0o022)
        os.close(r)
        os.close(w)
        assert e.value.errno == errno.ENOENT
        # the builder is its spawner's child: our wait4 cannot take it, the spawner's does
        code, out = _run(sp, "echo $$", str(tmp_path))
        assert code == 0 and int(out) > 0
    finally:
        sp.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # the spawner was reaped, nothing else is left


def test_the_spawner_keeps_no_lock_of_its_parent(tmp_path):
    """A flock the parent held when the spawner was forked is free once the parent
    closes its fd (the spawner closed its copy at once)."""
    lock = str(tmp_path / "lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    sp = Spawner()
    try:
        assert sp.start(_confiner())
        code, _ = _run(sp, "true", str(tmp_path))  # (the spawner is up and serving)
        assert code == 0
        os.close(fd)
        other = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if kept
        finally:
            os.close(other)
    finally:
        sp.close()


def test_a_spawner_that_cannot_confine_itself_is_not_used(tmp_path):
    def failing() -> None:
        raise OSError(errno.EPERM, "no")
    sp = Spawner()
    assert not sp.start(failing)
    assert not sp.start(failing)  # (not tried again)
    sp.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_a_chain_built_in_process_is_confined_and_leaves_no_build_dir(tmp_path, monkeypatch):
    """Through the Builder (a single-threaded process: the spawner's path): every builder
    runs under NO_NEW_PRIVS, no build dir is left and no child process either."""
    _confiner()
    spawned: list[int] = []
    spawn = Spawner.spawn
    monkeypatch.setattr(Spawner, "spawn", lambda self, fd, **kw: (spawned.append(1), spawn(self, fd, **kw))[1])
    base = str(tmp_path)
    store = LocalStore(LocalLayout.custom(base + "/store", base + "/state", base + "/log"))
    os.mkdir(base + "/b")
    try:
        sd = store.store_dir
        drvs: dict[str, Derivation] = {}
        path = out = None
        for i in range(3):
            script = "PATH=/bin:/usr/bin; grep NoNewPrivs /proc/self/status > $out" + (
                f"; cat {out} >> $out" if out else "")
            inputs = {sd.print(path): frozenset({"out"})} if path else {}
            drv = fill_output_paths(Derivation(
                outputs={"out": DerivationOutput()}, platform=SYSTEM, builder="/bin/sh",
                args=["-c", script], input_drvs=inputs,
                env={"builder": "/bin/sh", "name": f"n{i}", "system": SYSTEM}), sd, drvs.__getitem__)
            path = store.add_text(f"n{i}.drv", print_derivation(drv), [path] if path else []).path
            drvs[sd.print(path)] = drv
            out = drv.outputs["out"].path
        settings = BuildSettings(build_users_group="", sandbox="false", build_dir=base + "/b",
                                 max_jobs=2)
        [r] = Builder(store, settings).build([DerivedPath(path, frozenset({"out"}))])
        assert r.status == BuildStatus.BUILT, r.error_msg
        with open(out) as f:  # (a custom store: logical and real paths are the same)
            assert f.read().split() == ["NoNewPrivs:", "1"] * 3
        assert len(spawned) == 3  # (all through the spawner)
        assert os.listdir(base + "/b") == []
        with pytest.raises(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)
    finally:
        store.close()
