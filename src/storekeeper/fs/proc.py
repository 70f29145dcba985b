"""Runtime roots: the store paths running processes use, read from /proc."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from re import Pattern

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _read(dir_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _patterns(prefixes: list[str]) -> dict[str, Pattern[bytes]]:
    """The expressions that find store paths in ``maps`` and ``environ``."""
    import re  # noqa: PLC0415 -- only when a process names the store: kept off `roots`' start-up
    env = re.compile(b"(?:" + b"|".join(re.escape(p.encode()) for p in prefixes) +
                     rb")/[0-9a-z]+[0-9a-zA-Z+\-._?=]*")
    maps = re.compile(rb"^\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+(/\S+)$", re.M)
    return {"maps": maps, "environ": env}


def list_pids(proc: str = "/proc") -> list[str]:
    """The processes we can see now."""
    try:
        return [n for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return []


def scan_proc(prefixes: Iterable[str], uid: int | None = None,
              proc: str = "/proc", pids: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(path, where) for every path under ``prefixes`` that a visible process uses: its exe,
    cwd, open files, mappings and environment.  With ``uid``, only that user's processes
    (as a client finds its own runtime roots: it needs no privilege, and works under
    ``hidepid=2``, where other users' processes are invisible anyway).  With ``pids``, only
    those (of :func:`list_pids`: a scan may be split between threads).
    """
    prefixes = sorted(set(prefixes))
    patterns: dict[str, Pattern[bytes]] = {}  # (compiled when a process first names a prefix)

    # (This runs for every fd and mapping of every process on each GC: one C-level test.)
    starts = tuple(p + "/" for p in prefixes)
    exact = frozenset(prefixes)
    needles = tuple(p.encode() for p in prefixes)

    def wanted(target: str) -> bool:
        return target.startswith(starts) or target in exact

    if pids is None:
        pids = list_pids(proc)
    bare = tuple(prefixes)
    for pid in pids:
        base = f"{proc}/{pid}"
        # Everything relative to the process's directory: one path walk in /proc
        # per process, not one per link and file (this runs on every GC).
        try:
            pfd = os.open(base, _DIR)
        except OSError:
            continue
        try:
            if uid is not None and os.fstat(pfd).st_uid != uid:
                continue
            found: list[tuple[str, str]] = []
            for leaf in ("exe", "cwd"):
                try:
                    found.append((os.readlink(leaf, dir_fd=pfd), f"{base}/{leaf}"))
                except OSError:
                    pass
            try:
                fds = os.open("fd", _DIR, dir_fd=pfd)
            except OSError:
                fds = -1
            if fds >= 0:
                try:
                    for fd in os.listdir(fds):
                        try:
                            t = os.readlink(fd, dir_fd=fds)
                        except OSError:
                            continue
                        if t.startswith(bare):
                            found.append((t, f"{base}/fd/{fd}"))
                except OSError:
                    pass
                finally:
                    os.close(fds)
            for leaf in ("maps", "environ"):
                data = _read(pfd, leaf)
                if data is None or not any(n in data for n in needles):
                    continue  # (most processes: no line to parse)
                if not patterns:
                    patterns.update(_patterns(prefixes))
                for m in patterns[leaf].finditer(data):
                    found.append((os.fsdecode(m.group(m.lastindex or 0)), f"{base}/{leaf}"))
        finally:
            os.close(pfd)
        for target, where in found:
            if target.endswith(" (deleted)"):
                target = target[:-len(" (deleted)")]
            if wanted(target):
                yield target, where
