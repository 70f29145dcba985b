"""Per-build cost of the builder confinement (build/confine.py): median wall time of N
trivial builds (``/bin/sh -c 'echo > $out'``) with ``filter-syscalls`` true and false,
interleaved, on a fresh custom-layout store, in-process (no client, no daemon).

    .venv/bin/python bench/confine_overhead.py [N] [build-users-group]

Run as root with a group to measure with build users (the sweep runs then too).
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time

from storekeeper.build import Builder, BuildSettings
from storekeeper.config.settings import this_system
from storekeeper.formats.derivation import (
    Derivation,
    DerivationOutput,
    derivation_store_path,
    fill_output_paths,
)
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    group = sys.argv[2] if len(sys.argv) > 2 else ""
    base = tempfile.mkdtemp(prefix="sk-confine-bench-", dir="/tmp")
    os.chmod(base, 0o755)
    store = LocalStore(LocalLayout.custom(f"{base}/store", f"{base}/state", f"{base}/log"))
    sd, system = store.store_dir, this_system()
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i in range(n):
            for on in (True, False):
                name = f"bench-{on}-{i}-{secrets.token_hex(3)}"
                drv = fill_output_paths(Derivation(
                    outputs={"out": DerivationOutput()}, platform=system, builder="/bin/sh",
                    args=["-c", "echo > $out"],
                    env={"builder": "/bin/sh", "name": name, "system": system}), sd, read_drv=None)
                path = derivation_store_path(drv, sd)
                st = BuildSettings(filter_syscalls=on, build_users_group=group, sandbox="false",
                                   keep_build_log=False)
                t = time.perf_counter()
                r = Builder(store, st).build_basic(path, drv)
                times[on].append(time.perf_counter() - t)
                assert r.success, r.error_msg
    finally:
        store.close()
        shutil.rmtree(base, ignore_errors=True)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"N={n} build-users-group={group!r}: median with filter {on * 1000:.1f} ms, "
          f"without {off * 1000:.1f} ms, overhead {(on - off) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
