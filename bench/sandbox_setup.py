"""Sandbox set-up time per build (build/sandbox.py + build/launcher.py) with a large
input closure: median wall time of N builds of one trivial busybox derivation whose
inputs are K store paths (default 2000), sandboxed, against the same build with one
input; plus the daemon-side part alone (``sandbox.prepare``: chroot dir, mount points).
In-process (no daemon), on a fresh chroot store, as the current user.

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
from storekeeper.formats.wire import DerivedPath
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
        for run in range(n):
            for label, ins in (("1 input", []), (f"{k} inputs", inputs)):
                drv = drv_with(store, bb, ins, f"{label.split()[0]}-{run}")
                t = time.monotonic()
                [res] = Builder(store, settings).build([DerivedPath(drv, frozenset({"out"}))])
                times[label].append(time.monotonic() - t)
                if res.status != BuildStatus.BUILT:
                    sys.exit(f"build failed: {res.error_msg}")
            closure = store.query_closure({bb, *inputs})
            t = time.monotonic()
            sb = sandbox.prepare(store, drv, os.path.join(base, "bd"), None, closure,
                                 settings, fixed=False)
            prep.append(time.monotonic() - t)
            sb.remove()
        for label, ts in times.items():
            print(f"{label:>12}: median {statistics.median(ts):.3f} s per sandboxed build "
                  f"(runs: {' '.join(f'{x:.3f}' for x in ts)})")
        one, many = (statistics.median(ts) for ts in times.values())
        print(f"set-up for {k} more inputs: {many - one:.3f} s per build "
              f"(daemon side, sandbox.prepare: {statistics.median(prep):.3f} s)")
    finally:
        store.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
