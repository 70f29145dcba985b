"""Sandbox set-up time per build (build/sandbox.py + build/launcher.py) with a large
input closure: median wall time of N builds of one trivial busybox derivation whose
inputs are K store paths (default 2000), sandboxed, against the same build with one
input; plus the daemon-side part alone (``sandbox.prepare``: chroot dir, mount points).
In-process (no daemon), on a fresh chroot store, as the current user; all builds in
one request (the launcher's fork server started once, by an untimed first build),
each timed from the start of its Build activity to its end.

    .venv/bin/python bench/sandbox_setup.py [N] [K] [build-users-group]

Target (issue 15): set-up <= 0.3 s per build with a 2000-path input closure.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

from storekeeper.build import Builder, BuildSettings, BuildStatus, sandbox
from storekeeper.config.settings import this_system
from storekeeper.formats.derivation import (
    Derivation,
    DerivationOutput,
    fill_output_paths,
    print_derivation,
)
from storekeeper.formats.storepath import StorePath
from storekeeper.formats.url import LocalLayout
from storekeeper.formats.wire import ActivityType, DerivedPath
from storekeeper.store.local import LocalStore


def busybox(store: LocalStore, base: str) -> StorePath:
    d = os.path.join(base, "bb")
    os.makedirs(d)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", os.path.join(d, "busybox"))
    os.symlink("busybox", os.path.join(d, "sh"))
    return store.add_path(d, name="busybox").path


def drv_with(store: LocalStore, bb: StorePath, inputs: list[StorePath], tag: str) -> StorePath:
    sd = store.store_dir
    sh = sd.print(bb) + "/sh"
    drv = Derivation(outputs={"out": DerivationOutput()}, platform=this_system(), builder=sh,
                     args=["-c", ": > $out"],
                     env={"builder": sh, "name": f"setup-{tag}", "system": this_system()},
                     input_srcs=sorted(sd.print(p) for p in {bb, *inputs}))
    drv = fill_output_paths(drv, sd, read_drv=None)
    return store.add_text(f"setup-{tag}.drv", print_derivation(drv), [bb, *inputs]).path


class _Timer:
    """A build logger that times each Build activity (start to stop) by its label, but
    the first build's (whichever the scheduler starts first: it starts the server)."""

    def __init__(self, labels: dict[str, str], times: dict[str, list[float]]) -> None:
        self.labels, self.times, self.open, self.n = labels, times, {}, 0
        self.first = True

    def start_activity(self, level, act_type, text, fields=(), parent=0) -> int:
        self.n += 1
        if act_type == ActivityType.BUILD:
            if not self.first and fields and fields[0] in self.labels:
                self.open[self.n] = (self.labels[fields[0]], time.monotonic())
            self.first = False
        return self.n

    def stop_activity(self, act_id: int) -> None:
        if act_id in self.open:
            label, t = self.open.pop(act_id)
            self.times[label].append(time.monotonic() - t)

    def __getattr__(self, name):
        return lambda *a, **kw: None


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    group = sys.argv[3] if len(sys.argv) > 3 else ""
    if sandbox.unavailable():
        sys.exit(f"no sandbox here: {sandbox.unavailable()}")
    base = tempfile.mkdtemp(prefix="sk-sandbox-bench-", dir="/tmp")
    os.chmod(base, 0o755)
    store = LocalStore(LocalLayout.chroot(os.path.join(base, "root")))
    try:
        bb = busybox(store, base)
        t = time.monotonic()
        # half directories, half files: both kinds of mount point
        inputs = []
        for i in range(k):
            if i % 2:
                inputs.append(store.add_text(f"in-{i}", f"{i}\n".encode()).path)
            else:
                src = os.path.join(base, "dirs", str(i))
                os.makedirs(src)
                with open(os.path.join(src, "f"), "w") as f:
                    f.write(f"{i}\n")
                inputs.append(store.add_path(src, name=f"dir-{i}").path)
        print(f"made {k} input paths in {time.monotonic() - t:.1f} s")
        settings = BuildSettings().with_settings([("sandbox", "true"),
                                                  ("build-users-group", group)])
        times: dict[str, list[float]] = {"1 input": [], f"{k} inputs": []}
        prep: list[float] = []
        # All builds in one request (one launcher server, started by the first, not
        # timed): each build timed from its Build activity's start to its end (after
        # the daemon side's sandbox.prepare, timed apart below).
        labels: dict[str, str] = {}
        targets = []
        for run in range(n):
            for label, ins in (("1 input", []), (f"{k} inputs", inputs)):
                drv = drv_with(store, bb, ins, f"{label.split()[0]}-{run}")
                labels[store.store_dir.print(drv)] = label
                targets.append(DerivedPath(drv, frozenset({"out"})))
        warm = drv_with(store, bb, [], "warm-up")
        log = _Timer(labels, times)
        res = Builder(store, settings, logger=log).build(
            [DerivedPath(warm, frozenset({"out"})), *targets])
        bad = [r.error_msg for r in res if r.status != BuildStatus.BUILT]
        if bad:
            sys.exit(f"build failed: {bad[0]}")
        for _ in range(n):
            closure = store.query_closure({bb, *inputs})
            t = time.monotonic()
            sb = sandbox.prepare(store, warm, os.path.join(base, "bd"), None, closure,
                                 settings, fixed=False)
            prep.append(time.monotonic() - t)
            sb.remove()
        for label, ts in times.items():
            print(f"{label:>12}: median {statistics.median(ts):.3f} s per sandboxed build "
                  f"(runs: {' '.join(f'{x:.3f}' for x in ts)})")
        one, many = (statistics.median(ts) for ts in times.values())
        side = statistics.median(prep)
        print(f"set-up for {k} more inputs: {many - one + side:.3f} s per build ({many - one:.3f} s "
              f"in the launcher, {side:.3f} s daemon side: sandbox.prepare, not in the times above)")
    finally:
        store.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
