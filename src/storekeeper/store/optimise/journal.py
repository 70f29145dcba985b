"""The optimiser's journal: the directories a run is changing, so that a run
killed half-way can be finished by the next one.

Invariants:

* Before a directory inside a store path gets its first change from a run (a
  ``rename`` into it, or ``u+w``), its absolute path is appended
  (NUL-terminated) to ``<state>/optimise-journal/<pid>``, which the process
  holds with ``flock`` EX from creating it until its run ends and it deletes it.
* A journal nobody holds belongs to a process that died (SIGKILL, power cut)
  between a ``rename`` and putting the directory back to mode 0555 and mtime 1.
  :func:`recover` puts every directory it lists back (they are all inside
  store paths, whose directories are canonical 0555/mtime 1), then deletes it.
  It runs before every optimise and every verify, under the locks those hold.
"""

from __future__ import annotations

import os
import stat
import threading

from ... import fs
from ..locks import lock_fd

JOURNAL_DIR = "optimise-journal"
_MTIME_NS = 1_000_000_000


class Journal:
    """One process's journal (see the module docstring); thread-safe, made on first use."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, JOURNAL_DIR)
        self._fd: int | None = None
        self._pid = -1
        self._mutex = threading.Lock()

    def note(self, path: str) -> None:
        """Record the directory at ``path`` (absolute, inside a store path) before it is changed."""
        record = os.fsencode(path) + b"\0"
        with self._mutex:
            if self._fd is None or self._pid != os.getpid():
                os.makedirs(self.dir, mode=0o755, exist_ok=True)
                path = os.path.join(self.dir, str(os.getpid()))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                             | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                lock_fd(fd, exclusive=True)
                self._fd, self._pid = fd, os.getpid()
            os.write(self._fd, record)

    def close(self) -> None:
        """The run ended: every directory it changed is canonical again."""
        with self._mutex:
            if self._fd is None or self._pid != os.getpid():
                self._fd = None
                return
            try:
                os.unlink(os.path.join(self.dir, str(self._pid)))
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def recover(real_store_dir: str, state_dir: str) -> list[str]:
    """Finish the journals of dead runs (see the module docstring); the directories
    put back are returned."""
    d = os.path.join(state_dir, JOURNAL_DIR)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    fixed: list[str] = []
    for name in names:
        path = os.path.join(d, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if not lock_fd(fd, exclusive=True, wait=False):
                continue  # a live run
            with open(fd, "rb", closefd=False) as f:
                records = f.read().split(b"\0")
            for rec in dict.fromkeys(records):
                if rec and _restore(real_store_dir, os.fsdecode(rec)):
                    fixed.append(os.fsdecode(rec))
            os.unlink(path)
        finally:
            os.close(fd)
    return fixed


def _restore(real_store_dir: str, path: str) -> bool:
    """Put ``path`` (a directory inside a store path) back to 0555 and mtime 1, opened
    one no-follow component at a time from the store dir; False if nothing was to do."""
    rel = os.path.relpath(path, real_store_dir)
    parts = rel.split(os.sep)
    if rel == "." or rel.startswith("..") or parts[0].startswith("."):
        return False  # not inside a store path (the store dir and .links are not ours)
    try:
        fd = fs.open_dir(real_store_dir)
    except OSError:
        return False
    try:
        for part in parts:
            nfd = fs.open_dir(part, dir_fd=fd)
            os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        done = False
        if stat.S_IMODE(st.st_mode) != 0o555:
            os.fchmod(fd, 0o555)
            done = True
        if st.st_mtime_ns != _MTIME_NS:
            os.utime(fd, ns=(st.st_atime_ns, _MTIME_NS))
            done = True
        return done
    except OSError:
        return False  # gone (collected) or not a directory any more
    finally:
        os.close(fd)
