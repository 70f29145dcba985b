"""Runtime roots: the store paths running processes use, read from /proc."""

from __future__ import annotations

import os
import re
from typing import Iterable, Iterator


def scan_proc(prefixes: Iterable[str], uid: int | None = None,
              proc: str = "/proc") -> Iterator[tuple[str, str]]:
    """(path, where) for every path under ``prefixes`` that a visible process uses: its exe,
    cwd, open files, mappings and environment.  With ``uid``, only that user's processes
    (as a client finds its own runtime roots: it needs no privilege, and works under
    ``hidepid=2``, where other users' processes are invisible anyway).
    """
    prefixes = sorted(set(prefixes))
    env_re = re.compile(b"(?:" + b"|".join(re.escape(p.encode()) for p in prefixes) +
                        rb")/[0-9a-z]+[0-9a-zA-Z+\-._?=]*")
    maps_re = re.compile(rb"^\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+(/\S+)$", re.M)

    # (This runs for every fd and mapping of every process on each GC: one C-level test.)
    starts = tuple(p + "/" for p in prefixes)
    exact = frozenset(prefixes)
    needles = tuple(p.encode() for p in prefixes)

    def wanted(target: str) -> bool:
        return target.startswith(starts) or target in exact

    try:
        pids = [n for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return
    for pid in pids:
        base = f"{proc}/{pid}"
        try:
            if uid is not None and os.stat(base).st_uid != uid:
                continue
        except OSError:
            continue
        found: list[tuple[str, str]] = []
        for leaf in ("exe", "cwd"):
            try:
                found.append((os.readlink(f"{base}/{leaf}"), f"{base}/{leaf}"))
            except OSError:
                pass
        try:
            for fd in os.listdir(f"{base}/fd"):
                try:
                    t = os.readlink(f"{base}/fd/{fd}")
                except OSError:
                    continue
                if t.startswith("/"):
                    found.append((t, f"{base}/fd/{fd}"))
        except OSError:
            pass
        for leaf, rx in (("maps", maps_re), ("environ", env_re)):
            try:
                with open(f"{base}/{leaf}", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if not any(n in data for n in needles):
                continue  # (most processes: no line to parse)
            for m in rx.finditer(data):
                found.append((os.fsdecode(m.group(m.lastindex or 0)), f"{base}/{leaf}"))
        for target, where in found:
            if target.endswith(" (deleted)"):
                target = target[:-len(" (deleted)")]
            if wanted(target):
                yield target, where
